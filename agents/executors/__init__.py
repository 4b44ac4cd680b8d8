"""Executors: the one port through which an agent does a task's work.

Each adapter takes a TaskContext and returns a result dict, or raises TaskFailed (a business
failure: recorded, never retried) or TransientError (retried with backoff up to max_attempts).
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class TaskFailed(Exception):
    """The task ran and failed; the message is recorded as the task's error, `result` as its result."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result or {}


class TransientError(Exception):
    """The executor could not run the task this time (network, busy tool); try again later."""


class TaskAborted(Exception):
    """An operator stopped the session (or fail-fast did) while the task ran; the executor gave up."""


def never() -> bool:
    return False


@dataclass(frozen=True)
class TaskContext:
    task_id: str
    session_id: str
    key: str
    title: str
    capability: str
    instructions: str
    params: dict
    workspace: Path
    attempt: int
    timeout_s: float
    # Polled by long-running executors; True once the task should stop (cancel, stop, fail-fast).
    should_abort: Callable[[], bool] = never
    # The agent the task is pinned to, if any (the eap executor hands it to that external agent only).
    pinned_agent: str = ""


class Executor(Protocol):
    kind: str

    def execute(self, ctx: TaskContext) -> dict: ...


# kind -> module and class; a worker imports only the adapter it runs.
EXECUTORS = {
    "scripted": ("scripted", "ScriptedExecutor"),
    "shell": ("shell", "ShellExecutor"),
    "opencode": ("opencode", "OpenCodeExecutor"),
    "eap": ("eap", "EapExecutor"),
}


def build_executor(kind: str, defaults: dict | None = None) -> Executor:
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(sorted(EXECUTORS))}")
    module, name = EXECUTORS[kind]
    executor_class = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return executor_class(**(defaults or {}))
