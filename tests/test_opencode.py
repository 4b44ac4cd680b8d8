"""The opencode executor against the REAL `opencode serve` (node_modules, `make opencode`) and the
mock LLM (mockllm), offline. One server and one mock serve the whole module; each test scripts
the mock for its prompt. The server asks before every edit ("permission": {"edit": "ask"}), so
every write goes through the executor's permission policy."""

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from agents.executors import TaskAborted, TaskContext, TaskFailed, TransientError, build_executor
from agents.executors.opencode import (
    OpenCodeExecutor,
    OpenCodeServer,
    OpenCodeServerError,
    error_message,
)
from agents.models import Agent
from mockllm import MockLLM
from orchestrator_project.redis_client import redis_client
from tasks.models import Task
from tests.conftest import (
    commit_repository,
    create_and_start,
    executor_context,
    member_client,
    wait_for_status,
    wait_until,
)
from tests.test_settings import import_settings

ONCE = {"default": "reject", "edit": "once"}


@pytest.fixture(scope="module")
def mock():
    llm = MockLLM().start()
    yield llm
    llm.stop()


@pytest.fixture(scope="module")
def server(mock):
    if not Path(settings.OPENCODE_BIN).exists():
        pytest.fail(f"no opencode binary at {settings.OPENCODE_BIN}: run `make opencode`")
    config = {**mock.provider_config(), "permission": {"edit": "ask"}, "autoupdate": False, "share": "disabled"}
    running = OpenCodeServer(binary=settings.OPENCODE_BIN, config=config).start()
    yield running
    running.stop()


def git_workspace(path: Path) -> Path:
    return commit_repository(path, {"README.md": "# demo\n"})


@pytest.fixture(scope="module")
def warm_workspace(server, mock, tmp_path_factory):
    """A git workspace the server has opened once already: the first prompt in a directory spends
    seconds setting it up, which tests with a deadline must not pay and the others need not.
    Each test writes files of its own name; a result's diff is that prompt's alone."""
    workspace = git_workspace(tmp_path_factory.mktemp("warm") / "ws")
    mock.set_script([{"when": "WARM", "text": "Warm."}])
    executor_for(server).execute(context(workspace, "WARM up"))
    return workspace


def executor_for(server: OpenCodeServer, **overrides) -> OpenCodeExecutor:
    options = {"url": server.url, "password": server.password, "permission_policy": ONCE, **overrides}
    return OpenCodeExecutor(**options)


def context(workspace: Path, prompt: str, *, timeout: float = 60, should_abort=lambda: False) -> TaskContext:
    return executor_context(workspace, prompt, capability="code_generation", timeout=timeout, should_abort=should_abort)


def api(server: OpenCodeServer, workspace: Path) -> httpx.Client:
    auth = (server.username, server.password)
    return httpx.Client(base_url=server.url, auth=auth, params={"directory": str(workspace)}, timeout=10)


def newest_session(server: OpenCodeServer, workspace: Path) -> str:
    with api(server, workspace) as client:
        sessions = [s for s in client.get("/session").json() if s["directory"] == str(workspace)]
    return sessions[0]["id"]


def assert_aborted_and_idle(server: OpenCodeServer, workspace: Path, session_id: str) -> None:
    with api(server, workspace) as client:
        assert session_id not in client.get("/session/status").json()  # absent means idle
        messages = client.get(f"/session/{session_id}/message").json()
    last = messages[-1]["info"]
    assert last["role"] == "assistant"
    assert last["error"]["name"] == "MessageAbortedError"


def test_a_prompt_that_writes_a_file_completes_with_the_file_on_disk_and_in_the_diff(server, mock, warm_workspace):
    workspace = warm_workspace
    mock.set_script([{"when": "WRITE", "write": {"path": "hello.txt", "content": "hi\n"}, "then": "Done."}])

    result = executor_for(server).execute(context(workspace, "Please WRITE hello.txt"))

    assert (workspace / "hello.txt").read_text() == "hi\n"
    assert result["opencode_session_id"].startswith("ses_")
    assert result["output"] == "Done."
    assert [(d["file"], d["status"], d["additions"], d["deletions"]) for d in result["diff"]] == [
        ("hello.txt", "added", 1, 0)
    ]
    assert "+hi" in result["diff"][0]["patch"]
    assert result["permissions"] == [{"permission": "edit", "patterns": ["hello.txt"], "reply": "once"}]
    assert result["tools"] == [{"tool": "write", "status": "completed", "output": "Wrote file successfully."}]
    assert result["model"] == "mock/mock-model"
    assert result["tokens"]["input"] > 0 and result["tokens"]["output"] > 0
    # What opencode sent the model: our prompt, with its write tool on offer.
    first = mock.tool_requests()[-2].body
    assert "Please WRITE hello.txt" in str(first["messages"][-1]["content"])
    assert "write" in {tool["function"]["name"] for tool in first["tools"]}


