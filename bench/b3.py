"""B3 lock: our fair, fenced lock (orchestrator_project.locking.FairLock) against redis-py's Lock and
python-redis-lock on the same Redis, in the same run."""

import multiprocessing
import statistics
import threading
import time

import redis_lock

from bench import BenchError
from orchestrator_project.locking import FairLock
from orchestrator_project.redis_client import redis_client

ROUNDS = 1000  # acquire+release pairs per timed batch, uncontended
CONTENDERS = 8
CONTENDED_ROUNDS = 300  # per process
WAITERS = 50
TARGET_RATIO = 1.5
TARGET_FIFO = 100.0


def _ours():
    lock = FairLock("b3:ours", ttl=10)
    return lambda: lock.acquire(timeout=5), lock.release


def _redis_py():
    lock = redis_client().lock("b3:redis-py", timeout=10)
    return lock.acquire, lock.release


def _python_redis_lock():
    lock = redis_lock.Lock(redis_client(), "b3:python-redis-lock", expire=10)
    return lock.acquire, lock.release


LOCKS = {"ours": _ours, "redis-py Lock": _redis_py, "python-redis-lock": _python_redis_lock}


def _batch_us(make) -> float:
    """Microseconds per uncontended acquire+release, over one batch."""
    acquire, release = make()
    started = time.perf_counter()
    for _ in range(ROUNDS):
        acquire()
        release()
    return 1e6 * (time.perf_counter() - started) / ROUNDS


def uncontended(repeats: int) -> dict[str, float]:
    """Median of `repeats` batches per lock; the locks take turns batch by batch."""
    for make in LOCKS.values():
        _batch_us(make)  # warm-up: connections and script caches
    runs: dict[str, list[float]] = {name: [] for name in LOCKS}
    for _ in range(repeats):
        for name, make in LOCKS.items():
            runs[name].append(_batch_us(make))
    return {name: round(statistics.median(us), 1) for name, us in runs.items()}


def _contend(rounds: int, start, done) -> None:
    client = redis_client()
    start.wait()
    for _ in range(rounds):
        lock = FairLock("b3:contended", ttl=10)
        lock.acquire(timeout=60)
        client.incr("b3:inside")
        if int(client.get("b3:inside")) != 1:
            client.incr("b3:overlaps")
        client.decr("b3:inside")
        lock.release()
    done.put(rounds)


def contended() -> dict:
    """CONTENDERS processes acquiring one lock CONTENDED_ROUNDS times each; overlaps counts the
    times a holder found another one inside (must be 0)."""
    fork = multiprocessing.get_context("fork")
    start, done = fork.Event(), fork.Queue()
    redis_client().delete("b3:inside", "b3:overlaps")
    procs = [fork.Process(target=_contend, args=(CONTENDED_ROUNDS, start, done)) for _ in range(CONTENDERS)]
    for proc in procs:
        proc.start()
    began = time.perf_counter()
    start.set()
    acquired = sum(done.get(timeout=300) for _ in procs)
    elapsed = time.perf_counter() - began
    for proc in procs:
        proc.join(timeout=30)
    if any(proc.exitcode != 0 for proc in procs):
        raise BenchError("a contending lock process failed")
    return {
        "processes": CONTENDERS,
        "acquisitions": acquired,
        "per_second": round(acquired / elapsed),
        "overlaps": int(redis_client().get("b3:overlaps") or 0),
    }


def fifo() -> float:
    """Percent of WAITERS staggered waiters (each queued before the next asks) that got the lock
    in the order they asked."""
    holder = FairLock("b3:fifo", ttl=60, owner="b3-holder")
    holder.acquire(timeout=5)
    order: list[int] = []
    threads = []

    def wait_in_line(index: int) -> None:
        lock = FairLock("b3:fifo", ttl=60, owner=f"b3-waiter-{index}")
        lock.acquire(timeout=120)
        order.append(index)
        lock.release()

    for index in range(WAITERS):
        thread = threading.Thread(target=wait_in_line, args=(index,))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 10
        while redis_client().llen("lock:b3:fifo:queue") < index + 1:
            if time.monotonic() > deadline:
                raise BenchError(f"FIFO waiter {index} did not queue")
            time.sleep(0.002)
    holder.release()
    for thread in threads:
        thread.join(timeout=120)
    return 100.0 * sum(1 for position, index in enumerate(order) if position == index) / WAITERS


def run_b3(repeats: int) -> dict:
    latency = uncontended(repeats)
    ours = latency["ours"]
    return {
        "uncontended_us": latency,
        "ratios": {name: round(ours / us, 2) for name, us in latency.items() if name != "ours"},
        "target_ratio": TARGET_RATIO,
        "met_ratio": ours / latency["redis-py Lock"] <= TARGET_RATIO,
        "contended": contended(),
        "fifo_percent": fifo(),
        "target_fifo_percent": TARGET_FIFO,
        "measured": f"uncontended: {ROUNDS} acquire+release pairs per batch, median of {repeats} batches, "
        f"one process; contended: {CONTENDERS} processes x {CONTENDED_ROUNDS} acquisitions of one lock; "
        f"FIFO: {WAITERS} waiters, each queued before the next asks",
    }
