"""A session on a real git repository, run by real agents on real worker processes: the OpenCode
executor (the real `opencode serve`, with the mock LLM as its model) writes the code, one shell
agent runs the repository's tests and another runs ruff; the session's result holds its branch
and the final diff. The same setup as `make demo` (scripts/demo/)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mockllm.server import MockLLM
from sessions.models import Session
from tasks.models import Task
from tests.conftest import ROOT, commit_repository, create_and_start, member_client, wait_for_status

pytestmark = pytest.mark.e2e

DEMO = ROOT / "scripts" / "demo"


def demo_repository(path: Path) -> Path:
    shutil.copytree(DEMO / "repo", path)
    return commit_repository(path)


@pytest.fixture
def mock_llm():
    mock = MockLLM(json.loads((DEMO / "llm-script.json").read_text())).start()
    yield mock
    mock.stop()


def test_a_session_on_a_repository_is_coded_tested_and_reviewed_by_real_agents(stack, mock_llm, tmp_path, monkeypatch):
    repo = demo_repository(tmp_path / "repo")
    monkeypatch.setenv("OPENCODE_CONFIG", json.dumps(mock_llm.provider_config()))
    monkeypatch.setenv("OPENCODE_MODEL", "mock/mock-model")
    monkeypatch.delenv("OPENCODE_URL", raising=False)
    ruff = Path(sys.executable).parent / "ruff"
    commands = {"testing": f"{sys.executable} -m pytest -q -p no:cacheprovider", "code_review": f"{ruff} check ."}
    monkeypatch.setenv("SHELL_EXECUTOR_COMMANDS", json.dumps(commands))
    stack.agent("coder", ["code_generation"], concurrency=1, executor="opencode")
    stack.agent("tester", ["testing"], concurrency=1, executor="shell")
    stack.agent("linter", ["code_review"], concurrency=1, executor="shell")
    client = member_client("acme", "alice")
    instructions = "Implement slugify(text) in textutils.py so that tests/test_textutils.py passes."
    payload = {
        "requirements": instructions,
        "repository": str(repo),
        "tasks": [
            {"key": "implement", "title": "slugify", "capability": "code_generation", "instructions": instructions},
            {"key": "test", "title": "Run the tests", "capability": "testing", "depends_on": ["implement"]},
            {"key": "review", "title": "Lint", "capability": "code_review", "depends_on": ["implement"]},
        ],
    }

    session_id = create_and_start(client, payload)
    body = wait_for_status(client, session_id, {"completed", "failed", "partially_completed"}, timeout=180)

    tasks = {t.key: t for t in Task.objects.filter(session_id=session_id)}
    assert body["status"] == "completed", {k: (t.status, t.error) for k, t in tasks.items()}
    assert "textutils.py" in {f["file"] for f in tasks["implement"].result["diff"]}
    assert tasks["test"].result["exit_code"] == 0 and "2 passed" in tasks["test"].result["output"]
    assert tasks["review"].result["exit_code"] == 0
    workspace = Session.objects.get(pk=session_id).result["workspace"]
    assert workspace["files"] == [{"file": "textutils.py", "additions": 4, "deletions": 1}]
    assert '+    return "-".join(words)' in workspace["diff"]
    branch_head = subprocess.run(["git", "rev-parse", workspace["branch"]], cwd=repo, capture_output=True, text=True)
    assert branch_head.stdout.strip() == workspace["head_commit"]
    assert "raise NotImplementedError" in (repo / "textutils.py").read_text()  # the checkout is untouched