def test_an_edit_the_policy_rejects_fails_the_task_and_writes_nothing(server, mock, warm_workspace):
    workspace = warm_workspace
    mock.set_script([{"when": "WRITE", "write": {"path": "nope.txt", "content": "no\n"}}])
    executor = executor_for(server, permission_policy={"default": "once", "edit": "reject"})

    with pytest.raises(TaskFailed, match=r"permission \(edit on nope.txt\) and the policy rejected it") as raised:
        executor.execute(context(workspace, "WRITE nope.txt"))

    assert not (workspace / "nope.txt").exists()
    assert raised.value.result["permissions"] == [{"permission": "edit", "patterns": ["nope.txt"], "reply": "reject"}]
    [tool] = raised.value.result["tools"]
    assert (tool["tool"], tool["status"]) == ("write", "error") and "rejected" in tool["output"], tool


def test_a_question_is_answered_with_its_first_option(server, mock, warm_workspace):
    question = {"question": "Which colour?", "header": "Colour", "options": [
        {"label": "Blue", "description": "the sea"}, {"label": "Red", "description": "the sun"}]}  # fmt: skip
    mock.set_script([{"when": "ASK", "tool": "question", "args": {"questions": [question]}, "then": "Blue it is."}])

    # With a model configured, each route gets it in its own shape (a wrong one is a 400).
    result = executor_for(server, model="mock/mock-model").execute(context(warm_workspace, "ASK me"))

    assert result["questions"] == [{"questions": ["Which colour?"], "answers": [["Blue"]]}]
    assert result["output"] == "Blue it is."
    tool_message = mock.tool_requests()[-1].body["messages"][-1]
    assert tool_message["role"] == "tool" and "Blue" in str(tool_message["content"])


def test_cancel_during_a_slow_stream_aborts_the_session_and_raises_task_aborted(server, mock, warm_workspace):
    mock.set_script([{"when": "SLOW", "text": "word " * 200, "delay": 0.1}])
    streaming = threading.Event()
    seen = len(mock.tool_requests())

    def cancel_once_streaming():
        wait_until(lambda: len(mock.tool_requests()) > seen, timeout=30, what="the model request")
        streaming.set()

    threading.Thread(target=cancel_once_streaming, daemon=True).start()

    with pytest.raises(TaskAborted, match="stopped by the orchestrator"):
        executor_for(server).execute(context(warm_workspace, "go SLOW", should_abort=streaming.is_set))

    assert_aborted_and_idle(server, warm_workspace, newest_session(server, warm_workspace))


def test_the_task_deadline_aborts_a_slow_stream(server, mock, warm_workspace):
    mock.set_script([{"when": "SLOW", "text": "word " * 300, "delay": 0.1}])

    with pytest.raises(TaskFailed, match=r"deadline of 3s exceeded; the OpenCode session was aborted") as raised:
        executor_for(server).execute(context(warm_workspace, "go SLOW", timeout=3))

    assert_aborted_and_idle(server, warm_workspace, raised.value.result["opencode_session_id"])
    assert raised.value.result["output"].startswith("word word")  # what streamed before the abort


def test_a_session_that_never_goes_idle_is_aborted_at_the_deadline_and_nothing_hangs(server, mock, warm_workspace):
    mock.set_script([{"when": "FOREVER", "text": "tick ", "delay": 0.05, "forever": True}])
    outcome = {}

    def run():
        try:
            executor_for(server).execute(context(warm_workspace, "stream FOREVER", timeout=3))
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    wait_until(lambda: not worker.is_alive(), timeout=45, what="execute to return after its deadline")

    assert isinstance(outcome.get("error"), TaskFailed), outcome
    assert "deadline of 3s exceeded" in str(outcome["error"])
    assert_aborted_and_idle(server, warm_workspace, outcome["error"].result["opencode_session_id"])


