"""The agent this worker process serves, set by `run_agent` before the Celery worker starts.

Prefork children inherit it at fork, so run_task knows which agent it runs as.
"""

from dataclasses import dataclass, field

from .executors import Executor, build_executor


@dataclass
class AgentRuntime:
    agent_id: int
    name: str
    executor_kind: str
    executor_defaults: dict = field(default_factory=dict)
    _executor: Executor | None = None

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = build_executor(self.executor_kind, self.executor_defaults)
        return self._executor


_current: AgentRuntime | None = None


def set_current_agent(runtime: AgentRuntime) -> None:
    global _current
    _current = runtime


def current_agent() -> AgentRuntime | None:
    return _current
