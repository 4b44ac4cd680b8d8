"""A scriptable OpenAI-compatible chat-completions server, so that the real `opencode serve` can
run offline in tests and in the demo.

A script is a list of steps (dicts, or JSON in a file). A step is chosen for a request by its
`when` substring, looked for in the last user message; steps without `when` are consumed in
order by requests that no `when` matched. Each step does one thing:

    {"when": "WRITE", "write": {"path": "hello.txt", "content": "hi\\n"}, "then": "Done."}
    {"when": "RUN", "tool": "bash", "args": {"command": "ls", "description": "List"}, "then": "Listed."}
    {"when": "HELLO", "text": "Hello!"}
    {"when": "FAIL", "fail": {"status": 400, "message": "model not found"}}
    {"when": "SLOW", "text": "one two three", "delay": 0.5}          # a delay between chunks
    {"when": "FOREVER", "text": "tick ", "delay": 0.2, "forever": true}

`write` and `tool` answer with a tool call (opencode's `write` tool takes filePath and content; a
relative path is made absolute against the working directory opencode puts in its system
prompt); once the tool's result comes back (a `tool` message last), the reply is the step's
`then` text ("Done." by default). A request that offers no tools is opencode's title request
and gets a short title. Anything else gets the default text.

Streaming answers are `chat.completion.chunk` SSE lines, a usage chunk, `data: [DONE]`, and then
the connection is closed: opencode waits for the end of the body, so a kept-alive connection
would hang it mid-step. Every request is recorded (`MockLLM.requests`) for tests to inspect.
"""

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MODEL_ID = "mock-model"
DEFAULT_TEXT = "OK."
TITLE = "Mock session"
_WORKDIR = re.compile(r"Working directory:\s*(\S+)")


@dataclass
class Recorded:
    path: str
    body: dict
    step: dict | None = None


@dataclass
class Script:
    steps: list[dict] = field(default_factory=list)
    _cursor: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def replace(self, steps: list[dict]) -> None:
        for step in steps:
            _check_step(step)
        with self._lock:
            self.steps = list(steps)
            self._cursor = 0

    def choose(self, prompt: str, *, continuing: bool) -> dict | None:
        """The step for a request whose last user message is `prompt`. A continuation (a tool
        result came back) reuses the triggered step without consuming an unnamed one."""
        with self._lock:
            for step in self.steps:
                if step.get("when") and step["when"] in prompt:
                    return step
            if continuing:
                return None
            unnamed = [s for s in self.steps if not s.get("when")]
            if self._cursor < len(unnamed):
                self._cursor += 1
                return unnamed[self._cursor - 1]
            return None


_KINDS = ("write", "tool", "text", "fail")


def _check_step(step: dict) -> None:
    if not isinstance(step, dict) or sum(kind in step for kind in _KINDS) != 1:
        raise ValueError(f"a script step needs exactly one of {', '.join(_KINDS)}: {step!r}")


def load_script(path: str | Path) -> list[dict]:
    steps = json.loads(Path(path).read_text())
    if not isinstance(steps, list):
        raise ValueError(f"{path}: a script is a JSON list of steps")
    for step in steps:
        _check_step(step)
    return steps


def provider_config(base_url: str, provider: str = "mock") -> dict:
    """The opencode config block that makes `<provider>/mock-model` the mock LLM at `base_url`
    (reference §4)."""
    return {
        "model": f"{provider}/{MODEL_ID}",
        "small_model": f"{provider}/{MODEL_ID}",
        "provider": {
            provider: {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Mock LLM",
                "options": {"baseURL": base_url, "apiKey": "mock-key"},
                "models": {MODEL_ID: {"name": "Mock model", "tool_call": True}},
            }
        },
    }


class MockLLM:
    """The server; `start()` runs it in a daemon thread (port 0 picks a free port)."""

    def __init__(self, steps: list[dict] | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.script = Script()
        self.script.replace(steps or [])
        self.requests: list[Recorded] = []
        self._requests_lock = threading.Lock()
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.mock = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.httpd.server_address[0]}:{self.port}/v1"

    def set_script(self, steps: list[dict]) -> None:
        self.script.replace(steps)

    def record(self, entry: Recorded) -> None:
        with self._requests_lock:
            self.requests.append(entry)

    def tool_requests(self) -> list[Recorded]:
        """The requests that offered tools (the agent's steps, not title requests)."""
        with self._requests_lock:
            return [r for r in self.requests if r.body.get("tools")]

    def provider_config(self, provider: str = "mock") -> dict:
        return provider_config(self.base_url, provider)

    def start(self) -> "MockLLM":
        # A short poll interval: stop() (shutdown) waits for the serving loop's next poll.
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="mockllm", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.stopping.set()  # ends endless streams
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)


