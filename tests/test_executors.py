import os
import sys
from pathlib import Path

import pytest

from agents.executors import TaskContext, TaskFailed, build_executor
from agents.executors.scripted import ScriptedExecutor
from agents.executors.shell import ShellExecutor
from tests.conftest import executor_context


def context(
    tmp_path: Path, capability: str = "testing", params: dict | None = None, timeout: float = 30
) -> TaskContext:
    return executor_context(tmp_path / "ws", capability=capability, params=params, timeout=timeout)


def test_scripted_results_are_labelled_simulated_and_params_override_defaults(tmp_path):
    executor = ScriptedExecutor(output="agent default")

    result = executor.execute(context(tmp_path, params={"output": "from the task"}))

    assert result == {"output": "from the task", "simulated": True, "duration_s": 0.0}


def test_scripted_fail_rate_one_always_fails(tmp_path):
    with pytest.raises(TaskFailed, match="simulated failure"):
        ScriptedExecutor().execute(context(tmp_path, params={"fail_rate": 1.0}))


def test_unknown_executor_kind_is_refused():
    with pytest.raises(ValueError, match="unknown executor"):
        build_executor("telepathy")


def python(code: str) -> str:
    return f"{sys.executable} -c {code!r}"


def test_shell_runs_the_configured_command_in_the_workspace(tmp_path):
    executor = ShellExecutor(commands={"testing": python("import os; print(os.getcwd())")})

    result = executor.execute(context(tmp_path))

    assert result["exit_code"] == 0
    assert result["output"].strip() == str(tmp_path / "ws")


def test_shell_failure_records_exit_code_and_output(tmp_path):
    executor = ShellExecutor(commands={"testing": python("import sys; print('2 failed'); sys.exit(3)")})

    with pytest.raises(TaskFailed, match="exited with 3") as raised:
        executor.execute(context(tmp_path))

    assert raised.value.result["exit_code"] == 3 and "2 failed" in raised.value.result["output"]


def test_shell_refuses_a_capability_without_a_configured_command(tmp_path):
    with pytest.raises(TaskFailed, match="no shell command is configured for capability 'deployment'"):
        ShellExecutor(commands={"testing": "true"}).execute(context(tmp_path, capability="deployment"))


def test_shell_kills_a_hanging_command_at_its_timeout(tmp_path):
    executor = ShellExecutor(commands={"testing": python("import time; time.sleep(60)")})

    with pytest.raises(TaskFailed, match=r"timed out after 0\.5s"):
        executor.execute(context(tmp_path, timeout=0.5))


def test_shell_caps_a_flood_of_output_and_keeps_its_tail(tmp_path):
    flood = python("import sys; sys.stdout.write('x' * 5_000_000 + 'THE END')")
    executor = ShellExecutor(commands={"testing": flood}, output_limit=4096)

    result = executor.execute(context(tmp_path))

    assert len(result["output"]) == 4096 and result["output"].endswith("THE END")
    assert result["output_truncated"] is True


def test_shell_does_not_pass_the_workers_secrets_to_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_KEY", "do-not-leak")
    monkeypatch.setenv("DATABASE_URL", "postgres://user:pw@db/prod")
    executor = ShellExecutor(commands={"testing": python("import os; print(sorted(os.environ))")})

    output = executor.execute(context(tmp_path))["output"]

    assert "SECRET_KEY" not in output and "DATABASE_URL" not in output
    assert "PATH" in output and os.environ["SECRET_KEY"] == "do-not-leak"
