"""The opencode executor: drives a real `opencode serve` over its HTTP API (docs/OPENCODE.md).

One `opencode serve` per task, started in the task's sandbox (agents.sandbox) and stopped when
the task ends, so no server is ever shared by two sessions or tenants; one OpenCode session on
it, scoped to the task's workspace with `?directory=`. (OPENCODE_URL, allowed only with
SANDBOX=none, names a server someone else runs; it is health-checked through a circuit breaker.)
The modules: client (the HTTP calls and what their errors become), events (the /event stream),
run (one task's run, start to finish) and server (the `opencode serve` a task starts).

What each failure becomes: the server not starting, unreachable or its circuit open -> TransientError (the
caller retries with backoff); 401 -> TaskFailed; a provider error in `info.error` /
`session.error` -> TaskFailed with the provider's message; the task deadline -> POST /abort and
TaskFailed; should_abort() -> POST /abort and TaskAborted. A prompt POST is never re-sent: the
server queues every prompt it receives, so a retry after a timeout would run the work twice.

The API facts this relies on are in docs/reference/opencode-server-api.md (1.18.33).
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pybreaker
from django.conf import settings

from agents.breakers import redis_circuit_breaker
from agents.executors import TaskContext, TaskFailed, TransientError
from agents.sandbox import Sandbox, SandboxError

from .client import OpenCodeClient, error_message, raise_for_status
from .run import OpenCodeRun
from .server import OpenCodeServer, OpenCodeServerError

__all__ = [
    "OpenCodeExecutor",
    "OpenCodeServer",
    "OpenCodeServerError",
    "error_message",
]

logger = logging.getLogger(__name__)


def _sandbox_report(sandbox: Sandbox | None) -> dict:
    return {"sandbox": sandbox.report()} if sandbox is not None else {}


def _not_a_connection_failure(exc: BaseException) -> bool:
    # Only "could not talk to the server" counts against the circuit; a 401 or a bad body means
    # the server is there.
    return not isinstance(exc, httpx.TransportError)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach one `opencode serve`: a URL, or a Unix socket (a sandboxed server)."""

    url: str
    username: str
    password: str = field(repr=False)
    socket: Path | None = None

    def client(self, workspace: Path | None, timeout_s: float) -> httpx.Client:
        auth = httpx.BasicAuth(self.username, self.password) if self.password else None
        params = {"directory": str(workspace)} if workspace else None
        transport = httpx.HTTPTransport(uds=str(self.socket)) if self.socket else None
        return httpx.Client(base_url=self.url, auth=auth, params=params, timeout=timeout_s, transport=transport)


class OpenCodeExecutor:
    kind = "opencode"

    def __init__(
        self,
        url: str | None = None,
        username: str | None = None,
        password: str | None = None,
        model: str | None = None,
        permission_policy: dict | None = None,
        question_policy: str | None = None,
        request_timeout_s: float | None = None,
        breaker_fail_max: int | None = None,
        breaker_reset_s: float | None = None,
    ) -> None:
        self.url = (url if url is not None else settings.OPENCODE_URL).rstrip("/")
        self.username = username or settings.OPENCODE_SERVER_USERNAME
        self._password = password if password is not None else settings.OPENCODE_SERVER_PASSWORD
        self.model = model if model is not None else settings.OPENCODE_MODEL
        self.permission_policy = permission_policy or settings.OPENCODE_PERMISSION_POLICY
        self.question_policy = question_policy or settings.OPENCODE_QUESTION_POLICY
        self.request_timeout_s = request_timeout_s or settings.OPENCODE_REQUEST_TIMEOUT_SECONDS
        self.breaker_fail_max = breaker_fail_max or settings.OPENCODE_BREAKER_FAIL_MAX
        self.breaker_reset_s = breaker_reset_s or settings.OPENCODE_BREAKER_RESET_SECONDS
        self._breaker: pybreaker.CircuitBreaker | None = None

    def __repr__(self) -> str:  # never the password
        return f"OpenCodeExecutor(url={self.url!r}, username={self.username!r})"

    @property
    def breaker(self) -> pybreaker.CircuitBreaker:
        """The circuit of this server URL, shared by every process through Redis (agents.breakers)."""
        if self._breaker is None:
            self._breaker, _ = redis_circuit_breaker(
                f"opencode-breaker:{self.url}",
                name=f"opencode {self.url}",
                fail_max=self.breaker_fail_max,
                reset_timeout=self.breaker_reset_s,
                exclude=[_not_a_connection_failure],
            )
        return self._breaker

    def execute(self, ctx: TaskContext) -> dict:
        workspace = ctx.workspace.resolve()
        workspace.mkdir(parents=True, exist_ok=True)
        if self.url:  # a server someone else runs (SANDBOX=none only)
            endpoint = Endpoint(self.url, self.username, self._password)
            with endpoint.client(workspace, self.request_timeout_s) as http:
                self.check_server(http)
            return self._run(ctx, workspace, endpoint)
        with Sandbox(workspace) as sandbox:
            try:
                server = OpenCodeServer.from_settings(sandbox).start()
            except (OpenCodeServerError, SandboxError) as exc:
                raise TransientError(f"cannot start the task's OpenCode server: {exc}") from None
            try:
                endpoint = Endpoint(server.url, server.username, server.password, server.socket)
                return self._run(ctx, workspace, endpoint, sandbox)
            except TransientError:
                if server.proc.poll() is None:
                    raise
                # Not worth a retry: the same work would end the same way.
                exited = sandbox.explain(server.proc.returncode) or f"exit code {server.proc.returncode}"
                logger.warning(
                    "task %s: its OpenCode server stopped (%s); its last output: %r",
                    ctx.task_id,
                    exited,
                    server.last_output(),
                )
                raise TaskFailed(
                    f"the task's OpenCode server stopped during the task ({exited}); the sandbox's limits: "
                    f"{sandbox.limits.describe()}",
                    result=_sandbox_report(sandbox),
                ) from None
            finally:
                server.stop()

    def _run(self, ctx: TaskContext, workspace: Path, endpoint: Endpoint, sandbox: Sandbox | None = None) -> dict:
        """One task on the server at `endpoint`; the result says what the sandbox refused."""
        with endpoint.client(workspace, self.request_timeout_s) as http:
            run = OpenCodeRun(
                ctx,
                workspace,
                api=OpenCodeClient(http),
                events=endpoint.client(workspace, self.request_timeout_s),
                server_url=endpoint.url,
                model=self.model,
                permission_policy=self.permission_policy,
                question_policy=self.question_policy,
                wait_s=self.request_timeout_s,
            )
            try:
                result = run.execute()
            except TaskFailed as failed:
                failed.result.update(_sandbox_report(sandbox))
                raise
        return {**result, **_sandbox_report(sandbox)}

    def check_server(self, client: httpx.Client) -> None:
        """GET /global/health through the circuit breaker: TransientError while it is open."""
        try:
            body = self.breaker.call(self._health, client)
        except pybreaker.CircuitBreakerError:
            raise TransientError(
                f"circuit open for the OpenCode server at {self.url} after {self.breaker.fail_counter} "
                f"connection failures: not calling it for up to {self.breaker_reset_s:g}s"
            ) from None
        except httpx.TransportError as exc:
            raise TransientError(f"OpenCode server at {self.url} is unreachable: {type(exc).__name__}: {exc}") from None
        if not body.get("healthy"):
            raise TransientError(f"OpenCode server at {self.url} reports itself unhealthy: {body}")

    def _health(self, client: httpx.Client) -> dict:
        response = client.get("/global/health")
        raise_for_status(response, "health check")
        return response.json()
