"""`python -m bench`: prepare the bench resources, profile, start workers, run B1 to B8, report."""

import argparse
import os
import platform
import signal
import sys
from datetime import UTC, datetime
from typing import Any

from bench import BenchError
from bench.env import RUN_DIR, bench_environment, configure_django, prepare_services
from bench.report import (
    b1_text,
    b2_text,
    b3_text,
    b4_text,
    b5_text,
    b6_text,
    b7_text,
    b8_text,
    profile_text,
    write_json,
)

JSON_PATH = RUN_DIR / "bench.json"
BENCHMARKS = ("b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=9, choices=range(1, 16), metavar="1..15")
    parser.add_argument("--unit", type=float, default=0.5, help="B2's duration unit in seconds (default 0.5)")
    parser.add_argument("--skip-profile", action="store_true", help="skip the in-process SQL profile")
    parser.add_argument(
        "--only", action="append", choices=BENCHMARKS, help="run only this benchmark (repeatable; default: all)"
    )
    parser.add_argument("--million", action="store_true", help="B4: measure at 1,000,000 stored sessions too")
    parser.add_argument(
        "--broker", choices=("redis", "amqp"), default="redis", help="the Celery broker (default redis; amqp: RabbitMQ)"
    )
    args = parser.parse_args(argv)
    args.only = args.only or list(BENCHMARKS)
    if not 0.05 <= args.unit <= 5:
        parser.error("--unit must be between 0.05 and 5 seconds")
    return args


def raise_interrupt(signum: int, frame: Any) -> None:
    # `kill` or a CI timeout then cleans up exactly like Ctrl-C does.
    raise KeyboardInterrupt


def run(args: argparse.Namespace, env: dict[str, str]) -> dict:
    prepare_services(env)
    configure_django(env)
    # Imported only now: they need Django set up on the bench database.
    from bench.b1 import run_b1
    from bench.b2 import run_b2
    from bench.b3 import run_b3
    from bench.b4 import run_b4
    from bench.b5 import run_b5
    from bench.b6 import run_b6
    from bench.b7 import run_b7
    from bench.b8 import run_b8
    from bench.ours import bench_tenant, forget_earlier_runs
    from bench.queries import profile_queries
    from bench.workers import Workers
    from orchestrator_project.redis_client import redis_client

    # Messages, locks and fencing counters of an interrupted earlier run must not leak in.
    redis_client().flushdb()
    tenant = bench_tenant()
    forget_earlier_runs(tenant)
    results: dict[str, Any] = {"started_at": datetime.now(UTC).isoformat(timespec="seconds"), "host": host()}
    if not args.skip_profile and "b1" in args.only:
        print("profiling execute_task in process ...", file=sys.stderr, flush=True)
        results["profile"] = profile_queries(tenant)
        redis_client().flushdb()  # the messages the profile sent, which no worker is to run
    steps = {
        "b1": ("B1: dispatch overhead", lambda: run_b1(workers, tenant, args.repeats)),
        "b2": ("B2: makespan", lambda: run_b2(workers, tenant, args.repeats, args.unit)),
        "b3": ("B3: lock", lambda: run_b3(args.repeats)),
        "b4": ("B4: cost against history", lambda: run_b4(workers, args.million)),
        "b5": ("B5: fair share", lambda: run_b5(workers, args.repeats)),
        "b6": ("B6: observability cost", lambda: run_b6(workers, tenant, args.repeats)),
        "b7": ("B7: console and event streams", lambda: run_b7(env, tenant, args.repeats)),
        "b8": ("B8: sandbox cost", lambda: run_b8(args.repeats)),
    }
    workers = Workers(env)
    try:
        workers.orchestrator()
        for name in BENCHMARKS:
            if name in args.only:
                title, step = steps[name]
                print(f"{title} ...", file=sys.stderr, flush=True)
                results[name] = step()
    finally:
        # A second Ctrl-C must not interrupt the clean-up half-way and leave workers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        workers.stop_all()
    return results


def host() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def print_report(results: dict) -> None:
    texts = {
        "b1": b1_text,
        "b2": b2_text,
        "b3": b3_text,
        "b4": b4_text,
        "b5": b5_text,
        "b6": b6_text,
        "b7": b7_text,
        "b8": b8_text,
    }
    sections = [text(results[name]) for name, text in texts.items() if name in results]
    if "profile" in results:
        sections.append(profile_text(results["profile"]))
    print("\n\n".join(sections))
    print()
    print(write_json(results, JSON_PATH))
    print(f"(also written to {JSON_PATH})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        results = run(args, bench_environment(args.broker))
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; every worker the benchmark started is stopped", file=sys.stderr)
        return 130
    print_report(results)
    return 0
