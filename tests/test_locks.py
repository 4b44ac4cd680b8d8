"""The fair, fenced Redis lock (orchestrator_project.locking.FairLock) on the real Redis, across threads and
processes."""

import multiprocessing
import os
import signal
import threading
import time

import pytest

from orchestrator_project.locking import DeadlockDetected, FairLock, LockUnavailable, NotLockOwner
from orchestrator_project.redis_client import redis_client

from .conftest import wait_until

# Forked children share nothing but Redis; each gets a connection of its own (redis-py
# resets its pool in a new process).
fork = multiprocessing.get_context("fork")


def queued(resource: str) -> list[str]:
    return [w.decode() for w in redis_client().lrange(f"lock:{resource}:queue", 0, -1)]


def hammer(resource: str, rounds: int, tokens) -> None:
    """Increment a Redis counter `rounds` times with a read and a write (not atomic on its
    own): only mutual exclusion keeps every increment."""
    client = redis_client()
    seen = []
    for _ in range(rounds):
        lock = FairLock(resource, ttl=10)
        seen.append(lock.acquire(timeout=60))
        value = int(client.get("counter") or 0)
        client.set("counter", value + 1)
        lock.release()
    tokens.put(seen)


def test_eight_processes_acquiring_500_times_each_never_overlap():
    tokens = fork.Queue()
    workers = [fork.Process(target=hammer, args=("mutex", 500, tokens)) for _ in range(8)]
    for worker in workers:
        worker.start()
    issued = [token for _ in workers for token in tokens.get(timeout=120)]
    for worker in workers:
        worker.join(timeout=30)

    assert [w.exitcode for w in workers] == [0] * 8
    assert int(redis_client().get("counter")) == 4000
    assert sorted(issued) == list(range(1, 4001))  # a new, higher fencing token every time


def test_fifty_staggered_waiters_get_the_lock_in_the_order_they_asked():
    holder = FairLock("fifo", ttl=30, owner="holder")
    holder.acquire(timeout=1)
    order, threads = [], []

    def wait_in_line(index: int) -> None:
        lock = FairLock("fifo", ttl=30, owner=f"waiter-{index}")
        lock.acquire(timeout=60)
        order.append(index)
        lock.release()

    for index in range(50):
        thread = threading.Thread(target=wait_in_line, args=(index,))
        thread.start()
        threads.append(thread)
        wait_until(lambda n=index + 1: len(queued("fifo")) == n, what=f"waiter {index} in the queue", timeout=10)
    holder.release()
    for thread in threads:
        thread.join(timeout=60)

    assert order == list(range(50))


def wait_for_lock(resource: str, patience: float) -> None:
    FairLock(resource, ttl=30, owner="doomed", patience=patience).acquire(timeout=60)


def wait_in_thread(resource: str, owner: str) -> tuple[threading.Thread, threading.Event]:
    """`owner` waits for `resource` in a thread; the event is set once it got the lock (it then
    releases it)."""
    acquired = threading.Event()

    def waiter() -> None:
        lock = FairLock(resource, ttl=30, owner=owner)
        lock.acquire(timeout=30)
        acquired.set()
        lock.release()

    thread = threading.Thread(target=waiter)
    thread.start()
    return thread, acquired


def test_a_waiter_that_died_is_skipped_once_its_deadline_passes():
    holder = FairLock("dead-waiter", ttl=30, owner="holder")
    holder.acquire(timeout=1)
    doomed = fork.Process(target=wait_for_lock, args=("dead-waiter", 1.0))
    doomed.start()
    wait_until(lambda: queued("dead-waiter") == ["doomed"], what="the doomed waiter in the queue")
    thread, acquired = wait_in_thread("dead-waiter", "alive")
    wait_until(lambda: queued("dead-waiter") == ["doomed", "alive"], what="the live waiter behind it")
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(timeout=5)
    holder.release()  # wakes the dead head of the queue, which never comes

    assert acquired.wait(timeout=10), "the live waiter stayed stuck behind the dead one"
    thread.join(timeout=5)
    assert queued("dead-waiter") == []


def test_the_same_owner_re_enters_and_must_release_as_often():
    lock = FairLock("reentrant", ttl=10, owner="me")
    other = FairLock("reentrant", ttl=10, owner="someone-else")

    first = lock.acquire(timeout=1)
    assert lock.acquire(timeout=1) == first  # re-entry keeps the fencing token
    lock.release()
    with pytest.raises(LockUnavailable):
        other.acquire(timeout=0.2)  # still held once
    lock.release()

    assert other.acquire(timeout=1) > first


def test_only_the_owner_can_release_or_extend():
    lock = FairLock("owned", ttl=10, owner="me")
    intruder = FairLock("owned", ttl=10, owner="intruder")
    lock.acquire(timeout=1)

    with pytest.raises(NotLockOwner):
        intruder.release()
    with pytest.raises(NotLockOwner):
        intruder.extend()
    with pytest.raises(LockUnavailable):
        intruder.acquire(timeout=0.2)
    lock.extend(30)
    lock.release()
    with pytest.raises(NotLockOwner):
        lock.release()  # not twice


def test_a_lease_that_runs_out_frees_the_lock_with_a_newer_token_unless_extended():
    stalled = FairLock("lease", ttl=0.3, owner="stalled")
    token = stalled.acquire(timeout=1)
    stalled.extend(1.0)
    time.sleep(0.4)
    with pytest.raises(LockUnavailable):
        FairLock("lease", ttl=10, owner="next").acquire(timeout=0.1)  # extended: still held

    time.sleep(0.8)
    assert FairLock("lease", ttl=10, owner="next").acquire(timeout=1) > token
    with pytest.raises(NotLockOwner):
        stalled.release()  # its lease ran out and another owner holds the lock


def test_a_request_that_would_close_a_wait_cycle_fails_at_once_naming_it():
    a_holds_l1 = FairLock("L1", ttl=30, owner="A")
    b_holds_l2 = FairLock("L2", ttl=30, owner="B")
    a_holds_l1.acquire(timeout=1)
    b_holds_l2.acquire(timeout=1)
    thread, a_got_l2 = wait_in_thread("L2", "A")
    wait_until(lambda: queued("L2") == ["A"], what="A waiting for L2")

    # Waiting out the timeout would raise a plain LockUnavailable without the cycle.
    with pytest.raises(DeadlockDetected, match="B -> L1 -> A -> L2 -> B"):
        FairLock("L1", ttl=30, owner="B").acquire(timeout=20)
    assert queued("L1") == []  # B left no place in the queue behind

    b_holds_l2.release()
    assert a_got_l2.wait(timeout=5)
    thread.join(timeout=5)
    a_holds_l1.release()


def test_a_waiter_that_gives_up_leaves_the_queue():
    FairLock("impatient", ttl=10, owner="holder").acquire(timeout=1)

    with pytest.raises(LockUnavailable):
        FairLock("impatient", ttl=10, owner="quitter").acquire(timeout=0.3)

    assert queued("impatient") == []
    assert redis_client().hget("locks:waiting", "quitter") is None