def test_a_provider_that_keeps_answering_429_is_retried_by_opencode_until_our_deadline(server, mock, warm_workspace):
    mock.set_script([{"when": "BUSY", "fail": {"status": 429, "message": "rate limited, slow down"}}])

    with pytest.raises(TaskFailed, match=r"deadline of 4s exceeded.*OpenCode was retrying: .*rate limited"):
        executor_for(server).execute(context(warm_workspace, "BUSY provider", timeout=4))


def test_a_provider_error_fails_the_task_with_the_providers_message(server, mock, warm_workspace):
    mock.set_script([{"when": "BROKEN", "fail": {"status": 400, "message": "model mock-model does not exist"}}])

    with pytest.raises(TaskFailed, match=r"^APIError: model mock-model does not exist$") as raised:
        executor_for(server).execute(context(warm_workspace, "BROKEN request"))

    assert raised.value.result["opencode_session_id"].startswith("ses_")


def test_wrong_credentials_fail_clearly_and_no_password_is_logged_or_returned(server, mock, warm_workspace, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-password-6f1c2a"
    mock.set_script([{"when": "HELLO", "text": "Hello!"}])

    with pytest.raises(TaskFailed, match=r"^OpenCode server rejected our credentials \(401\)$") as raised:
        executor_for(server, password=wrong).execute(context(warm_workspace, "HELLO"))
    result = executor_for(server).execute(context(warm_workspace, "HELLO"))

    assert result["output"] == "Hello!"
    everything = (
        caplog.text + repr([r.__dict__ for r in caplog.records]) + str(raised.value) + repr(raised.value.result)
    )
    everything += repr(result) + repr(executor_for(server)) + repr(server)
    assert server.password not in everything and wrong not in everything
    assert any(r.name.startswith("agents.executors.opencode") for r in caplog.records)


class Proxy:
    """A TCP forwarder to the OpenCode server on a port of its own: closed, it is a server that is
    down; it counts the connections made to it and can cut them all."""

    def __init__(self, upstream: str) -> None:
        self.upstream = httpx.URL(upstream)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self._open: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of its thread
            self._listener.close()
            self._listener = None
        self.cut()

    def cut(self) -> None:
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection((self.upstream.host, self.upstream.port))
            self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def test_a_down_server_opens_the_circuit_which_closes_again_once_it_is_back(server, mock, warm_workspace):
    proxy = Proxy(server.url)  # not started: connections are refused
    executor = executor_for(server, url=proxy.url, breaker_fail_max=2, breaker_reset_s=2)
    mock.set_script([{"when": "HELLO", "text": "Back."}])
    ctx = context(warm_workspace, "HELLO again")

    with pytest.raises(TransientError, match="is unreachable: ConnectError"):
        executor.execute(ctx)
    with pytest.raises(TransientError, match="circuit open"):
        executor.execute(ctx)  # the second failure opens it
    assert executor.breaker.current_state == "open"
    # The state is in Redis: another pool process's executor sees the same open circuit.
    assert OpenCodeExecutor(url=proxy.url, password=server.password).breaker.current_state == "open"

    proxy.start()
    try:
        with pytest.raises(TransientError, match="circuit open"):
            executor.execute(ctx)
        assert proxy.connections == 0  # while open, the server is not even called

        def trial():
            try:
                return executor.execute(ctx)
            except TransientError as exc:
                assert "circuit open" in str(exc)
                return None

        result = wait_until(trial, timeout=20, interval=0.2, what="the circuit to let a trial call through")
    finally:
        proxy.stop()

    assert result["output"] == "Back."
    assert proxy.connections > 0
    assert executor.breaker.current_state == "closed"
    assert redis_client().get(f"opencode-breaker:{proxy.url}:pybreaker:state") == b"closed"


def test_a_dropped_event_stream_is_reconnected_and_the_run_still_completes(server, mock, warm_workspace, caplog):
    proxy = Proxy(server.url)
    proxy.start()
    mock.set_script([{"when": "DROP", "text": "one two three four five six seven eight", "delay": 0.25}])
    seen = len(mock.tool_requests())

    def cut_once_streaming():
        wait_until(lambda: len(mock.tool_requests()) > seen, timeout=30, what="the model request")
        proxy.cut()

    threading.Thread(target=cut_once_streaming, daemon=True).start()
    try:
        result = executor_for(server, url=proxy.url).execute(context(warm_workspace, "DROP the stream"))
    finally:
        proxy.stop()

    assert result["output"] == "one two three four five six seven eight"
    assert "OpenCode event stream lost" in caplog.text


def test_a_task_whose_server_cannot_start_is_retried_later_saying_why(tmp_path, settings):
    settings.OPENCODE_BIN = str(tmp_path / "missing")

    with pytest.raises(TransientError, match="cannot start the task's OpenCode server: no opencode binary at"):
        OpenCodeExecutor(url="").execute(context(tmp_path / "ws", "anything"))


def test_build_executor_knows_opencode():
    assert isinstance(build_executor("opencode", {"url": "http://127.0.0.1:1"}), OpenCodeExecutor)


def test_a_server_that_dies_at_startup_is_reported_with_its_output(tmp_path):
    binary = tmp_path / "opencode"
    binary.write_text("#!/bin/sh\necho 'Error: something is misconfigured'\nexit 3\n")
    binary.chmod(0o755)

    with pytest.raises(OpenCodeServerError, match=r"exited; its output:\nError: something is misconfigured"):
        OpenCodeServer(binary=binary, config={}).start()
    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\necho 'starting...'\nexec sleep 60\n")
    silent.chmod(0o755)
    with pytest.raises(OpenCodeServerError, match=r"not ready after 0.5s; its output:\nstarting..."):
        OpenCodeServer(binary=silent, config={}, startup_timeout_s=0.5).start()
    with pytest.raises(OpenCodeServerError, match="no opencode binary at"):
        OpenCodeServer(binary=tmp_path / "missing", config={}).start()


def test_a_servers_last_output_is_read_to_its_end_bounded_and_without_the_secrets_it_was_given(
    monkeypatch, settings, tmp_path
):
    settings.OPENCODE_SERVER_ENV = ["AWS_ACCESS_KEY_ID"]
    monkeypatch.setenv("ANTHROPIC_API_KEY", "provider-key-123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "aws-key-456")
    binary = tmp_path / "opencode"
    binary.write_text(
        "#!/bin/sh\necho 'opencode server listening on http://127.0.0.1:1'\nsleep 0.3\n"
        'echo "password $OPENCODE_SERVER_PASSWORD key $ANTHROPIC_API_KEY aws $AWS_ACCESS_KEY_ID"\n'
        "head -c 10000 /dev/zero | tr '\\0' x; echo\necho 'panic: Illegal instruction'\nexit 132\n"
    )
    binary.chmod(0o755)
    server = OpenCodeServer(binary=binary, config={}).start()
    try:
        server.proc.wait(timeout=10)
        output = server.last_output()
    finally:
        server.stop()

    assert output.endswith("panic: Illegal instruction") and len(output) <= 4000
    assert "password [redacted] key [redacted] aws [redacted]" in server.last_output(limit=20000)
    assert not {server.password, "provider-key-123", "aws-key-456"} & set(server.last_output(limit=20000).split())


def test_server_config_comes_from_settings(settings):
    settings.OPENCODE_CONFIG = {"provider": {"mock": {"npm": "@ai-sdk/openai-compatible"}}, "autoupdate": True}
    settings.OPENCODE_MODEL = "mock/mock-model"

    server = OpenCodeServer.from_settings()

    assert server.config == {
        "autoupdate": True,
        "share": "disabled",
        "provider": {"mock": {"npm": "@ai-sdk/openai-compatible"}},
        "model": "mock/mock-model",
    }
    assert server.password and server.password not in repr(server)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"name": "NotFoundError", "data": {"message": "Session not found: ses_x"}},
         "NotFoundError: Session not found: ses_x"),
        ({"_tag": "PermissionNotFoundError", "message": "Permission request not found: per_x"},
         "PermissionNotFoundError: Permission request not found: per_x"),
        ({"_tag": "BadRequest"}, "BadRequest"),
    ],
)  # fmt: skip
def test_both_error_body_shapes_are_read(body, expected):
    assert error_message(httpx.Response(400, json=body)) == expected