def _last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _workdir(messages: list[dict]) -> str | None:
    for message in messages:
        if message.get("role") == "system":
            found = _WORKDIR.search(_text_of(message.get("content")))
            if found:
                return found.group(1)
    return None


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: the connection closes after every response, which is what ends opencode's read.
    protocol_version = "HTTP/1.0"
    server_version = "mockllm/1"

    @property
    def mock(self) -> MockLLM:
        return self.server.mock  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read `requests`; the access log would only be noise

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "mockllm"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
            return
        messages = body.get("messages") or []
        continuing = bool(messages) and messages[-1].get("role") == "tool"
        step = None
        if body.get("tools"):
            step = self.mock.script.choose(_last_user_text(messages), continuing=continuing)
        self.mock.record(Recorded(self.path, body, step))
        answer = self._answer(body, messages, step, continuing)
        if "fail" in answer:
            self._fail(answer["fail"])
        elif body.get("stream"):
            self._stream(answer)
        else:
            self._complete(answer)

    def _answer(self, body: dict, messages: list[dict], step: dict | None, continuing: bool) -> dict:
        """What to reply: {"text": ...} or {"call": (name, arguments)} or {"fail": ...}, plus pacing."""
        if not body.get("tools"):
            return {"text": TITLE}
        if step is None:
            return {"text": DEFAULT_TEXT}
        pacing = {"delay": float(step.get("delay", 0)), "forever": bool(step.get("forever"))}
        if "fail" in step:
            return {"fail": step["fail"]}
        if continuing and ("write" in step or "tool" in step):
            return {"text": step.get("then", "Done."), **pacing}
        if "write" in step:
            path = step["write"]["path"]
            workdir = _workdir(messages)
            if workdir and not path.startswith("/"):
                path = f"{workdir.rstrip('/')}/{path}"
            return {"call": ("write", {"filePath": path, "content": step["write"].get("content", "")}), **pacing}
        if "tool" in step:
            return {"call": (step["tool"], step.get("args", {})), **pacing}
        return {"text": step["text"], **pacing}

    def _fail(self, fail: dict | int) -> None:
        fail = {"status": fail} if isinstance(fail, int) else fail
        status = int(fail.get("status", 500))
        message = fail.get("message") or HTTPStatus(status).phrase
        body = fail.get("body") or {"error": {"message": message, "type": "invalid_request_error", "code": status}}
        self._json(status, body)

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _complete(self, answer: dict) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": answer.get("text")}
        finish = "stop"
        if "call" in answer:
            name, arguments = answer["call"]
            message["tool_calls"] = [_tool_call(name, arguments)]
            finish = "tool_calls"
        self._json(
            200,
            {
                "id": "chatcmpl-mock",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": MODEL_ID,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": _usage(answer),
            },
        )

    def _stream(self, answer: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self._chunk({"role": "assistant", "content": ""})
            if "call" in answer:
                name, arguments = answer["call"]
                self._pause(answer)
                self._chunk({"tool_calls": [{"index": 0, **_tool_call(name, arguments)}]})
                finish = "tool_calls"
            else:
                self._stream_text(answer)
                finish = "stop"
            self._chunk({}, finish_reason=finish)
            self._send({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": MODEL_ID, "choices": [], "usage": _usage(answer)})  # fmt: skip
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # opencode aborted the step and closed its end
        self.close_connection = True

    def _stream_text(self, answer: dict) -> None:
        words = re.findall(r"\S+\s*", answer["text"]) or [answer["text"]]
        while True:
            for word in words:
                self._pause(answer)
                self._chunk({"content": word})
            if not answer.get("forever") or self.mock.stopping.is_set():
                return

    def _pause(self, answer: dict) -> None:
        if answer.get("delay"):
            self.mock.stopping.wait(answer["delay"])

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> None:
        self._send(
            {
                "id": "chatcmpl-mock",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": MODEL_ID,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
        )

    def _send(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()


def _tool_call(name: str, arguments: dict) -> dict:
    return {"id": f"call_{name}_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _usage(answer: dict) -> dict:
    output = len(answer.get("text") or "") // 4 + (20 if "call" in answer else 1)
    return {"prompt_tokens": 100, "completion_tokens": output, "total_tokens": 100 + output}
