"""Per-session git workspaces.

A session that names a repository gets a workspace of its own under WORKSPACE_ROOT/<session id>,
on a new branch (`io/session-<id>`) cut from its base branch, and all its tasks run there:

- a local repository (an absolute path) gets a `git worktree`: the branch lives in that
  repository, where its owner can look at it, and two sessions share the object store but never
  a file;
- a git URL gets a clone of the base branch, with the new branch in the clone.

When the session settles, what its tasks left in the tree is committed on the branch and the
session's result records the branch, the commits and the diff against the base.

Git commands that write to the source repository (adding or removing a worktree, committing on a
branch, whose ref lives there) run under the repository's fair lock, which is also what makes a
workspace (repository + branch) owned by one session at a time.
"""

import logging
import os
import re
import shutil
import subprocess
from contextlib import contextmanager, suppress
from pathlib import Path

from django.conf import settings

from orchestrator_project.locking import FairLock, NotLockOwner
from orchestrator_project.repositories import (
    RefusedRepository,
    is_url,
    normalise_repository,
    parse_url,
    path_allowed,
    url_allowed,
)

logger = logging.getLogger(__name__)

GIT_TIMEOUT_S = 120
LOCK_TTL_S = 180
# An absolute path in git's own messages: they go to the API client, who learns no server path.
_PATH_IN_MESSAGE = re.compile(r"(?<![\w:/.~-])/[^\s'\"]+")


class WorkspaceError(Exception):
    """The repository or branch cannot be used; the message says why, for the API or the log, and
    `field` which input it is about."""

    def __init__(self, message: str, field: str = "repository"):
        super().__init__(message)
        self.field = field


def is_remote(repository: str) -> bool:
    return is_url(repository)


def git(*args: str, cwd: Path | str | None = None, timeout: float = GIT_TIMEOUT_S) -> str:
    """Run git without a terminal prompt or the user's global hooks and identity; raise
    WorkspaceError with git's own message when it fails."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1", GIT_ASKPASS="true", SSH_ASKPASS="true")
    # safe.directory: a workspace belongs to the sandbox's user once a task ran there.
    command = ["git", "-c", "core.hooksPath=/dev/null", "-c", "commit.gpgsign=false", "-c", "safe.directory=*", *args]
    try:
        done = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise WorkspaceError(f"git {args[0]} timed out after {timeout:g}s") from exc
    except OSError as exc:  # no git, or the directory is gone
        raise WorkspaceError(f"git {args[0]} could not run: {exc.strerror}") from exc
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit code {done.returncode}"]
        reason = next((line for line in lines if line.startswith(("fatal:", "error:"))), lines[-1])
        logger.info("git %s failed in %s: %s", args[0], cwd, reason)
        reason = _PATH_IN_MESSAGE.sub("<path>", reason.removeprefix("fatal: ").removeprefix("error: "))
        raise WorkspaceError(f"git {args[0]} failed: {reason}")
    return done.stdout


def check_repository(repository: str, base_branch: str = "", *, tenant=None) -> str:
    """What a session's repository must be before the session is stored (the service checks it,
    tasks.lifecycle.check_new_session), and again before its workspace is made. A local
    repository must be an existing git repository (the top of it) whose real path lies under the
    allowed roots, and have the base branch; a URL must lie under the allowed prefixes (whether it
    can be cloned is known only when the session starts). The roots and prefixes are the
    settings', narrowed by the tenant's. Returns the repository's normalised form, the one to
    store; raises WorkspaceError."""
    check_base_branch(base_branch)
    try:
        canonical = normalise_repository(repository)
        if is_url(canonical):
            prefixes = tenant.allowed_repository_url_prefixes() if tenant else settings.REPOSITORY_URL_PREFIXES
            if not url_allowed(parse_url(canonical), prefixes):
                raise WorkspaceError("the repository URL is not under an allowed prefix")
            return canonical
    except RefusedRepository as exc:
        raise WorkspaceError(str(exc)) from None
    _check_local(_local_source(canonical, tenant), base_branch)
    return canonical


def check_base_branch(name: str) -> None:
    """A base branch is given to git on its command line: it must be a branch name as git
    itself parses one (`git check-ref-format --branch`), and exactly that name."""
    if not name:
        return
    if name.startswith("-") or "@{" in name:
        raise WorkspaceError(f"{name!r} is not a valid branch name", field="base_branch")
    try:
        checked = git("check-ref-format", "--branch", name, cwd="/", timeout=10).strip()
    except WorkspaceError:
        checked = None
    if checked != name:
        raise WorkspaceError(f"{name!r} is not a valid branch name", field="base_branch")


def _local_source(repository: str, tenant) -> Path:
    """The real path of a local repository (symbolic links resolved), if it is under an allowed
    root and not a session's workspace. The messages name no path: the client learns nothing of
    the server's directories, or of the roots."""
    roots = tenant.allowed_repository_roots() if tenant else settings.REPOSITORY_ROOTS
    real = Path(os.path.realpath(repository))
    if not path_allowed(str(real), roots) or path_allowed(str(real), [str(settings.WORKSPACE_ROOT)]):
        raise WorkspaceError("the repository is not under an allowed root")
    return real


