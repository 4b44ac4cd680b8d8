"""The sandbox (agents.sandbox, docs/SECURITY.md) against hostile agent code.

tests/sandbox_probe.py plays the attacker: repository content that an operator's shell command
runs, and a command the model has OpenCode's bash tool run. Each probe runs with SANDBOX=bwrap
(refused) and with SANDBOX=none (allowed: the sandbox is what stops it).
"""

import http.server
import json
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from agents.executors import TaskContext, TaskFailed
from agents.executors.opencode import OpenCodeExecutor
from agents.executors.shell import ShellExecutor
from agents.models import Agent
from agents.sandbox import Limits, Sandbox
from agents.sandbox.proxy import allows
from mockllm import MockLLM
from tasks.models import Task
from tests.conftest import (
    ROOT,
    commit_repository,
    create_and_start,
    executor_context,
    member_client,
    wait_for_status,
    wait_until,
)

PROBE = Path(__file__).with_name("sandbox_probe.py")
ATTACKS = [
    "environ", "connect", "read_canary", "write_outside", "signal_agent", "ptrace_agent", "fork_bomb", "memory",
    "disk", "host_direct", "host_via_proxy",
]  # fmt: skip
# The server keeps SANDBOX_SERVER_MEMORY_MB: OpenCode maps about 2 GB of data (see settings.py).
LIMITS = {"SANDBOX_MAX_PROCESSES": 64, "SANDBOX_MEMORY_MB": 2048, "SANDBOX_FILE_SIZE_MB": 8}


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """What the probes go for: a platform process holding secrets in its environment, a local
    service that is not allowed (standing in for the API and Flower), a canary in another
    session's workspace and one beside the project's settings, and the allowed mock LLM."""
    secret = f"canary-secret-{secrets.token_hex(8)}"
    platform = subprocess.Popen(
        ["sleep", "600"], env={"SECRET_KEY": secret, "DATABASE_URL": f"postgres://u:{secret}@127.0.0.1/db"}
    )
    local = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=local.serve_forever, daemon=True).start()
    mock = MockLLM().start()
    other = settings.WORKSPACE_ROOT / f"other-{uuid.uuid4()}"
    other.mkdir(parents=True)
    (other / "canary.txt").write_text("another session's canary")
    beside_settings = ROOT / "orchestrator_project" / f".canary-{uuid.uuid4().hex}"
    beside_settings.write_text("a canary beside the settings")
    outside = tmp_path_factory.mktemp("outside") / "written.txt"
    yield {
        "secret": secret,
        "ports": [5432, 6379, local.server_address[1]],
        "allowed_url": f"{mock.base_url}/models",
        "denied_url": f"http://127.0.0.1:{local.server_address[1]}/",
        "canaries": [str(other / "canary.txt"), str(beside_settings)],
        "outside": str(outside),
        "pid": platform.pid,
        "processes": 200,
        "memory_mb": 4096,
        "file_mb": 16,
        "mock": mock,
    }
    platform.kill()
    platform.wait()
    local.shutdown()
    mock.stop()
    shutil.rmtree(other)
    beside_settings.unlink()


def sandbox_settings(targets, mode: str):
    mock = targets["mock"]
    return override_settings(
        SANDBOX=mode,
        SANDBOX_ALLOWED_HOSTS=[mock.base_url.split("//")[1].split("/")[0]],
        OPENCODE_CONFIG=mock.provider_config(),
        OPENCODE_MODEL="mock/mock-model",
        **LIMITS,
    )


def workspace_with_probe() -> Path:
    path = settings.WORKSPACE_ROOT / f"probe-{uuid.uuid4()}"
    return commit_repository(path, {"sandbox_probe.py": PROBE.read_text(), "README.md": "# hostile\n"})


def context(workspace: Path, title: str = "run the probe", timeout: float = 120) -> TaskContext:
    return executor_context(workspace, title, timeout=timeout)


def probe_command(targets) -> str:
    arguments = {k: v for k, v in targets.items() if k != "mock"}
    return f"{sys.executable} sandbox_probe.py {shlex.quote(json.dumps(arguments))}"