def sandboxed_servers() -> list[str]:
    """The command lines of running `opencode serve` processes started in a sandbox (port 4096)."""
    done = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if " serve " in line and "--port 4096" in line]


@pytest.mark.e2e
def test_an_opencode_agent_runs_each_task_on_a_server_of_its_own_in_the_sandbox(stack, mock, tmp_path):
    repo = git_workspace(tmp_path / "repo")
    mock.set_script([{"when": "E2E", "write": {"path": "feature.txt", "content": "made by opencode\n"}}])
    config = {**mock.provider_config(), "autoupdate": False}
    agent = stack._spawn(
        "opencode-agent",
        [sys.executable, "manage.py", "run_agent", "--name", "opencode-agent", "--executor", "opencode",
         "--capabilities", "code_generation"],
        {"OPENCODE_URL": "", "OPENCODE_CONFIG": json.dumps(config), "SANDBOX": "bwrap"},
    )  # fmt: skip
    log = stack.logs / "opencode-agent.log"

    def online():
        assert agent.poll() is None, log.read_text()
        return Agent.objects.filter(name="opencode-agent", status=Agent.Status.ONLINE).exists()

    wait_until(online, timeout=60, what="the opencode agent to come online")
    assert not sandboxed_servers()  # none before a task asks for one
    client = member_client("acme", "alice")
    payload = {
        "requirements": "add a feature file",
        "repository": str(repo),
        "tasks": [
            {"key": "build", "title": "E2E: write feature.txt", "capability": "code_generation"},
            {"key": "again", "title": "E2E: write it again", "capability": "code_generation", "depends_on": ["build"]},
        ],
    }

    session_id = create_and_start(client, payload)
    body = wait_for_status(client, session_id, {"completed", "failed", "partially_completed"}, timeout=120)

    tasks = {t.key: t for t in Task.objects.filter(session_id=session_id)}
    assert body["status"] == "completed", [(t.error, t.result) for t in tasks.values()]
    build = tasks["build"].result
    assert build["opencode_session_id"].startswith("ses_")
    assert [d["file"] for d in build["diff"]] == ["feature.txt"]
    assert build["sandbox"]["kind"] == "bwrap"
    # Each task had a server of its own: the second one's OpenCode knows nothing of the first's.
    assert tasks["again"].result["opencode_session_id"] != build["opencode_session_id"]
    assert "started opencode serve" not in log.read_text().split("ready.")[0]  # nothing at start-up
    wait_until(lambda: not sandboxed_servers(), timeout=10, what="the task's servers to be stopped")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OPENCODE_MODEL": "claude"}, "OPENCODE_MODEL"),
        ({"OPENCODE_PERMISSION_POLICY": '{"edit": "yes"}'}, "OPENCODE_PERMISSION_POLICY"),
        ({"OPENCODE_QUESTION_POLICY": "ask-the-user"}, "OPENCODE_QUESTION_POLICY"),
        ({"OPENCODE_URL": "localhost:4096"}, "OPENCODE_URL"),
        ({"OPENCODE_BREAKER_FAIL_MAX": "0"}, "OPENCODE_BREAKER_FAIL_MAX"),
        ({"DEBUG": "false", "SECRET_KEY": "s", "OPENCODE_URL": "http://oc:4096"}, "OPENCODE_SERVER_PASSWORD"),
        ({"OPENCODE_URL": "http://oc:4096"}, "OPENCODE_URL"),  # a server outside the sandbox
        ({"SANDBOX": "docker"}, "SANDBOX"),
        ({"DEBUG": "false", "SECRET_KEY": "s", "SANDBOX": "none"}, "SANDBOX"),
    ],
)
def test_a_bad_opencode_setting_stops_the_process_naming_the_variable(env, variable):
    result = import_settings(**{"DEBUG": "true", **env})

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and variable in result.stderr.splitlines()[-1]


