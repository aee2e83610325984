"""Celery app of the Celery-on-Redis comparison benchmark (see bench.py).

One task, `capstan.run_true`, runs /bin/true as a subprocess and returns its exit code:
the same work as a Capstan `true` job. The worker (`celery -A tasks worker`) and the
benchmark client both import this module; bench.py sets CAPSTAN_CELERY_REDIS_URL (the
Redis server it started) before either does.
"""

import os
import subprocess

from celery import Celery

# redis://127.0.0.1:<port>: the broker uses database 0, the result backend database 1 of
# the same server.
_REDIS = os.environ["CAPSTAN_CELERY_REDIS_URL"].rstrip("/")

app = Celery("capstan_bench", broker=f"{_REDIS}/0", backend=f"{_REDIS}/1")

# Stock settings, spelt out where the benchmark's notes rely on them.
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # Acknowledge on receipt (Celery's default): a task lost with its worker is not redone.
    task_acks_late=False,
    # Each pool process may hold 4 unacknowledged messages (Celery's default).
    worker_prefetch_multiplier=4,
    # Silences the Celery 5 deprecation warning; same behaviour as the default.
    broker_connection_retry_on_startup=True,
)


@app.task(name="capstan.run_true")
def run_true() -> int:
    """Run /bin/true and return its exit code (0; a failure raises)."""
    return subprocess.run(["/bin/true"], check=True).returncode
