"""The opencode executor: drives a real `opencode serve` over its HTTP API (docs/OPENCODE.md).

One OpenCode session per task, scoped to the task's workspace with `?directory=`. The sequence:
health check (through a circuit breaker per server URL) -> subscribe to GET /event -> POST
/session -> POST /session/{id}/prompt_async (204) -> follow the event stream, answering
permission and question requests by policy, until `session.status` idle for our session ->
re-read the messages for errors, text, tokens and cost -> the prompt's diff.

What each failure becomes: the server unreachable or the circuit open -> TransientError (the
caller retries with backoff); 401 -> TaskFailed; a provider error in `info.error` /
`session.error` -> TaskFailed with the provider's message; the task deadline -> POST /abort and
TaskFailed; should_abort() -> POST /abort and TaskAborted. A prompt POST is never re-sent: the
server queues every prompt it receives, so a retry after a timeout would run the work twice.

The API facts this relies on are in /work/shared/reference/opencode-server-api.md (1.18.33).
"""

import atexit
import contextlib
import ctypes
import json
import logging
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx
import pybreaker
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from . import TaskAborted, TaskContext, TaskFailed, TransientError

logger = logging.getLogger(__name__)

CREDENTIALS_REJECTED = "OpenCode server rejected our credentials (401)"
POLL_S = 0.5  # how often should_abort and the deadline are checked, even on a quiet stream
# The server sends a heartbeat every 10 s, so a read this long without a byte means a dead stream.
STREAM_READ_TIMEOUT_S = 30.0
# A silent stream is checked against GET /session/status this often, in case an event was lost.
RECONCILE_EVERY_S = 15.0
SETTLE_AFTER_ABORT_S = 10.0
STOP_GRACE_S = 1.0
GET_ATTEMPTS = 3


class Aborted(Exception):
    """Internal: the run must stop (the deadline passed, or should_abort said so)."""

    def __init__(self, message: str, *, cancelled: bool) -> None:
        super().__init__(message)
        self.cancelled = cancelled