def _check_local(path: Path, base_branch: str) -> None:
    if not path.is_dir():
        raise WorkspaceError("the repository does not exist or is not a directory")
    try:
        top = git("rev-parse", "--show-toplevel", cwd=path, timeout=10).strip()
    except WorkspaceError:
        raise WorkspaceError("the repository is not a git repository") from None
    if os.path.realpath(top) != str(path):
        raise WorkspaceError("the repository is inside a git repository; name its top directory")
    if base_branch:
        try:
            git("rev-parse", "--verify", "--quiet", f"refs/heads/{base_branch}", cwd=path, timeout=10)
        except WorkspaceError:
            raise WorkspaceError(f"the repository has no branch {base_branch!r}", field="base_branch") from None
    else:
        try:
            git("rev-parse", "--verify", "--quiet", "HEAD", cwd=path, timeout=10)
        except WorkspaceError:
            raise WorkspaceError("the repository has no commit to start from") from None


def workspace_of(session_id) -> Path:
    return settings.WORKSPACE_ROOT / str(session_id)


@contextmanager
def owning(session):
    """A local repository's fair lock: one git writer per repository, and so one owner per
    (repository, branch) workspace. A clone of a URL is the session's alone: no lock."""
    if is_remote(session.repository):
        yield
        return
    lock = FairLock(f"repository:{os.path.realpath(session.repository)}", ttl=LOCK_TTL_S)
    lock.acquire(timeout=LOCK_TTL_S)
    try:
        yield
    finally:
        with suppress(NotLockOwner):  # the lease ran out meanwhile: git's own locks still held
            lock.release()


def prepare_workspace(session) -> Path:
    """The workspace of a session with a repository, created on first use: idempotent, so that
    a resumed or retried session (or a re-sent dispatch) finds the one it had. A half-made one
    (a crash mid-clone) is made again. Returns its path; raises WorkspaceError."""
    path = workspace_of(session.pk)
    branch = session.branch
    with owning(session):
        if _is_workspace(path, branch):
            return path
        # Checked again: the repository may have gone, or the settings changed, since the API saw it.
        check_repository(session.repository, session.base_branch, tenant=session.tenant)
        _remove(session, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_remote(session.repository):
            args = ["clone", "--quiet", "--single-branch", "--no-tags"]
            if session.base_branch:
                args += ["--branch", session.base_branch]
            git(*args, "--", session.repository, str(path), timeout=settings.WORKSPACE_CLONE_TIMEOUT_SECONDS)
            git("checkout", "--quiet", "-b", branch, cwd=path)
        else:
            base = session.base_branch or "HEAD"
            git("worktree", "prune", cwd=session.repository)
            git("worktree", "add", "--quiet", "-B", branch, str(path), base, cwd=session.repository)
        base_commit = git("rev-parse", "HEAD", cwd=path).strip()
    type(session).objects.filter(pk=session.pk).update(base_commit=base_commit)
    session.base_commit = base_commit
    logger.info("session %s: workspace %s on branch %s from %s", session.pk, path, branch, base_commit[:12])
    return path


def _is_workspace(path: Path, branch: str) -> bool:
    if not (path / ".git").exists():
        return False
    try:
        return git("rev-parse", "--abbrev-ref", "HEAD", cwd=path, timeout=10).strip() == branch
    except WorkspaceError:
        return False


def finish_workspace(session) -> dict:
    """Commit what the tasks left in the workspace on its branch, and describe the result: the
    branch, the base and head commits, the files changed and the diff (capped at
    WORKSPACE_DIFF_LIMIT characters). Idempotent: nothing new to commit, nothing committed."""
    path = workspace_of(session.pk)
    if not session.repository or not session.base_commit or not path.is_dir():
        return {}
    with owning(session):
        git("add", "--all", cwd=path)
        if git("status", "--porcelain", cwd=path).strip():
            git(
                "-c", "user.name=Industrial Orchestrator", "-c", "user.email=orchestrator@localhost",
                "commit", "--quiet", "--no-verify", "-m", f"{session.title}\n\nSession {session.pk}.",
                cwd=path,
            )  # fmt: skip
        head = git("rev-parse", "HEAD", cwd=path).strip()
    diff = git("diff", "--no-color", session.base_commit, head, cwd=path)
    limit = settings.WORKSPACE_DIFF_LIMIT
    files = []
    for line in git("diff", "--numstat", session.base_commit, head, cwd=path).splitlines():
        added, deleted, name = line.split("\t", 2)
        files.append({"file": name, "additions": _count(added), "deletions": _count(deleted)})
    return {
        "repository": session.repository,
        "path": str(path),
        "branch": session.workspace_branch,
        "base_branch": session.base_branch,
        "base_commit": session.base_commit,
        "head_commit": head,
        "files": files,
        "diff": diff[:limit],
        "diff_truncated": len(diff) > limit,
    }


def _count(figure: str) -> int | None:
    return None if figure == "-" else int(figure)  # "-" for a binary file


def remove_workspace(session) -> None:
    """Delete the session's workspace directory (the branch stays in the repository)."""
    path = workspace_of(session.pk)
    if session.repository:
        with owning(session):
            _remove(session, path)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _remove(session, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    if session.repository and not is_remote(session.repository) and Path(session.repository).is_dir():
        git("worktree", "prune", cwd=session.repository)