def verdicts(output: str) -> dict[str, tuple[str, str]]:
    found = {}
    for line in output.splitlines():
        name, _, rest = line.partition(": ")
        if name in (*ATTACKS, "allowed_host"):
            verdict, _, detail = rest.partition(" ")
            found[name] = (verdict, detail)
    return found


def run_shell(targets, mode: str) -> dict:
    workspace = workspace_with_probe()
    try:
        with sandbox_settings(targets, mode):
            result = ShellExecutor(commands={"testing": probe_command(targets)}).execute(context(workspace))
        return {"verdicts": verdicts(result["output"]), "result": result, "workspace": workspace}
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def run_opencode(targets, mode: str) -> dict:
    workspace = workspace_with_probe()
    command = probe_command(targets)
    targets["mock"].set_script(
        [{"when": "PROBE", "tool": "bash", "args": {"command": command, "description": "Run the probe"}}]
    )
    try:
        with sandbox_settings(targets, mode):
            executor = OpenCodeExecutor(url="", permission_policy={"default": "reject", "bash": "once"})
            result = executor.execute(context(workspace, "PROBE the platform"))
        output = "\n".join(tool["output"] for tool in result["tools"] if tool["tool"] == "bash")
        return {"verdicts": verdicts(output), "result": result}
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


@pytest.fixture(scope="module")
def shell_runs(targets):
    return {mode: run_shell(targets, mode) for mode in ("bwrap", "none")}


@pytest.fixture(scope="module")
def opencode_runs(targets):
    return {mode: run_opencode(targets, mode) for mode in ("bwrap", "none")}


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_sandbox_refuses_what_a_repositorys_tests_try_and_without_it_they_succeed(shell_runs, attack):
    verdict, detail = shell_runs["bwrap"]["verdicts"][attack]
    assert verdict == "REFUSED", detail
    verdict, detail = shell_runs["none"]["verdicts"][attack]
    assert verdict == "ALLOWED", detail


def test_a_sandboxed_command_still_reaches_the_allowed_host_and_says_what_the_proxy_refused(shell_runs, targets):
    bwrap = shell_runs["bwrap"]
    assert bwrap["verdicts"]["allowed_host"][0] == "ALLOWED", bwrap["verdicts"]["allowed_host"]
    denied = targets["denied_url"].removeprefix("http://").rstrip("/")
    assert bwrap["result"]["sandbox"]["refused_hosts"] == [denied]
    limits = Limits(2048, settings.SANDBOX_SERVER_MEMORY_MB, 64, settings.SANDBOX_CPU_SECONDS, 8)
    assert bwrap["result"]["sandbox"]["limits"] == limits.describe()
    assert shell_runs["none"]["result"]["sandbox"] == {"kind": "none"}


@pytest.mark.e2e
@pytest.mark.parametrize("attack", ATTACKS)
def test_the_sandbox_refuses_what_the_models_bash_tool_tries_and_without_it_they_succeed(opencode_runs, attack):
    assert set(opencode_runs["bwrap"]["verdicts"]) == {*ATTACKS, "allowed_host"}, opencode_runs["bwrap"]["result"]
    verdict, detail = opencode_runs["bwrap"]["verdicts"][attack]
    assert verdict == "REFUSED", detail
    verdict, detail = opencode_runs["none"]["verdicts"][attack]
    assert verdict == "ALLOWED", detail


@pytest.mark.e2e
def test_the_sandboxed_opencode_server_reaches_the_model_and_its_tools_reach_the_allowed_host(opencode_runs):
    bwrap = opencode_runs["bwrap"]
    assert bwrap["verdicts"]["allowed_host"][0] == "ALLOWED"
    assert bwrap["result"]["sandbox"]["kind"] == "bwrap"
    assert bwrap["result"]["output"] == "Done."  # the model answered after the tool: the server got through


