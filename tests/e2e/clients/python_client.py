"""Drives a running Capstan API through the Python client openapi-python-client generated
from its OpenAPI document: log in, submit a job, follow it to its end, read it, its events,
the job list, the nodes and the caller. Exits non-zero, saying why, on the first surprise.

Usage: python_client.py BASE_URL USER PASSWORD (the generated package on PYTHONPATH)."""

import sys
import time

from capstan_client import AuthenticatedClient, Client
from capstan_client.api.auth import login
from capstan_client.api.jobs import get_job, list_job_events, list_jobs, submit_job
from capstan_client.api.nodes import list_nodes
from capstan_client.api.users import get_current_user
from capstan_client.models import Job, JobCreated, JobPage, JobSubmission, LoginRequest, TokenPair
from capstan_client.models.status import Status


def expect(value, kind, what):
    if not isinstance(value, kind):
        sys.exit(f"{what}: expected {kind.__name__}, got {value!r}")
    return value


def main():
    base, user, password = sys.argv[1:4]
    anonymous = Client(base_url=base, raise_on_unexpected_status=True)
    pair = expect(
        login.sync(client=anonymous, body=LoginRequest(username=user, password=password)),
        TokenPair,
        "login",
    )
    client = AuthenticatedClient(
        base_url=base, token=pair.access_token, raise_on_unexpected_status=True
    )
    created = expect(
        submit_job.sync(client=client, body=JobSubmission(argv=["echo", "from the client"])),
        JobCreated,
        "submit",
    )
    deadline = time.monotonic() + 60
    while True:
        job = expect(get_job.sync(created.id, client=client), Job, "get job")
        if job.status == Status.SUCCEEDED:
            break
        if job.status in (Status.FAILED, Status.CANCELLED, Status.TIMED_OUT, Status.LOST):
            sys.exit(f"the job ended {job.status}: {job!r}")
        if time.monotonic() > deadline:
            sys.exit(f"the job did not end in time: {job!r}")
        time.sleep(0.2)
    if not job.attempts or job.attempts[-1].exit_code != 0:
        sys.exit(f"the job's attempts do not show its exit: {job!r}")
    events = list_job_events.sync(created.id, client=client)
    kinds = [event.kind.value for event in events.events]
    if "succeeded" not in kinds:
        sys.exit(f"the events do not show the end: {kinds}")
    # The list is the SQL history, which follows the job's events a few milliseconds behind
    # the record that `get_job` read.
    deadline = time.monotonic() + 10
    while True:
        page = expect(list_jobs.sync(client=client, limit=10), JobPage, "list jobs")
        if created.id in [summary.id for summary in page.jobs]:
            break
        if time.monotonic() > deadline:
            sys.exit(f"the list does not show the job: {page!r}")
        time.sleep(0.1)
    nodes = list_nodes.sync(client=client)
    if not nodes.nodes or nodes.nodes[0].status.value != "up":
        sys.exit(f"no node up: {nodes!r}")
    me = get_current_user.sync(client=client)
    if me.name != user:
        sys.exit(f"the caller is {me.name}, not {user}")
    print(f"ok: job {created.id} {job.status.value}, {len(kinds)} events, {len(nodes.nodes)} nodes")


if __name__ == "__main__":
    main()
