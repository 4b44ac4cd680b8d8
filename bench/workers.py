"""Worker processes the benchmark starts, waits for and always stops again."""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from bench import BenchError
from bench.env import ROOT, RUN_DIR
from bench.rawapp import QUEUE as RAW_QUEUE
from bench.shapes import CAPABILITY
from orchestrator_project.celery import app

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 20.0
ORCHESTRATOR = "bench-orchestrator"  # the orchestrator worker's label and node name


@dataclass
class Worker:
    node: str  # the Celery node name, name@host, that answers ping
    proc: subprocess.Popen


class Workers:
    """Every worker this run started, by label; stop_all() ends each of them."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.running: dict[str, Worker] = {}
        RUN_DIR.mkdir(exist_ok=True)

    def orchestrator(self, concurrency: int = 2, loglevel: str = "WARNING", env: dict | None = None) -> None:
        """`env`: variables that differ from the benchmark's environment for this worker."""
        self._start(
            ORCHESTRATOR,
            ["-m", "celery", "-A", "orchestrator_project", "worker", "-Q", "orchestrator",
             "-n", f"{ORCHESTRATOR}@%h", "-c", str(concurrency), f"--loglevel={loglevel}"],
            env={**self.env, **(env or {})},
        )  # fmt: skip

    def agent(self, name: str, concurrency: int, loglevel: str = "WARNING", env: dict | None = None) -> None:
        """A scripted agent; each task's params say how long it sleeps (0 by default)."""
        self._start(
            name,
            ["manage.py", "run_agent", "--name", name, "--executor", "scripted", "--capabilities", CAPABILITY,
             "--concurrency", str(concurrency), "--duration", "0", "--loglevel", loglevel],
            env={**self.env, **(env or {})},
        )  # fmt: skip

    def raw(self, concurrency: int) -> None:
        env = {k: v for k, v in self.env.items() if k != "DJANGO_SETTINGS_MODULE"}
        self._start(
            "bench-raw",
            ["-m", "celery", "-A", "bench.rawapp", "worker", "-Q", RAW_QUEUE,
             "-n", "bench-raw@%h", "-c", str(concurrency), "--loglevel=WARNING"],
            env=env,  # no Django fix-up in the baseline worker
        )  # fmt: skip

    def _start(self, label: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = open(RUN_DIR / f"{label}.log", "wb")  # noqa: SIM115 - the child keeps it
        # A session of its own: Ctrl-C in the terminal reaches only us, and we stop the group.
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env or self.env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.running[label] = Worker(f"{label}@{socket.gethostname()}", proc)
        self._wait_ready(label)

    def _wait_ready(self, label: str) -> None:
        """Until the worker answers a ping, which it does only once it consumes its queues."""
        worker = self.running[label]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not app.control.ping(destination=[worker.node], timeout=0.5):
            if worker.proc.poll() is not None:
                raise BenchError(f"{label} exited with {worker.proc.returncode}; see .run/{label}.log")
            if time.monotonic() > deadline:
                raise BenchError(f"{label} did not answer a ping within {READY_TIMEOUT_S:g}s; see .run/{label}.log")

    def cpu_seconds(self, label: str) -> float:
        """The CPU time (user + system) the worker's processes have used so far: its process group,
        read from /proc (the main process and its pool, which live as long as the worker)."""
        group = self.running[label].proc.pid
        ticks = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with suppress(OSError):
                fields = stat.read_text().rpartition(")")[2].split()
                if int(fields[2]) == group:  # pgrp
                    ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self, label: str) -> None:
        """SIGTERM the worker's process group (a warm shutdown), then SIGKILL what is left."""
        proc = self.running.pop(label).proc
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            print(f"{label} did not stop within {STOP_GRACE_S:g}s; killing it", file=sys.stderr)
        # Prefork children share the group; none may outlive the benchmark.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def stop_all(self) -> None:
        for label in list(self.running):
            self.stop(label)