def test_a_started_server_gets_provider_keys_but_none_of_the_workers_secrets(monkeypatch, settings, tmp_path):
    settings.OPENCODE_SERVER_ENV = ["AWS_ACCESS_KEY_ID"]
    for name, value in {
        "SECRET_KEY": "django-secret",
        "DATABASE_URL": "postgres://u:db-password@h/d",
        "ANTHROPIC_API_KEY": "provider-key",
        "AWS_ACCESS_KEY_ID": "aws-key",
        "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
        "OPENCODE_CONFIG": '{"ours": true}',
    }.items():
        monkeypatch.setenv(name, value)
    server = OpenCodeServer(binary=tmp_path / "opencode", config={"model": "mock/mock-model"})
    server.state_dir = tmp_path

    env = server._env()

    assert {"SECRET_KEY", "DATABASE_URL", "OPENCODE_CONFIG"}.isdisjoint(env)
    assert env["ANTHROPIC_API_KEY"] == "provider-key" and env["AWS_ACCESS_KEY_ID"] == "aws-key"
    assert env["OPENCODE_DISABLE_LSP_DOWNLOAD"] == "1" and env["PATH"] == os.environ["PATH"]
    assert json.loads(env["OPENCODE_CONFIG_CONTENT"]) == {"model": "mock/mock-model"}
