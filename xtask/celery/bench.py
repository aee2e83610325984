"""Celery-on-Redis benchmark that measures what `cargo xtask bench` measures for Capstan.

Run it through run.sh, which installs Celery and redis-server first. It starts its own
redis-server (free port, temporary directory) and one Celery worker (prefork pool), then:

- warm-up: 200 tasks;
- throughput: --jobs tasks submitted as fast as the broker takes them (or at most --window in
  flight), clocked from the first submit until all results are in; --repeat runs, each
  reported, and the median;
- latency: --latency-jobs tasks one at a time, submit -> result ready; p50 and p99;
- CPU per job over the throughput runs, for every process involved: redis-server, the
  worker's main process, its pool processes, the /bin/true processes they ran, and this
  client.

The task runs /bin/true as a subprocess (tasks.py). Progress goes to stderr; the result is
one JSON object on the last line of stdout.
"""

import argparse
import collections
import json
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# Leave no __pycache__ in the source tree (the worker gets PYTHONDONTWRITEBYTECODE too).
sys.dont_write_bytecode = True
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WARMUP_JOBS = 200
RESULT_TIMEOUT = 120.0  # seconds to wait for any one result


def log(message):
    print(f"celery-bench: {message}", file=sys.stderr, flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="tasks per throughput run")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs")
    parser.add_argument("--latency-jobs", type=int, default=300, help="tasks sent one at a time")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="pool processes of the worker (Capstan: executors x slots)")
    parser.add_argument(
        "--window", type=int, default=0,
        help="most tasks in flight; 0 (the default): submit as fast as the broker takes them, as "
        "Capstan's client does (its window bounds unacknowledged publishes, and a Celery "
        "submit is already acknowledged when it returns)")
    parser.add_argument("--redis-server", default=shutil.which("redis-server"),
                        help="redis-server executable (run.sh passes the one it installed)")
    parser.add_argument("--keep-dir", action="store_true",
                        help="keep the temporary directory (Redis data, logs)")
    args = parser.parse_args()
    if not args.redis_server:
        parser.error("no redis-server found; pass --redis-server (or use run.sh)")
    for name in ("jobs", "repeat", "latency_jobs", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.window < 0:
        parser.error("--window must be 0 (no limit) or more")
    return args


# --- processes -----------------------------------------------------------------------------

def _prctl():
    """libc's prctl, looked up before any fork (or None off Linux)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None


PRCTL = _prctl()
PR_SET_PDEATHSIG = 1


def spawn(argv, log_path, death_signal=signal.SIGTERM, **kwargs):
    """Start `argv` in its own session (so Ctrl-C reaches only us) with output to a log.

    The child gets `death_signal` if bench.py dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so nothing outlives the benchmark.
    """

    def before_exec():
        if PRCTL is not None:
            PRCTL(PR_SET_PDEATHSIG, int(death_signal))

    with open(log_path, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=before_exec, **kwargs)


def stop(process, name, grace):
    """SIGTERM, then SIGKILL to the whole process group after `grace` seconds."""
    if process is None or process.poll() is not None:
        return
    log(f"stopping {name}")
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log(f"{name} did not stop within {grace:.0f} s; killing it")
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- CPU accounting from /proc -------------------------------------------------------------

def proc_stat(pid):
    """(ppid, own ticks, reaped children's ticks) of `pid`, or None if it is gone.

    Own = utime + stime (all threads). Reaped children = cutime + cstime: only children
    that exited and were waited for, with their own reaped children in turn.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is field 3 (state), so field n is fields[n - 3].
    ppid = int(fields[4 - 3])
    utime, stime, cutime, cstime = (int(fields[n - 3]) for n in (14, 15, 16, 17))
    return ppid, utime + stime, cutime + cstime


def children_of(parent):
    """Pids whose parent is `parent` (a scan of /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[0] == parent:
                found.append(int(entry))
    return found


def cpu_snapshot(redis_pid, worker_pid):
    """CPU ticks so far of every process that the benchmark involves, and client seconds."""
    redis = proc_stat(redis_pid)
    worker = proc_stat(worker_pid)
    pool = {}
    for pid in children_of(worker_pid):
        stat = proc_stat(pid)
        if stat is not None:
            pool[pid] = stat
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        # Redis forks for RDB snapshots; those children are reaped, so count cutime too.
        "redis": redis[1] + redis[2],
        "worker_own": worker[1],
        "worker_reaped": worker[2],  # pool processes that exited (none unless recycled)
        "pool": pool,
        "client_seconds": usage.ru_utime + usage.ru_stime,
    }


def cpu_per_job(before, after, jobs):
    """Microseconds per job of each group of processes between two snapshots."""
    pool_own = 0
    true_children = 0
    for pid, (_, own, reaped) in after["pool"].items():
        _, own0, reaped0 = before["pool"].get(pid, (0, 0, 0))
        pool_own += own - own0
        # A pool process runs /bin/true with subprocess.run, which waits for it: its
        # cutime + cstime are exactly the /bin/true processes it ran.
        true_children += reaped - reaped0
    # A pool process that exited during the run (Celery replaces a dead one) lands whole,
    # /bin/true children included, in the main process's cutime: count it as pool.
    pool_own += after["worker_reaped"] - before["worker_reaped"]
    ticks = {
        "redis-server": after["redis"] - before["redis"],
        "celery-worker-main": after["worker_own"] - before["worker_own"],
        "celery-pool": pool_own,
        "bin-true": true_children,
    }
    per_job = {name: t / CLOCK_TICKS * 1e6 / jobs for name, t in ticks.items()}
    per_job["client"] = (after["client_seconds"] - before["client_seconds"]) * 1e6 / jobs
    return {name: round(us, 1) for name, us in per_job.items()}


# --- measurements ----------------------------------------------------------------------------

def run_window(task, count, window):
    """Submit `count` tasks keeping at most `window` outstanding; wait for all results.

    When the window is full, waits for the oldest outstanding result before the next
    submit (results arrive roughly in order, so the oldest is the next to wait for).
    """
    outstanding = collections.deque()

    def settle(result):
        code = result.get(timeout=RESULT_TIMEOUT)
        if code != 0:
            raise RuntimeError(f"task {result.id} returned {code!r}")

    for _ in range(count):
        if window and len(outstanding) >= window:
            settle(outstanding.popleft())
        outstanding.append(task.apply_async())
    while outstanding:
        settle(outstanding.popleft())


def percentile(sorted_values, p):
    """The same index rule as xtask/src/bench.rs: round((n - 1) * p), half away from 0."""
    if not sorted_values:
        return 0.0
    index = int(math.floor((len(sorted_values) - 1) * p + 0.5))
    return sorted_values[min(index, len(sorted_values) - 1)]


def wait_until(what, check, process, timeout):
    """Poll `check()` until true; fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with status {process.returncode}")
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout:.0f} s")
        time.sleep(0.1)


def benchmark(args, workdir, started):
    # Redis: stock configuration (RDB snapshots at the default save points, no AOF), only
    # the port, the loopback address and the data directory set.
    port = free_port()
    redis_version = subprocess.run([args.redis_server, "--version"], capture_output=True,
                                   text=True, check=True).stdout.strip()
    log(f"starting {redis_version.split(' sha=')[0]} on 127.0.0.1:{port}")
    redis_process = spawn([args.redis_server, "--port", str(port), "--bind", "127.0.0.1",
                           "--dir", workdir, "--daemonize", "no"],
                          os.path.join(workdir, "redis.log"))
    started["redis"] = redis_process

    # Only now the third-party modules: they come from run.sh's venv.
    import celery
    import redis as redis_client

    client = redis_client.Redis(host="127.0.0.1", port=port)
    wait_until("redis-server", client.ping, redis_process, 15)
    info = client.info("server")
    save = client.config_get("save").get("save", "")
    appendonly = client.config_get("appendonly").get("appendonly", "")

    os.environ["CAPSTAN_CELERY_REDIS_URL"] = f"redis://127.0.0.1:{port}"
    sys.path.insert(0, HERE)
    import tasks

    log(f"starting Celery {celery.__version__} worker, prefork pool, concurrency "
        f"{args.concurrency}")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    worker = spawn([sys.executable, "-m", "celery", "-A", "tasks", "worker",
                    "--pool", "prefork", "--concurrency", str(args.concurrency),
                    "--loglevel", "WARNING", "--hostname", f"bench-{port}@%h"],
                   os.path.join(workdir, "worker.log"),
                   # If bench.py dies, Redis may be gone first, and a worker told to shut
                   # down warmly then keeps retrying the broker: kill it outright (its pool
                   # processes die with it: Celery gives them PDEATHSIG SIGKILL).
                   death_signal=signal.SIGKILL, cwd=HERE, env=env)
    started["worker"] = worker
    wait_until("celery worker", lambda: tasks.app.control.ping(timeout=0.5), worker, 60)
    pool = children_of(worker.pid)
    log(f"worker up: main pid {worker.pid}, {len(pool)} pool processes")
    if len(pool) != args.concurrency:
        log(f"warning: expected {args.concurrency} pool processes, found {len(pool)}")

    task = tasks.run_true
    log(f"warm-up: {WARMUP_JOBS} tasks")
    run_window(task, WARMUP_JOBS, args.window)

    runs = []
    before = cpu_snapshot(redis_process.pid, worker.pid)
    for n in range(1, args.repeat + 1):
        start = time.perf_counter()
        run_window(task, args.jobs, args.window)
        elapsed = time.perf_counter() - start
        runs.append(args.jobs / elapsed)
        log(f"throughput run {n}/{args.repeat}: {args.jobs} tasks in {elapsed:.2f} s = "
            f"{runs[-1]:.0f} tasks/s")
    after = cpu_snapshot(redis_process.pid, worker.pid)
    cpu = cpu_per_job(before, after, args.jobs * args.repeat)

    log(f"latency: {args.latency_jobs} tasks one at a time")
    latencies = []
    for _ in range(args.latency_jobs):
        sent = time.perf_counter()
        code = task.apply_async().get(timeout=RESULT_TIMEOUT)
        latencies.append(time.perf_counter() - sent)
        if code != 0:
            raise RuntimeError(f"task returned {code!r}")
    latencies.sort()

    if args.window:
        submission = f"client keeps at most {args.window} tasks in flight (waits for the oldest)"
    else:
        submission = "client submits every task, then waits for the results"
    return {
        "system": f"Celery {celery.__version__} on Redis {info['redis_version']}",
        "concurrency": args.concurrency,
        "jobs": args.jobs,
        "throughput_runs": [round(r, 1) for r in runs],
        "throughput_median": round(statistics.median(runs), 1),
        "latency_p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "latency_p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "cpu_us_per_job": cpu,
        "cpu_us_per_job_total": round(sum(cpu.values()), 1),
        "notes": (
            f"prefork pool, concurrency {args.concurrency}, task_acks_late=False (default), "
            "worker_prefetch_multiplier=4 (default), -O default, json serializer; "
            "broker: Redis db 0 (kombu redis transport), result backend: Redis db 1 on the "
            f"same server (results read with AsyncResult.get); Redis persistence: "
            f"save '{save}', appendonly {appendonly}; task: subprocess.run(['/bin/true']); "
            f"{submission}; "
            f"throughput clock from first submit to last result; CPU summed over the "
            f"{args.repeat} throughput run(s) of {args.jobs} tasks, per task; bin-true = "
            "the /bin/true processes (reaped by the pool processes: their cutime+cstime); "
            "latency percentile index round((n-1)p) as in xtask bench"
        ),
    }


def main():
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so the finally block below stops redis and the worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = tempfile.mkdtemp(prefix="capstan-celery-bench-")
    started = {}
    ok = False
    try:
        result = benchmark(args, workdir, started)
        ok = True
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        # The worker first (warm shutdown: it has nothing left to run), then Redis.
        stop(started.get("worker"), "celery worker", 30)
        stop(started.get("redis"), "redis-server", 15)
        if ok and not args.keep_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs and Redis data kept in {workdir}")

    cpu = result["cpu_us_per_job"]
    log(f"{result['system']}, concurrency {result['concurrency']}: throughput median "
        f"{result['throughput_median']:.0f} tasks/s {result['throughput_runs']}, latency "
        f"p50 {result['latency_p50_ms']:.2f} ms, p99 {result['latency_p99_ms']:.2f} ms, "
        "CPU per task " + ", ".join(f"{k} {v:.0f} µs" for k, v in cpu.items())
        + f", total {result['cpu_us_per_job_total']:.0f} µs")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
