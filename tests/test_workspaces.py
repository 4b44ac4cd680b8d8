"""Per-session git workspaces (sessions.workspaces): a clone per session on its own branch that
shares nothing with its source, the final commit and diff in the session's result, the branch
fetched back into a local source, nothing an agent planted in the workspace run by our git, and
every bad repository refused. The repository input cases are in test_repository_input.py."""

import functools
import os
import shutil
import socket
import subprocess
import threading
from datetime import timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.utils import timezone

from sessions.models import Session
from sessions.workspaces import (
    WorkspaceError,
    check_repository,
    finish_workspace,
    prepare_workspace,
    remove_workspace,
    workspace_of,
)
from tasks.sweeps import apply_retention
from tasks.tasks import dispatch_session
from tests.conftest import commit_repository, error_of

pytestmark = pytest.mark.django_db


def run(*args: str, cwd: Path) -> str:
    return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_repo(path: Path) -> Path:
    return commit_repository(path, {"app.py": "def add(a, b):\n    return a + b\n"})


@pytest.fixture
def repo(tmp_path, settings) -> Path:
    settings.WORKSPACE_ROOT = tmp_path / "workspaces"
    settings.REPOSITORY_ROOTS = [str(tmp_path)]
    settings.REPOSITORY_URL_PREFIXES = ["https://git.example.com/acme/"]
    return make_repo(tmp_path / "repo")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def git_http(tmp_path, settings):
    """A git server on 127.0.0.1 (the dumb HTTP protocol: plain files) serving tmp_path/served,
    allowed as a URL prefix. Yields (served directory, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    settings.REPOSITORY_URL_PREFIXES = [*settings.REPOSITORY_URL_PREFIXES, base]
    yield served, base
    server.shutdown()
    server.server_close()


def new_session(api, **fields) -> Session:
    payload = {"requirements": "change the code", "tasks": [{"key": "a", "title": "a", "capability": "testing"}]}
    created = api.post("/api/v1/sessions/", {**payload, **fields}, format="json")
    assert created.status_code == 201, created.content
    return Session.objects.get(pk=created.json()["id"])


def branches(repo: Path) -> list[str]:
    return sorted(run("git", "branch", "--list", "--format=%(refname:short)", "io/*", cwd=repo).split())


def test_two_sessions_on_one_repository_get_their_own_clone_and_branch(api, repo):
    first, second = new_session(api, repository=str(repo)), new_session(api, repository=str(repo))
    paths = [prepare_workspace(first), prepare_workspace(second)]

    assert paths == [workspace_of(first.pk), workspace_of(second.pk)]
    (paths[0] / "app.py").write_text("changed by the first session\n")
    (paths[0] / "new.py").write_text("x = 1\n")
    assert (paths[1] / "app.py").read_text() == "def add(a, b):\n    return a + b\n"
    assert not (paths[1] / "new.py").exists()
    assert (repo / "app.py").read_text() == "def add(a, b):\n    return a + b\n"  # the checkout is untouched
    for session, path in zip([first, second], paths, strict=True):
        assert run("git", "rev-parse", "--abbrev-ref", "HEAD", cwd=path).strip() == session.branch
    assert run("git", "worktree", "list", "--porcelain", cwd=repo).count("worktree ") == 1  # no worktree
    assert branches(repo) == []  # a branch comes back into the source when its session settles
    head = run("git", "rev-parse", "HEAD", cwd=repo).strip()
    assert Session.objects.get(pk=first.pk).base_commit == head


def test_a_workspace_shares_no_file_config_or_hook_with_its_source(api, repo):
    session = new_session(api, repository=str(repo))
    path = prepare_workspace(session)

    assert (path / ".git").is_dir() and not (path / ".git").is_symlink()
    assert not (path / ".git" / "hooks").exists()
    source_inodes = {p.stat().st_ino for p in (repo / ".git").rglob("*") if p.is_file()}
    assert not [p for p in (path / ".git").rglob("*") if p.is_file() and p.stat().st_ino in source_inodes]
    assert run("git", "config", "--get", "remote.origin.url", cwd=path).strip() == str(repo)
    assert not (path / ".git" / "objects" / "info" / "alternates").exists()


def test_preparing_again_keeps_the_workspace_and_its_work(api, repo):
    session = new_session(api, repository=str(repo))
    path = prepare_workspace(session)
    (path / "work.txt").write_text("in progress\n")

    assert prepare_workspace(Session.objects.get(pk=session.pk)) == path
    assert (path / "work.txt").read_text() == "in progress\n"


def test_finishing_commits_fetches_the_branch_back_and_records_the_diff(api, repo):
    session = new_session(api, repository=str(repo))
    path = prepare_workspace(session)
    (path / "app.py").write_text("def add(a, b):\n    return b + a\n")
    (path / "test_app.py").write_text("from app import add\n")

    result = finish_workspace(Session.objects.get(pk=session.pk))

    session.refresh_from_db()
    assert result["branch"] == session.workspace_branch
    assert {f["file"] for f in result["files"]} == {"app.py", "test_app.py"}
    assert "+    return b + a" in result["diff"] and "+from app import add" in result["diff"]
    assert run("git", "rev-parse", session.workspace_branch, cwd=repo).strip() == result["head_commit"]
    assert result["base_commit"] != result["head_commit"]
    assert finish_workspace(Session.objects.get(pk=session.pk))["head_commit"] == result["head_commit"]
    assert (repo / "app.py").read_text() == "def add(a, b):\n    return a + b\n"  # the checkout is untouched


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the workspace to another user needs root")
def test_a_workspace_the_sandboxs_user_owns_is_finished_and_its_branch_fetched_back(api, repo):
    session = new_session(api, repository=str(repo))
    path = prepare_workspace(session)
    (path / "app.py").write_text("def add(a, b):\n    return b + a\n")
    for directory, dirs, files in os.walk(path):  # as the sandbox leaves it (agents.sandbox)
        for name in [directory, *(os.path.join(directory, n) for n in dirs + files)]:
            os.lchown(name, 700_000, 700_000)

    result = finish_workspace(Session.objects.get(pk=session.pk))

    assert [f["file"] for f in result["files"]] == ["app.py"]
    assert run("git", "rev-parse", session.branch, cwd=repo).strip() == result["head_commit"]


def test_what_an_agent_plants_in_the_workspace_runs_nothing_when_the_session_finishes(api, repo, tmp_path):
    session = new_session(api, repository=str(repo))
    path = prepare_workspace(session)
    source_config = (repo / ".git" / "config").read_bytes()
    source_hooks = sorted(os.listdir(repo / ".git" / "hooks"))
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.sh"
    evil.write_text(f'#!/bin/sh\necho "$0 $*" >> {canary}\ncat\n')
    evil.chmod(0o755)
    hooks = tmp_path / "evil-hooks"
    hooks.mkdir()
    (path / ".git" / "hooks").mkdir()
    for hook in ("pre-commit", "commit-msg", "post-commit", "reference-transaction", "post-index-change"):
        for where in (hooks, path / ".git" / "hooks"):
            shutil.copy(evil, where / hook)

    # The agent: its own change, and everything that would make git run a program.
    (path / "app.py").write_text("def add(a, b):\n    return b + a\n")
    (path / ".gitattributes").write_text("* filter=evil diff=evil\n")
    (path / ".git" / "info").mkdir(exist_ok=True)
    (path / ".git" / "info" / "attributes").write_text("* filter=evil diff=evil\n")
    with (path / ".git" / "config").open("a") as config:
        config.write(
            f"[core]\n\tfsmonitor = {evil}\n\thooksPath = {hooks}\n\tpager = {evil}\n"
            f'[filter "evil"]\n\tclean = {evil}\n\tsmudge = {evil}\n'
            f'[diff]\n\texternal = {evil}\n[diff "evil"]\n\tcommand = {evil}\n\ttextconv = {evil}\n'
        )
    # What we defend against is real: plain git in a copy of that workspace runs the plants.
    copy = tmp_path / "copy"
    shutil.copytree(path, copy, symlinks=True)
    run("git", "add", "--all", cwd=copy)
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "x", cwd=copy)
    run("git", "diff", "HEAD~1", "HEAD", cwd=copy)
    assert canary.exists()
    canary.unlink()
    (path / ".git" / "commondir").write_text(str(tmp_path / "elsewhere"))

    result = finish_workspace(Session.objects.get(pk=session.pk))

    assert not canary.exists(), canary.read_text()
    assert {f["file"] for f in result["files"]} == {"app.py", ".gitattributes"}
    assert "+    return b + a" in result["diff"]
    assert run("git", "rev-parse", session.branch, cwd=repo).strip() == result["head_commit"]
    assert (repo / ".git" / "config").read_bytes() == source_config
    assert sorted(os.listdir(repo / ".git" / "hooks")) == source_hooks
    config = (path / ".git" / "config").read_text()
    assert "evil" not in config and str(repo) in config
    assert not (path / ".git" / "hooks").exists() and not (path / ".git" / "commondir").exists()


@pytest.mark.parametrize("plant", ["git-dir-is-a-link", "git-dir-is-a-file", "link-inside-git-dir"])
def test_a_workspace_git_dir_that_leads_elsewhere_is_refused_and_the_source_untouched(api, repo, plant):
    session = new_session(api, repository=str(repo))
    path = prepare_workspace(session)
    (path / "app.py").write_text("changed\n")
    source_config = (repo / ".git" / "config").read_bytes()
    if plant == "git-dir-is-a-link":
        shutil.rmtree(path / ".git")
        (path / ".git").symlink_to(repo / ".git")
    elif plant == "git-dir-is-a-file":
        shutil.rmtree(path / ".git")
        (path / ".git").write_text(f"gitdir: {repo / '.git'}\n")
    else:
        (path / ".git" / "config").unlink()
        (path / ".git" / "config").symlink_to(repo / ".git" / "config")

    with pytest.raises(WorkspaceError, match=r"the workspace's \.git"):
        finish_workspace(Session.objects.get(pk=session.pk))

    assert (repo / ".git" / "config").read_bytes() == source_config
    assert branches(repo) == []
    assert run("git", "status", "--porcelain", cwd=repo) == ""


def test_an_agents_commit_whose_tree_holds_a_git_directory_never_reaches_the_source(api, repo):
    session = new_session(api, repository=str(repo))
    path = prepare_workspace(session)

    def mktree(entries: str) -> str:
        made = subprocess.run(["git", "mktree"], cwd=path, input=entries, capture_output=True, text=True, check=True)
        return made.stdout.strip()

    blob = subprocess.run(
        ["git", "hash-object", "-w", "--stdin"], cwd=path, input="#!/bin/sh\n", capture_output=True, text=True
    ).stdout.strip()
    hooks = mktree(f"100755 blob {blob}\tpost-checkout\n")
    dot_git = mktree(f"040000 tree {hooks}\thooks\n")
    top = mktree(f"040000 tree {dot_git}\t.git\n100644 blob {blob}\tapp.py\n")
    commit = run(
        "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit-tree", top, "-p", "HEAD", "-m", "x", cwd=path
    )
    run("git", "update-ref", "HEAD", commit.strip(), cwd=path)

    with pytest.raises(WorkspaceError, match=r"invalid path '\.git/hooks/post-checkout'"):
        finish_workspace(Session.objects.get(pk=session.pk))

    assert branches(repo) == []


def test_a_git_url_is_cloned_on_its_base_branch(api, repo, git_http):
    served, base = git_http
    run("git", "branch", "release", cwd=repo)
    run("git", "checkout", "--quiet", "release", cwd=repo)
    (repo / "release.txt").write_text("only on release\n")
    run("git", "add", ".", cwd=repo)
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "release", cwd=repo)
    run("git", "checkout", "--quiet", "main", cwd=repo)
    run("git", "clone", "--quiet", "--bare", str(repo), str(served / "repo.git"), cwd=repo)
    run("git", "update-server-info", cwd=served / "repo.git")

    session = new_session(api, repository=f"{base}repo.git", base_branch="release")
    path = prepare_workspace(session)

    assert (path / "release.txt").exists()
    assert run("git", "rev-parse", "--abbrev-ref", "HEAD", cwd=path).strip() == session.workspace_branch
    (path / "release.txt").write_text("changed\n")
    result = finish_workspace(Session.objects.get(pk=session.pk))
    assert [f["file"] for f in result["files"]] == ["release.txt"]
    assert run("git", "rev-parse", session.branch, cwd=path).strip() == result["head_commit"]
    remove_workspace(session)
    assert not path.exists()


@pytest.mark.parametrize(
    ("repository", "base_branch", "field", "message"),
    [
        ("{tmp}/missing", None, "repository", "the repository does not exist or is not a directory"),
        ("{tmp}/plain", None, "repository", "the repository is not a git repository"),
        ("relative/path", None, "repository", "must be an absolute path"),
        ("{tmp}/repo/sub", None, "repository", "is inside a git repository; name its top directory"),
        ("{tmp}/repo", "no-such-branch", "base_branch", "the repository has no branch 'no-such-branch'"),
        ("{tmp}/repo", "../escape", "base_branch", "'../escape' is not a valid branch name"),
        ("/etc", None, "repository", "the repository is not under an allowed root"),
        ("https://git.example.com/other/repo.git", None, "repository", "is not under an allowed prefix"),
        ("https://bob:s3cret@git.example.com/acme/repo.git", None, "repository", "must not carry a user name"),
    ],
)
def test_a_bad_repository_is_refused_with_its_reason_and_nothing_is_stored(
    api, repo, tmp_path, repository, base_branch, field, message
):
    (tmp_path / "plain").mkdir()
    (repo / "sub").mkdir()
    payload = {"requirements": "change the code", "repository": repository.format(tmp=tmp_path)}
    if base_branch:
        payload["base_branch"] = base_branch

    response = api.post("/api/v1/sessions/", payload, format="json")

    error = error_of(response, 400)
    assert message in " ".join(error["details"][field])
    assert str(tmp_path) not in response.content.decode()  # no server path in the answer
    assert not Session.objects.exists()


def test_a_base_branch_without_a_repository_is_refused(api):
    error = error_of(api.post("/api/v1/sessions/", {"requirements": "x", "base_branch": "main"}, format="json"), 400)
    assert error["details"]["base_branch"] == ["a base branch needs a repository"]


def test_a_repository_gone_before_the_start_fails_the_session_with_the_reason(api, repo, tmp_path):
    session = new_session(api, repository=str(repo))
    subprocess.run(["rm", "-rf", str(repo)], check=True)
    assert api.post(f"/api/v1/sessions/{session.pk}/start/").status_code == 202

    assert dispatch_session(str(session.pk)) is False

    session.refresh_from_db()
    assert session.status == "failed"
    reason = session.events.order_by("-version").first().reason
    assert reason == "could not prepare the workspace: the repository does not exist or is not a directory"
    assert set(session.tasks.values_list("status", flat=True)) == {"cancelled"}


def test_an_unreachable_url_fails_the_session_without_a_prompt(api, repo, settings):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.REPOSITORY_URL_PREFIXES = [f"http://127.0.0.1:{port}/"]
    session = new_session(api, repository=f"http://127.0.0.1:{port}/nowhere.git")
    assert api.post(f"/api/v1/sessions/{session.pk}/start/").status_code == 202

    assert dispatch_session(str(session.pk)) is False

    session.refresh_from_db()
    assert session.status == "failed"
    assert "git clone failed" in session.events.order_by("-version").first().reason


def test_check_repository_accepts_a_good_local_repository_and_branch(repo):
    assert check_repository(f"{repo}/./", "main") == str(repo)
    with pytest.raises(WorkspaceError, match="has no branch"):
        check_repository(str(repo), "develop")


def test_retention_removes_the_workspace_and_the_branch_of_a_deleted_session(api, repo, settings):
    settings.SESSION_RETENTION_DAYS = 30
    session = new_session(api, repository=str(repo))
    path = prepare_workspace(session)
    (path / "work.txt").write_text("done\n")
    finish_workspace(Session.objects.get(pk=session.pk))
    kept = new_session(api, repository=str(repo))
    kept_path = prepare_workspace(kept)
    long_ago = timezone.now() - timedelta(days=31)
    Session.objects.filter(pk=session.pk).update(status="completed", finished_at=long_ago)

    assert apply_retention() == 1

    assert not path.exists() and kept_path.exists()
    assert branches(repo) == []
