"""B8 sandbox cost: a zero-work shell task with and without the sandbox, and how long a task's
`opencode serve` takes to start in it (docs/SECURITY.md). In process: no broker, no database."""

import logging
import statistics
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.test import override_settings

from agents.executors import TaskContext
from agents.executors.opencode.server import OpenCodeServer
from agents.executors.shell import ShellExecutor
from agents.sandbox import Sandbox

TARGET_ADDED_MS = 100.0
WORKSPACE_FILES = 200  # a small repository's worth: the sandbox gives them to its user


def _context(workspace: Path) -> TaskContext:
    return TaskContext(str(uuid.uuid4()), str(uuid.uuid4()), "b8", "zero work", "testing", "", {}, workspace, 1, 60)


def _shell_task_ms(workspace: Path, mode: str, repeats: int) -> list[float]:
    executor = ShellExecutor(commands={"testing": "true"})
    times = []
    # SANDBOX=none warns at every task start, as it should; here it is the baseline, on purpose.
    with override_settings(SANDBOX=mode), _quiet("agents.sandbox"):
        for _ in range(repeats + 1):  # the first one warms caches up and is not counted
            started = time.perf_counter()
            executor.execute(_context(workspace))
            times.append((time.perf_counter() - started) * 1000)
    return times[1:]


def _opencode_start_ms(workspace: Path, mode: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with _quiet("agents.sandbox"), Sandbox(workspace, kind=mode) as sandbox, OpenCodeServer.from_settings(sandbox):
            times.append((time.perf_counter() - started) * 1000)
    return times


@contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_b8(repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-b8-") as tmp:
        workspace = Path(tmp) / "ws"
        (workspace / "src").mkdir(parents=True)
        for n in range(WORKSPACE_FILES):
            (workspace / "src" / f"module_{n}.py").write_text(f"VALUE = {n}\n")
        shell = {mode: _shell_task_ms(workspace, mode, repeats) for mode in ("none", "bwrap")}
        opencode_repeats = min(repeats, 5)
        has_opencode = Path(settings.OPENCODE_BIN).exists()
        opencode = (
            {mode: _opencode_start_ms(workspace, mode, opencode_repeats) for mode in ("none", "bwrap")}
            if has_opencode
            else {}
        )
    bare, boxed = statistics.median(shell["none"]), statistics.median(shell["bwrap"])
    return {
        "repeats": repeats,
        "workspace_files": WORKSPACE_FILES,
        "shell_none_ms": round(bare, 1),
        "shell_bwrap_ms": round(boxed, 1),
        "added_ms": round(boxed - bare, 1),
        "target_added_ms": TARGET_ADDED_MS,
        "met": boxed - bare <= TARGET_ADDED_MS,
        "shell_runs_ms": {mode: [round(t, 1) for t in runs] for mode, runs in shell.items()},
        "opencode_start_ms": {mode: round(statistics.median(runs), 1) for mode, runs in opencode.items()},
        "opencode_repeats": opencode_repeats if has_opencode else 0,
    }