def error_message(response: httpx.Response) -> str:
    """The server's error text; bodies are {name, data: {message}} or {_tag, message} (or empty)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if not isinstance(body, dict):
        return str(body)[:500]
    name = body.get("name") or body.get("_tag") or ""
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    message = data.get("message") or body.get("message") or ""
    return f"{name}: {message}" if name and message else (name or message or response.reason_phrase)


def describe_error(error: dict) -> str:
    """A MessageError {name, data: {message, ...}} as 'APIError: the provider said ...'."""
    data = error.get("data") if isinstance(error.get("data"), dict) else {}
    message = data.get("message") or ""
    return f"{error.get('name', 'UnknownError')}: {message}" if message else str(error.get("name", "UnknownError"))


def _not_a_connection_failure(exc: BaseException) -> bool:
    # Only "could not talk to the server" counts against the circuit; a 401 or a bad body means
    # the server is there.
    return not isinstance(exc, httpx.TransportError)


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
        # "provider/model", split once: each route wants the two halves in its own shape.
        self.provider_id, _, self.model_id = self.model.partition("/")
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
            from agents.breakers import redis_circuit_breaker

            self._breaker, _ = redis_circuit_breaker(
                f"opencode-breaker:{self.url}",
                name=f"opencode {self.url}",
                fail_max=self.breaker_fail_max,
                reset_timeout=self.breaker_reset_s,
                exclude=[_not_a_connection_failure],
            )
        return self._breaker

    def client(self, workspace: Path | None = None) -> httpx.Client:
        auth = httpx.BasicAuth(self.username, self._password) if self._password else None
        params = {"directory": str(workspace)} if workspace else None
        return httpx.Client(base_url=self.url, auth=auth, params=params, timeout=self.request_timeout_s)

    def execute(self, ctx: TaskContext) -> dict:
        if not self.url:
            raise TaskFailed("no OpenCode server configured: set OPENCODE_URL, or start the agent with "
                             "`run_agent --executor opencode`, which starts its own")  # fmt: skip
        workspace = ctx.workspace.resolve()
        workspace.mkdir(parents=True, exist_ok=True)
        with self.client(workspace) as client:
            self.check_server(client)
            return _Run(self, client, ctx, workspace).execute()

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


def raise_for_status(response: httpx.Response, what: str, result: dict | None = None) -> None:
    if response.status_code < 400:
        return
    if response.status_code == 401:
        raise TaskFailed(CREDENTIALS_REJECTED, result=result)
    message = f"OpenCode {what} failed: HTTP {response.status_code} {error_message(response)}"
    if response.status_code >= 500:
        raise TransientError(message)
    raise TaskFailed(message, result=result)


class EventStream:
    """GET /event read by a thread into a queue, reconnecting on EOF or a read error.

    Items are ("event", dict), ("lost", reason) after the connection dropped (a new
    server.connected follows once it is back), and ("denied", reason) for a 401. The queue lets
    the run check should_abort and its deadline every POLL_S while the stream is quiet.
    """

    def __init__(self, client: httpx.Client) -> None:
        self.client = client  # its own: closed with the stream
        self.items: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(target=self._read_forever, name="opencode-events", daemon=True)

    def __enter__(self) -> "EventStream":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        sock = self._socket
        if sock is not None:
            # Closing from this thread would not wake the reader blocked in recv; shutdown does.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self.client.close()

    def _read_forever(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self._read_once()
                reason = "the server closed the event stream"
            except _Denied as exc:
                self.items.put(("denied", str(exc)))
                return
            except (httpx.HTTPError, httpx.StreamError, OSError, ValueError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if self._stop.is_set():
                return
            self.items.put(("lost", reason))
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _read_once(self) -> None:
        timeout = httpx.Timeout(self.client.timeout.connect or 10.0, read=STREAM_READ_TIMEOUT_S)
        with self.client.stream("GET", "/event", timeout=timeout) as response:
            if response.status_code == 401:
                raise _Denied(CREDENTIALS_REJECTED)
            if response.status_code >= 400:
                raise httpx.HTTPStatusError(
                    f"GET /event: HTTP {response.status_code}", request=response.request, response=response
                )
            stream = response.extensions.get("network_stream")
            self._socket = stream.get_extra_info("socket") if stream is not None else None
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith("data:"):
                    self.items.put(("event", json.loads(line[5:])))


class _Denied(Exception):
    pass


class _Run:
    """One task on one OpenCode session: the state of following it to idle."""

    def __init__(self, executor: OpenCodeExecutor, client: httpx.Client, ctx: TaskContext, workspace: Path) -> None:
        self.executor = executor
        self.client = client
        self.ctx = ctx
        self.workspace = workspace
        self.deadline = time.monotonic() + ctx.timeout_s
        self.session_id = ""
        self.family: set[str] = set()  # our session and the sub-agent sessions it starts
        self.seen_busy = False
        self.retrying = ""  # the last `retry` status message: provider trouble OpenCode retries itself
        self.errors: list[dict] = []  # session.error payloads for our session
        self.permissions: list[dict] = []
        self.questions: list[dict] = []
        self.answered: set[str] = set()
        self.last_reconcile = time.monotonic()

    @property
    def partial(self) -> dict:
        return {"opencode_session_id": self.session_id, "permissions": self.permissions, "questions": self.questions}

    def execute(self) -> dict:
        with EventStream(self.executor.client(self.workspace)) as stream:
            self._wait_connected(stream)
            self._create_session()
            try:
                try:
                    self._send_prompt()
                    self._follow(stream)
                except SoftTimeLimitExceeded:
                    # Celery's soft limit is the same deadline, counted from a little earlier.
                    raise self._deadline_passed() from None
            except Aborted as stop:
                self._abort_and_settle(stream)
                if stop.cancelled:
                    raise TaskAborted(f"{self.ctx.key}: {stop}") from None
                raise TaskFailed(str(stop), result=self._partial_result()) from None
            except (TaskFailed, TaskAborted):
                raise
            except BaseException:
                # TransientError, a bug, the worker shutting down: the session must not run on
                # unattended while the task is retried or recorded as failed.
                self._abort_quietly()
                raise
        return self._finish()

    def _wait_connected(self, stream: EventStream) -> None:
        """The stream has no replay: it must be live before the prompt is sent."""
        try:
            kind, item = stream.items.get(timeout=self.executor.request_timeout_s)
        except queue.Empty:
            raise TransientError(f"OpenCode server at {self.executor.url} did not open its event stream") from None
        if kind == "denied":
            raise TaskFailed(item)
        if kind == "lost":
            raise TransientError(f"cannot subscribe to the OpenCode event stream: {item}")

    def _create_session(self) -> None:
        body: dict[str, Any] = {"title": f"{self.ctx.key}: {self.ctx.title}"[:200]}
        if self.executor.model:  # POST /session takes {id, providerID}; a null field is a 400
            body["model"] = {"id": self.executor.model_id, "providerID": self.executor.provider_id}
        session = self._post("/session", body, "creating a session")
        self.session_id = session["id"]
        self.family.add(self.session_id)
        logger.info("task %s runs as OpenCode session %s in %s", self.ctx.task_id, self.session_id, self.workspace)

    def _send_prompt(self) -> None:
        body: dict[str, Any] = {"parts": [{"type": "text", "text": self._prompt_text()}]}
        if self.executor.model:  # the prompt routes take {providerID, modelID}
            body["model"] = {"providerID": self.executor.provider_id, "modelID": self.executor.model_id}
        try:
            response = self.client.post(f"/session/{self.session_id}/prompt_async", json=body)
        except httpx.TimeoutException:
            # The server may have queued it: never send it again (that would queue a second run).
            self._abort_quietly()
            raise TransientError(
                f"prompt_async of OpenCode session {self.session_id} timed out; it was not re-sent, "
                "the session was aborted"
            ) from None
        except httpx.TransportError as exc:
            raise TransientError(f"sending the prompt to OpenCode failed: {type(exc).__name__}: {exc}") from None
        raise_for_status(response, "prompt_async", self.partial)

    def _prompt_text(self) -> str:
        parts = [self.ctx.title.strip(), self.ctx.instructions.strip()]
        return "\n\n".join(part for part in parts if part) or self.ctx.key

    def _deadline_passed(self) -> Aborted:
        retrying = f" (OpenCode was retrying: {self.retrying})" if self.retrying else ""
        message = f"deadline of {self.ctx.timeout_s:g}s exceeded; the OpenCode session was aborted{retrying}"
        return Aborted(message, cancelled=False)

    def _follow(self, stream: EventStream) -> None:
        """Until our session is idle; raises Aborted at the deadline or when asked to stop."""
        connected_once = True
        while True:
            if self.ctx.should_abort():
                raise Aborted("stopped by the orchestrator; the OpenCode session was aborted", cancelled=True)
            if time.monotonic() >= self.deadline:
                raise self._deadline_passed()
            try:
                kind, item = stream.items.get(timeout=POLL_S)
            except queue.Empty:
                if time.monotonic() - self.last_reconcile > RECONCILE_EVERY_S and self._reconcile():
                    return
                continue
            if kind == "denied":
                raise TaskFailed(item, result=self.partial)
            if kind == "lost":
                logger.warning("OpenCode event stream lost (%s); reconnecting", item)
                connected_once = False
                continue
            if item.get("type") == "server.connected" and not connected_once:
                connected_once = True
                if self._reconcile():  # events sent while we were away are gone for good
                    return
                continue
            if self._handle(item):
                return

    def _handle(self, event: dict) -> bool:
        """Act on one event; True once our session is idle. Idempotent: idle can come twice."""
        kind = event.get("type", "")
        props = event.get("properties") or {}
        sid = props.get("sessionID")
        if kind == "session.created" and (props.get("info") or {}).get("parentID") in self.family:
            self.family.add(props["info"]["id"])
        elif sid not in self.family:
            return False
        elif kind == "permission.asked":
            self._answer_permission(props)
        elif kind == "question.asked":
            self._answer_question(props)
        elif kind == "session.error" and sid == self.session_id and props.get("error"):
            self.errors.append(props["error"])
        elif kind == "session.status" and sid == self.session_id:
            status = props.get("status") or {}
            if status.get("type") in ("busy", "retry"):
                self.seen_busy = True
                if status.get("type") == "retry":
                    self.retrying = str(status.get("message", ""))
                    logger.warning("OpenCode session %s retrying: %s", sid, self.retrying)
            return status.get("type") == "idle"
        elif kind == "session.idle" and sid == self.session_id:
            return True
        return False

    def _reconcile(self) -> bool:
        """After a gap in the stream: is our session idle? GET /session/status omits idle
        sessions, but right after the prompt it omits a session that has not started yet, so
        absent counts as idle only once we saw it busy or its last step is complete. Requests
        asked during the gap are answered here."""
        self.last_reconcile = time.monotonic()
        for request in self._get("/permission", "listing permission requests"):
            if request.get("sessionID") in self.family:
                self._answer_permission(request)
        for request in self._get("/question", "listing questions"):
            if request.get("sessionID") in self.family:
                self._answer_question(request)
        status = self._get("/session/status", "reading session status").get(self.session_id)
        if status:
            self.seen_busy = self.seen_busy or status.get("type") in ("busy", "retry")
            return False
        if self.seen_busy:
            return True
        assistants = [m["info"] for m in self._messages() if m["info"].get("role") == "assistant"]
        last = assistants[-1] if assistants else {}
        return bool((last.get("time") or {}).get("completed")) and last.get("finish") != "tool-calls"

    def _answer_permission(self, request: dict) -> None:
        if request["id"] in self.answered:
            return
        self.answered.add(request["id"])
        policy = self.executor.permission_policy
        permission = request.get("permission", "")
        reply = policy.get(permission, policy.get("default", "reject"))
        self.permissions.append({"permission": permission, "patterns": request.get("patterns", []), "reply": reply})
        logger.info("OpenCode asks %s on %s: replying %s", permission, request.get("patterns"), reply)
        self._post_reply(f"/permission/{request['id']}/reply", {"reply": reply}, "answering a permission request")

    def _answer_question(self, request: dict) -> None:
        if request["id"] in self.answered:
            return
        self.answered.add(request["id"])
        questions = request.get("questions") or []
        if self.executor.question_policy == "first_option":
            answers = [[q["options"][0]["label"]] if q.get("options") else [] for q in questions]
            self.questions.append({"questions": [q.get("question") for q in questions], "answers": answers})
            self._post_reply(f"/question/{request['id']}/reply", {"answers": answers}, "answering a question")
        else:
            self.questions.append({"questions": [q.get("question") for q in questions], "answers": None})
            self._post_reply(f"/question/{request['id']}/reject", None, "rejecting a question")

    def _post_reply(self, path: str, body: dict | None, what: str) -> None:
        try:
            response = self.client.post(path, json=body) if body is not None else self.client.post(path)
        except httpx.TransportError as exc:
            raise TransientError(f"{what} failed: {type(exc).__name__}: {exc}") from None
        if response.status_code == 404:  # answered already (or expired): nothing waits on it now
            logger.info("%s: %s", what, error_message(response))
            return
        raise_for_status(response, what, self.partial)

    def _abort_and_settle(self, stream: EventStream) -> None:
        """POST /abort, then wait (bounded) for the session to go idle so nothing runs on."""
        self._abort_quietly()
        settle_by = time.monotonic() + SETTLE_AFTER_ABORT_S
        while time.monotonic() < settle_by:
            try:
                kind, item = stream.items.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if kind == "event" and self._handle(item):
                return
        with contextlib.suppress(TransientError, TaskFailed):
            if self.session_id not in self._get("/session/status", "reading session status"):
                return
        logger.warning("OpenCode session %s still busy %gs after abort", self.session_id, SETTLE_AFTER_ABORT_S)

    def _abort_quietly(self) -> None:
        if not self.session_id:
            return
        try:
            self.client.post(f"/session/{self.session_id}/abort")
        except httpx.HTTPError as exc:
            logger.warning("aborting OpenCode session %s failed: %s", self.session_id, exc)

    def _finish(self) -> dict:
        messages = self._settled_messages()
        result = self._result(messages)
        errors = [m["info"]["error"] for m in messages if m["info"].get("error")] or self.errors
        if errors:
            error = errors[-1]
            if error.get("name") == "MessageAbortedError":
                raise TaskFailed("the OpenCode session was aborted outside the orchestrator", result=result)
            raise TaskFailed(describe_error(error), result=result)
        rejected = [p for p in self.permissions if p["reply"] == "reject"]
        if rejected:
            asked = ", ".join(f"{p['permission']} on {', '.join(p['patterns']) or '*'}" for p in rejected)
            raise TaskFailed(f"OpenCode asked for permission ({asked}) and the policy rejected it", result=result)
        return result

    def _settled_messages(self) -> list[dict]:
        """The messages once the last one is complete: on error and abort runs the final
        message.updated arrives after idle, so a read right at idle can be one step behind."""
        settle_by = time.monotonic() + 5.0
        while True:
            messages = self._messages()
            last = messages[-1]["info"] if messages else {}
            done = last.get("role") != "assistant" or (last.get("time") or {}).get("completed")
            if done or time.monotonic() > settle_by:
                return messages
            time.sleep(0.1)

    def _partial_result(self) -> dict:
        """What a stopped run got done, as far as the server can still tell."""
        try:
            return self._result(self._messages())
        except (TransientError, TaskFailed):
            return self.partial

    def _result(self, messages: list[dict]) -> dict:
        assistants = [m for m in messages if m["info"].get("role") == "assistant"]
        users = [m["info"]["id"] for m in messages if m["info"].get("role") == "user"]
        last = assistants[-1] if assistants else {"info": {}, "parts": []}
        text = "".join(
            p.get("text", "")
            for p in last["parts"]
            if p.get("type") == "text" and not p.get("synthetic") and not p.get("ignored")
        )
        info = last["info"]
        model = f"{info['providerID']}/{info['modelID']}" if info.get("providerID") else self.executor.model
        diff = self._diff(users[-1]) if users else []
        return {
            **self.partial,
            "output": text,
            "diff": diff,
            "tools": [
                {"tool": p.get("tool"), "status": (p.get("state") or {}).get("status")}
                for m in assistants
                for p in m["parts"]
                if p.get("type") == "tool"
            ],
            "tokens": _token_totals(assistants),
            "cost": sum(m["info"].get("cost") or 0 for m in assistants),
            "model": model,
        }

    def _diff(self, user_message_id: str) -> list[dict]:
        """What this prompt changed: /session/{id}/diff with the user message id (without it
        1.18.33 returns []). Not /vcs/diff: the session's other tasks share the working tree, and
        their changes are not this prompt's (the session's result has the whole diff)."""
        params = {"messageID": user_message_id}
        diff = self._get(f"/session/{self.session_id}/diff", "reading the diff", params=params)
        return _capped([_file_change(d) for d in diff], settings.WORKSPACE_DIFF_LIMIT)

    def _messages(self) -> list[dict]:
        return self._get(f"/session/{self.session_id}/message", "reading messages")

    def _post(self, path: str, body: dict, what: str) -> Any:
        try:
            response = self.client.post(path, json=body)
        except httpx.TransportError as exc:
            raise TransientError(f"{what} on OpenCode failed: {type(exc).__name__}: {exc}") from None
        raise_for_status(response, what, self.partial)
        return response.json()

    def _get(self, path: str, what: str, params: dict | None = None) -> Any:
        """GETs are safe to repeat: a few attempts before a TransientError."""
        attempt = 1
        while True:
            try:
                response = self.client.get(path, params=params)
            except httpx.TransportError as exc:
                if attempt == GET_ATTEMPTS:
                    raise TransientError(f"{what} on OpenCode failed: {type(exc).__name__}: {exc}") from None
                time.sleep(0.25 * 2**attempt)
                attempt += 1
                continue
            raise_for_status(response, what, self.partial)
            return response.json()


def _token_totals(assistants: list[dict]) -> dict:
    totals = {"input": 0, "output": 0, "reasoning": 0, "cache_read": 0, "cache_write": 0}
    for message in assistants:
        used = message["info"].get("tokens") or {}
        cache = used.get("cache") or {}
        totals["input"] += used.get("input") or 0
        totals["output"] += used.get("output") or 0
        totals["reasoning"] += used.get("reasoning") or 0
        totals["cache_read"] += cache.get("read") or 0
        totals["cache_write"] += cache.get("write") or 0
    return totals


def _file_change(entry: dict) -> dict:
    return {key: entry.get(key) for key in ("file", "additions", "deletions", "status", "patch")}


def _capped(changes: list[dict], limit: int) -> list[dict]:
    """Keep every file's name and counts; cut patches once their total passes `limit` chars."""
    left = limit
    for change in changes:
        patch = change.get("patch") or ""
        if len(patch) > left:
            change["patch"], change["patch_truncated"] = patch[: max(left, 0)], True
        left -= len(patch)
    return changes


