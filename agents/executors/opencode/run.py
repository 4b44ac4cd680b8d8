"""One task run on an OpenCode server, start to finish (docs/OPENCODE.md):

subscribe to GET /event -> POST /session -> POST /session/{id}/prompt_async (204) -> follow the
event stream, answering permission and question requests by policy, until `session.status` is
idle for our session -> re-read the messages for errors, text, tokens and cost -> the prompt's
diff. The deadline or should_abort() -> POST /abort, then TaskFailed or TaskAborted.
"""

import contextlib
import logging
import queue
import time
from pathlib import Path
from typing import Any

import httpx
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from agents.executors import TaskAborted, TaskContext, TaskFailed, TransientError

from .client import OpenCodeClient, describe_error, raise_for_status
from .events import EventStream

logger = logging.getLogger(__name__)

POLL_S = 0.5  # how often should_abort and the deadline are checked, even on a quiet stream
# A silent stream is checked against GET /session/status this often, in case an event was lost.
RECONCILE_EVERY_S = 15.0
SETTLE_AFTER_ABORT_S = 10.0


class Aborted(Exception):
    """The run must stop (the deadline passed, or should_abort said so)."""

    def __init__(self, message: str, *, cancelled: bool) -> None:
        super().__init__(message)
        self.cancelled = cancelled


TOOL_OUTPUT_LIMIT = 2000  # characters of each tool call's output kept in the result
FILE_TOOLS = {"write", "edit", "multiedit", "patch", "apply_patch"}  # tools whose changes a diff shows
DIFF_SETTLE_S = 5.0


