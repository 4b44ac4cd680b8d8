"""Holder A of reliability test R2 (test_fencing.py), run as its own process:

    python -m tests.reliability.stalled_holder <session id>

It calls the real Session.transition("paused") with a session_lock that stops this process
(SIGSTOP) right after it acquired the lock and before the database write: a GC pause or a stall
that outlasts the lease. Once continued (SIGCONT) it goes on with the write it started.

Prints `acquired token N` before it stops, then what became of the write. Exit codes:
0 the write went through (the bug R2 looks for), 3 StaleFencingToken rejected it.
"""

import os
import signal
import sys
from contextlib import contextmanager

STALE = 3


def main(session_id: str) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_project.settings")
    import django

    django.setup()

    import sessions.models
    from orchestrator_project.locking import StaleFencingToken
    from sessions.locking import session_lock
    from sessions.models import Session

    @contextmanager
    def stalling_session_lock(pk):
        with session_lock(pk) as lease:
            print(f"acquired token {lease.token}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)  # the stall: the lease runs out meanwhile
            print("resumed", flush=True)
            yield lease

    sessions.models.session_lock = stalling_session_lock
    session = Session.objects.get(pk=session_id)
    try:
        event = session.transition("paused", reason="A", actor="holder-A")
    except StaleFencingToken as exc:
        print(f"StaleFencingToken: {exc}", flush=True)
        return STALE
    print(f"wrote {event.from_status} -> {event.to_status} with token {event.fencing_token}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