@pytest.mark.parametrize(
    ("command", "limit"),
    [
        ("sh -c 'head -c 20000000 /dev/zero > big.bin'", "the file size limit (8 MB)"),
        ("sh -c 'while :; do :; done'", "the CPU time limit (1 s)"),
    ],
)
def test_a_command_that_runs_into_a_limit_fails_saying_which(tmp_path, settings, command, limit):
    settings.SANDBOX, settings.SANDBOX_CPU_SECONDS = "bwrap", 1
    settings.SANDBOX_FILE_SIZE_MB = 8

    with pytest.raises(TaskFailed) as failed:
        ShellExecutor(commands={"testing": command}).execute(context(tmp_path / "ws", timeout=30))

    assert f"was stopped by the sandbox: it ran into {limit}" in str(failed.value)
    assert failed.value.result["sandbox"]["kind"] == "bwrap"


def test_a_server_gets_the_servers_data_limit_and_its_tools_and_commands_the_commands_one(tmp_path, settings):
    settings.SANDBOX, settings.SANDBOX_MEMORY_MB, settings.SANDBOX_SERVER_MEMORY_MB = "bwrap", 512, 4096
    workspace = tmp_path / "ws"
    workspace.mkdir()
    env = {"PATH": "/usr/bin:/bin"}
    with Sandbox(workspace) as sandbox:
        raise_again = f"{sandbox.tool_shell} -c 'ulimit -d unlimited' 2>/dev/null && echo raised || echo refused"
        in_server = f"ulimit -d; {sandbox.tool_shell} -c 'ulimit -d'; {raise_again}"
        server = sandbox.popen(["/bin/sh", "-c", in_server], env=env, serve_port=4096, stdout=subprocess.PIPE)
        command = sandbox.popen(["/bin/sh", "-c", "ulimit -d"], env=env, stdout=subprocess.PIPE)
        outputs = [proc.communicate(timeout=30)[0].decode().split() for proc in (server, command)]
    assert outputs == [[str(4096 * 1024), str(512 * 1024), "refused"], [str(512 * 1024)]]  # KiB


def test_a_sandbox_sees_only_its_own_workspace_the_system_and_the_toolchains(tmp_path, settings):
    settings.SANDBOX = "bwrap"
    workspace = tmp_path / "ws"
    workspace.mkdir()
    listing = "import json, os; print(json.dumps([os.listdir('/'), os.getuid(), os.environ.get('HOME')]))"
    with Sandbox(workspace) as sandbox:
        proc = sandbox.popen([sys.executable, "-c", listing], env={"PATH": "/usr/bin"}, stdout=subprocess.PIPE)
        output = proc.communicate(timeout=30)[0].decode()
    top, uid, home = json.loads(output)
    ours = {Path(p).parts[1] for p in (str(workspace), sys.prefix, sys.base_prefix)}
    system = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "run", "sbin", "tmp", "usr"}
    assert set(top) <= system | ours
    assert uid != 0 and home == "/tmp/home"


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("api.anthropic.com", 443, True),
        ("API.Anthropic.com.", 443, True),
        ("api.anthropic.com", 8443, False),
        ("evil.com", 443, False),
        ("api.anthropic.com.evil.com", 443, False),
        ("127.0.0.1", 18765, True),
        ("127.0.0.1", 5432, False),
        ("x.models.example", 443, True),
        ("models.example", 443, False),
    ],
)
def test_the_proxy_allows_only_listed_hosts_and_ports(host, port, allowed):
    allow_list = ["api.anthropic.com", "127.0.0.1:18765", "*.models.example"]
    assert allows(allow_list, host, port) is allowed