class OpenCodeRun:
    """One task on one OpenCode session, followed until it is idle: the run's state machine."""

    def __init__(
        self,
        ctx: TaskContext,
        workspace: Path,
        *,
        api: OpenCodeClient,
        events: httpx.Client,
        server_url: str,
        model: str,
        permission_policy: dict,
        question_policy: str,
        wait_s: float,
    ) -> None:
        self.ctx = ctx
        self.workspace = workspace
        self.api = api
        self.events = events  # a client of its own for the event stream, closed with it
        self.server_url = server_url
        self.model = model
        # "provider/model", split once: each route wants the two halves in its own shape.
        self.provider_id, _, self.model_id = model.partition("/")
        self.permission_policy = permission_policy
        self.question_policy = question_policy
        self.wait_s = wait_s  # how long the stream may take to open
        self.deadline = time.monotonic() + ctx.timeout_s
        self.session_id = ""
        self.our_sessions: set[str] = set()  # our session and the sub-agent sessions it starts
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
        with EventStream(self.events) as stream:
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
            kind, item = stream.items.get(timeout=self.wait_s)
        except queue.Empty:
            raise TransientError(f"OpenCode server at {self.server_url} did not open its event stream") from None
        if kind == "denied":
            raise TaskFailed(item)
        if kind == "lost":
            raise TransientError(f"cannot subscribe to the OpenCode event stream: {item}")

    def _create_session(self) -> None:
        body: dict[str, Any] = {"title": f"{self.ctx.key}: {self.ctx.title}"[:200]}
        if self.model:  # POST /session takes {id, providerID}; a null field is a 400
            body["model"] = {"id": self.model_id, "providerID": self.provider_id}
        session = self.api.post("/session", body, "creating a session", self.partial)
        self.session_id = session["id"]
        self.our_sessions.add(self.session_id)
        logger.info("task %s runs as OpenCode session %s in %s", self.ctx.task_id, self.session_id, self.workspace)

    def _send_prompt(self) -> None:
        body: dict[str, Any] = {"parts": [{"type": "text", "text": self._prompt_text()}]}
        if self.model:  # the prompt routes take {providerID, modelID}
            body["model"] = {"providerID": self.provider_id, "modelID": self.model_id}
        try:
            response = self.api.http.post(f"/session/{self.session_id}/prompt_async", json=body)
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
            if self._on_event(item):
                return

    def _on_event(self, event: dict) -> bool:
        """Act on one event; True once our session is idle. Idempotent: idle can come twice."""
        kind = event.get("type", "")
        props = event.get("properties") or {}
        sid = props.get("sessionID")
        if kind == "session.created" and (props.get("info") or {}).get("parentID") in self.our_sessions:
            self.our_sessions.add(props["info"]["id"])
        elif sid not in self.our_sessions:
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
        for request in self.api.get("/permission", "listing permission requests", result=self.partial):
            if request.get("sessionID") in self.our_sessions:
                self._answer_permission(request)
        for request in self.api.get("/question", "listing questions", result=self.partial):
            if request.get("sessionID") in self.our_sessions:
                self._answer_question(request)
        status = self.api.get("/session/status", "reading session status", result=self.partial).get(self.session_id)
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
        policy = self.permission_policy
        permission = request.get("permission", "")
        reply = policy.get(permission, policy.get("default", "reject"))
        self.permissions.append({"permission": permission, "patterns": request.get("patterns", []), "reply": reply})
        logger.info("OpenCode asks %s on %s: replying %s", permission, request.get("patterns"), reply)
        self.api.reply(
            f"/permission/{request['id']}/reply", {"reply": reply}, "answering a permission request", self.partial
        )

    def _answer_question(self, request: dict) -> None:
        if request["id"] in self.answered:
            return
        self.answered.add(request["id"])
        questions = request.get("questions") or []
        if self.question_policy == "first_option":
            answers = [[q["options"][0]["label"]] if q.get("options") else [] for q in questions]
            self.questions.append({"questions": [q.get("question") for q in questions], "answers": answers})
            self.api.reply(
                f"/question/{request['id']}/reply", {"answers": answers}, "answering a question", self.partial
            )
        else:
            self.questions.append({"questions": [q.get("question") for q in questions], "answers": None})
            self.api.reply(f"/question/{request['id']}/reject", None, "rejecting a question", self.partial)

    def _abort_and_settle(self, stream: EventStream) -> None:
        """POST /abort, then wait (bounded) for the session to go idle so nothing runs on."""
        self._abort_quietly()
        settle_by = time.monotonic() + SETTLE_AFTER_ABORT_S
        while time.monotonic() < settle_by:
            try:
                kind, item = stream.items.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if kind == "event" and self._on_event(item):
                return
        with contextlib.suppress(TransientError, TaskFailed):
            if self.session_id not in self.api.get("/session/status", "reading session status", result=self.partial):
                return
        logger.warning("OpenCode session %s still busy %gs after abort", self.session_id, SETTLE_AFTER_ABORT_S)

    def _abort_quietly(self) -> None:
        if self.session_id:
            self.api.abort(self.session_id)

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
        model = f"{info['providerID']}/{info['modelID']}" if info.get("providerID") else self.model
        tools = [_tool_call(p) for m in assistants for p in m["parts"] if p.get("type") == "tool"]
        edited = any(t["tool"] in FILE_TOOLS and t["status"] == "completed" for t in tools)
        diff = self._diff(users[-1], edited) if users else []
        return {
            **self.partial,
            "output": text,
            "diff": diff,
            "tools": tools,
            "tokens": _token_totals(assistants),
            "cost": sum(m["info"].get("cost") or 0 for m in assistants),
            "model": model,
        }

    def _diff(self, user_message_id: str, edited: bool) -> list[dict]:
        """What this prompt changed: /session/{id}/diff with the user message id (without it
        1.18.33 returns []). Not /vcs/diff: the session's other tasks share the working tree, and
        their changes are not this prompt's (the session's result has the whole diff)."""
        params = {"messageID": user_message_id}
        # The server computes it after the session turns idle (session.diff follows session.idle):
        # when a file tool ran, an empty answer right after idle may be one step behind.
        wait_until = time.monotonic() + (DIFF_SETTLE_S if edited else 0)
        route = f"/session/{self.session_id}/diff"
        while True:
            diff = self.api.get(route, "reading the diff", params=params, result=self.partial)
            if diff or time.monotonic() >= wait_until:
                return _capped([_file_change(d) for d in diff], settings.WORKSPACE_DIFF_LIMIT)
            time.sleep(0.2)

    def _messages(self) -> list[dict]:
        return self.api.get(f"/session/{self.session_id}/message", "reading messages", result=self.partial)


def _tool_call(part: dict) -> dict:
    """A tool call of the run: which tool, its status and the tail of its output (a command's
    output is where a refusal by the sandbox shows)."""
    state = part.get("state") or {}
    output = state.get("output") or state.get("error") or ""
    return {"tool": part.get("tool"), "status": state.get("status"), "output": str(output)[-TOOL_OUTPUT_LIMIT:]}


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