class OpenCodeServerError(Exception):
    """`opencode serve` could not be started."""


_LISTENING = re.compile(r"opencode server listening on (https?://\S+)")
_OUR_SETTINGS = {
    "OPENCODE_URL", "OPENCODE_SERVER_USERNAME", "OPENCODE_SERVER_PASSWORD", "OPENCODE_BIN", "OPENCODE_MODEL",
    "OPENCODE_CONFIG", "OPENCODE_CONFIG_CONTENT", "OPENCODE_PERMISSION_POLICY", "OPENCODE_QUESTION_POLICY",
    "OPENCODE_REQUEST_TIMEOUT_SECONDS", "OPENCODE_BREAKER_FAIL_MAX", "OPENCODE_BREAKER_RESET_SECONDS",
}  # fmt: skip


class OpenCodeServer:
    """An `opencode serve` owned by this process: a loopback port, a generated password, a
    private HOME/XDG state directory and OPENCODE_CONFIG_CONTENT built from settings. Stopped
    by stop() or at exit; PR_SET_PDEATHSIG kills it if its parent is killed outright."""

    def __init__(
        self,
        *,
        binary: str | Path,
        config: dict,
        username: str = "opencode",
        password: str | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.binary = Path(binary)
        self.config = config
        self.username = username
        self.password = password or secrets.token_urlsafe(24)
        self.startup_timeout_s = startup_timeout_s
        self.url = ""
        self.state_dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.output: deque[str] = deque(maxlen=200)
        self._owner_pid = os.getpid()

    def __repr__(self) -> str:  # never the password
        return f"OpenCodeServer(url={self.url!r}, binary={str(self.binary)!r})"

    @classmethod
    def from_settings(cls) -> "OpenCodeServer":
        config = {"autoupdate": False, "share": "disabled", **settings.OPENCODE_CONFIG}
        if settings.OPENCODE_MODEL:
            config["model"] = settings.OPENCODE_MODEL
        return cls(binary=settings.OPENCODE_BIN, config=config, username=settings.OPENCODE_SERVER_USERNAME)

    def environ(self) -> dict[str, str]:
        """What a client of this server needs (run_agent exports it for the pool processes)."""
        return {
            "OPENCODE_URL": self.url,
            "OPENCODE_SERVER_USERNAME": self.username,
            "OPENCODE_SERVER_PASSWORD": self.password,
        }

    def start(self) -> "OpenCodeServer":
        if not os.access(self.binary, os.X_OK):
            raise OpenCodeServerError(
                f"no opencode binary at {self.binary}: run `make opencode` (npm ci) or set OPENCODE_BIN"
            )
        self.state_dir = Path(tempfile.mkdtemp(prefix="opencode-state-"))
        port = _free_port()
        self.proc = subprocess.Popen(
            [str(self.binary), "serve", "--hostname", "127.0.0.1", "--port", str(port)],
            cwd=self.state_dir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # stop() ends the server and whatever its tools started
            preexec_fn=_die_with_parent,  # one libc call between fork and exec: takes no lock
        )
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(ready,), name="opencode-serve-output", daemon=True).start()
        atexit.register(self.stop)
        if not ready.wait(self.startup_timeout_s) or not self.url:
            state = "exited" if self.proc.poll() is not None else f"not ready after {self.startup_timeout_s:g}s"
            self.stop()
            output = "".join(self.output).strip() or "(no output)"
            raise OpenCodeServerError(f"opencode serve {state}; its output:\n{output}")
        logger.info("started opencode serve (pid %s) at %s", self.proc.pid, self.url)
        return self

    def _env(self) -> dict[str, str]:
        home = self.state_dir
        # The model's bash tool inherits this environment: only what the server needs passes, never
        # the worker's secrets (SECRET_KEY, DATABASE_URL ...). Our settings share opencode's
        # OPENCODE_ prefix and one name (to opencode, OPENCODE_CONFIG is a file path); its own
        # flags (OPENCODE_DISABLE_...) and provider keys (*_API_KEY, OPENCODE_SERVER_ENV) pass.
        env = {key: value for key, value in os.environ.items() if _passes_to_server(key)}
        env.setdefault("OPENCODE_DISABLE_AUTOUPDATE", "1")  # the version is pinned in package-lock.json
        env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / "config"),
            XDG_DATA_HOME=str(home / "data"),
            XDG_CACHE_HOME=str(home / "cache"),
            XDG_STATE_HOME=str(home / "state"),
            OPENCODE_SERVER_USERNAME=self.username,
            OPENCODE_SERVER_PASSWORD=self.password,
            OPENCODE_CONFIG_CONTENT=json.dumps(self.config),
        )
        return env

    def _drain(self, ready: threading.Event) -> None:
        """Read the server's output for its ready line, then keep the pipe from filling up."""
        for line in self.proc.stdout:
            self.output.append(line)
            found = _LISTENING.search(line)
            if found and not ready.is_set():
                self.url = found.group(1).rstrip("/")
                ready.set()
        self.proc.wait()
        ready.set()  # it exited: start() reports that rather than waiting out its timeout

    def stop(self) -> None:
        if self.proc is None or os.getpid() != self._owner_pid:
            return  # forked pool processes inherit this object; only the owner stops the server
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                # 1.18.33 exits at once on SIGTERM until it has served a session; afterwards it
                # ignores it. Its state directory is thrown away, so there is nothing to flush.
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None


_SERVER_ENV = {
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
}  # fmt: skip


def _passes_to_server(key: str) -> bool:
    if key in _SERVER_ENV or key in settings.OPENCODE_SERVER_ENV or key.endswith("_API_KEY"):
        return True
    return key.startswith("OPENCODE_") and key not in _OUR_SETTINGS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # not Linux/glibc: no parent-death signal, stop() and atexit still apply
    _libc = None


def _die_with_parent() -> None:
    if _libc is not None and hasattr(_libc, "prctl"):
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; SIGKILL, as it may ignore SIGTERM


def start_server_for_worker() -> OpenCodeServer:
    """Start the agent's own `opencode serve` and point this process and its future pool
    processes at it: the environment for anything exec'd, settings for the forked children
    (settings were read before the server existed)."""
    server = OpenCodeServer.from_settings().start()
    os.environ.update(server.environ())
    settings.OPENCODE_URL = server.url
    settings.OPENCODE_SERVER_USERNAME = server.username
    settings.OPENCODE_SERVER_PASSWORD = server.password
    return server