@pytest.mark.e2e
def test_a_hostile_task_is_contained_the_agent_keeps_serving_and_the_session_beside_it_finishes_untouched(
    stack, tmp_path, targets
):
    secret = f"agent-secret-{secrets.token_hex(8)}"
    planted = settings.WORKSPACE_ROOT / f"planted-{uuid.uuid4().hex}.txt"
    hostile_targets = {
        **{k: v for k, v in targets.items() if k != "mock"},
        "secret": secret,
        "canaries": [str(settings.WORKSPACE_ROOT / "*" / "canary.txt")],  # any other session's
        "outside": str(planted),
        "pid": 0,  # the agent's, once it runs
    }
    commands = {"testing": f"{sys.executable} sandbox_probe.py @targets.json", "code_review": "cat canary.txt"}
    env = {"SECRET_KEY": secret, "SANDBOX": "bwrap", **{k: str(v) for k, v in LIMITS.items()}}
    env["SANDBOX_ALLOWED_HOSTS"] = targets["allowed_url"].split("//")[1].split("/")[0]
    agent = stack._spawn(
        "prober",
        [sys.executable, "manage.py", "run_agent", "--name", "prober", "--executor", "shell",
         "--capabilities", "testing,code_review", "--concurrency", "2"],
        {**env, "SHELL_EXECUTOR_COMMANDS": json.dumps(commands)},
    )  # fmt: skip
    wait_until(lambda: Agent.objects.filter(name="prober", status="online").exists(), what="prober online")
    hostile_targets["pid"] = agent.pid  # run_agent's own process, which holds SECRET_KEY

    benign_repo = commit_repository(tmp_path / "benign", {"canary.txt": "the benign session's canary\n"})
    hostile_repo = commit_repository(
        tmp_path / "hostile", {"sandbox_probe.py": PROBE.read_text(), "targets.json": json.dumps(hostile_targets)}
    )
    client = member_client("acme", "alice")
    benign = create_and_start(client, {
        "requirements": "review", "repository": str(benign_repo),
        "tasks": [{"key": "review", "title": "Review", "capability": "code_review"}],
    })  # fmt: skip
    hostile = create_and_start(client, {
        "requirements": "test", "repository": str(hostile_repo),
        "tasks": [{"key": "probe", "title": "Run the tests", "capability": "testing"}],
    })  # fmt: skip

    assert wait_for_status(client, hostile, {"completed", "failed"}, timeout=120)["status"] == "completed"
    assert wait_for_status(client, benign, {"completed", "failed"}, timeout=60)["status"] == "completed"
    probe_task = Task.objects.get(session_id=hostile, key="probe")
    found = verdicts(probe_task.result["output"])
    assert set(found) == {*ATTACKS, "allowed_host"}, probe_task.result["output"]
    assert {name for name, (verdict, _) in found.items() if verdict != "REFUSED"} == {"allowed_host"}, found
    assert probe_task.result["sandbox"]["refused_hosts"]  # the result says what the proxy refused
    review = Task.objects.get(session_id=benign, key="review")
    assert review.result["output"] == "the benign session's canary\n"
    assert (benign_repo / "canary.txt").read_text() == "the benign session's canary\n"
    assert not planted.exists()
    # The agent keeps serving: it is online and runs the next session's task.
    assert agent.poll() is None and Agent.objects.get(name="prober").status == "online"
    again = create_and_start(client, {
        "requirements": "review", "repository": str(benign_repo),
        "tasks": [{"key": "review", "title": "Review", "capability": "code_review"}],
    })  # fmt: skip
    assert wait_for_status(client, again, {"completed", "failed"}, timeout=60)["status"] == "completed"


def test_sandbox_none_warns_at_every_task_start(tmp_path, settings, caplog):
    settings.SANDBOX = "none"
    executor = ShellExecutor(commands={"testing": "true"})

    for _ in range(2):
        result = executor.execute(context(tmp_path / "ws"))

    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "SANDBOX=none" in r.getMessage()]
    assert len(warnings) == 2 and result["sandbox"] == {"kind": "none"}


def test_without_the_sandbox_tools_the_service_check_says_exactly_what_to_install(monkeypatch, capsys):
    import scripts.ensure_services as ensure_services

    monkeypatch.setattr(ensure_services.shutil, "which", lambda tool: None if tool in ("bwrap", "socat") else "/x")
    monkeypatch.setattr(ensure_services.os, "geteuid", lambda: 1000)  # not root: it may not install

    with pytest.raises(SystemExit):
        ensure_services.ensure_sandbox()

    assert "Install with: sudo apt-get install -y bubblewrap socat" in capsys.readouterr().err
