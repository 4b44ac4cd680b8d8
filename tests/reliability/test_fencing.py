"""R2: a lock holder stopped (SIGSTOP) past its lease loses the lock to another owner; when it
resumes, the fencing token rejects its write and the row keeps the second owner's result."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator_project.redis_client import redis_client
from sessions.models import Session, SessionEvent
from tenants.models import Tenant
from tests.conftest import ROOT, Stack, wait_until

from .stalled_holder import STALE

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

LEASE_S = 2  # holder A's SESSION_LOCK_TTL_SECONDS


def process_state(pid: int) -> str:
    """The one-letter state of a process in /proc (T: stopped by a signal)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def lock_is_free(key: str) -> bool:
    """As the lock's scripts see it: no holder, or a holder whose lease ran out."""
    client = redis_client()
    owner, expires = client.hmget(key, "owner", "expires")
    seconds, micros = client.time()
    return owner is None or int(expires) <= seconds * 1000 + micros // 1000


def test_a_holder_stopped_past_its_lease_cannot_overwrite_the_next_holders_write(transactional_db):
    tenant = Tenant.objects.create(slug="fencing", name="Fencing")
    session = Session.objects.create(tenant=tenant, title="R2", requirements="fencing", status="running")
    key = f"lock:session:{session.pk}"
    holder_a = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.stalled_holder", str(session.pk)],
        cwd=ROOT,
        env={**Stack().env(), "SESSION_LOCK_TTL_SECONDS": str(LEASE_S)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def a_stopped() -> bool:
            if holder_a.poll() is not None:
                raise AssertionError(f"holder A exited with {holder_a.returncode}: {holder_a.stdout.read()}")
            return process_state(holder_a.pid) == "T"

        wait_until(a_stopped, timeout=10, interval=0.05, what="holder A to stop while holding the lock")
        first_line = holder_a.stdout.readline().strip()  # printed before it stopped itself
        assert first_line.startswith("acquired token "), first_line
        a_token = int(first_line.removeprefix("acquired token "))
        assert int(redis_client().hget(key, "token")) == a_token  # A holds the lock, stopped

        wait_until(lambda: lock_is_free(key), timeout=LEASE_S + 3, interval=0.05, what="A's lease to run out")
        assert process_state(holder_a.pid) == "T"  # still stopped: A never released the lock

        b_event = Session.objects.get(pk=session.pk).transition("degraded", reason="B", actor="holder-B")
        assert b_event.fencing_token > a_token

        os.kill(holder_a.pid, signal.SIGCONT)
        output, _ = holder_a.communicate(timeout=10)
    finally:
        if holder_a.poll() is None:
            os.kill(holder_a.pid, signal.SIGCONT)
            holder_a.kill()
            holder_a.wait(timeout=5)
        holder_a.stdout.close()

    print(f"A's token {a_token}, B's token {b_event.fencing_token}; A's output:", output, sep="\n")
    assert holder_a.returncode == STALE, output
    assert f"StaleFencingToken: token {a_token} is not newer than {b_event.fencing_token}" in output, output
    row = Session.objects.get(pk=session.pk)
    assert row.status == "degraded"
    assert row.fencing_token == b_event.fencing_token > a_token
    assert row.version == 1  # B's write only
    events = list(SessionEvent.objects.filter(session=row))
    assert events[-1].pk == b_event.pk
    assert (events[-1].actor, events[-1].from_status, events[-1].to_status) == ("holder-B", "running", "degraded")
    assert not SessionEvent.objects.filter(session=row, actor="holder-A").exists()
