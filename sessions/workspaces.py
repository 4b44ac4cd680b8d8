"""Per-session git workspaces.

A session that names a repository gets a workspace of its own under WORKSPACE_ROOT/<session id>:
a clone of the repository's base branch on a new branch (`io/session-<id>`). The clone shares
nothing with its source (no worktree, no hard-linked object files, no config, no hooks), because
the agents run in it and can write anything there, its .git included.

When the session settles, what its tasks left in the tree is committed on the branch and the
session's result records the branch, the commits and the diff against the base. The branch of
a local repository is then fetched back into it, so that its owner finds it there.

Every git command of ours runs without hooks, fsmonitor, the system and user config, attribute
files and transports other than the one it needs (git()). Before we run git in a workspace after
agents ran, its .git is made ours again (_reset_git_dir): config rewritten, hooks removed.

Git commands that write to a local source repository (fetching the session's branch back) and
the making and finishing of its workspaces run under the repository's fair lock, which is also
what makes a workspace (repository + branch) owned by one session at a time.
"""

import logging
import os
import re
import shlex
import shutil
import subprocess
from contextlib import contextmanager, suppress
from pathlib import Path

from django.conf import settings

from orchestrator_project.locking import FairLock, LockUnavailable, NotLockOwner
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
# Config that would make git run a program, or read more config, overridden on every command: the
# repository's own config is read even with no system or global config, and a workspace's is the
# agents'. A transport is allowed per command (protocol.<name>.allow).
_SAFE_CONFIG = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.attributesFile=/dev/null",
    "core.pager=cat",
    "commit.gpgSign=false",
    "tag.gpgSign=false",
    "log.showSignature=false",
    "submodule.recurse=false",
    "protocol.allow=never",
    # A workspace belongs to the sandbox's user once a task ran there: git would refuse it. What
    # safe.directory guards against (config we did not write) is what the rest of this list and
    # _reset_git_dir take care of.
    "safe.directory=*",
)
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


def git(
    *args: str,
    cwd: Path | str | None = None,
    timeout: float = GIT_TIMEOUT_S,
    workspace: Path | None = None,
    transport: str | None = None,
) -> str:
    """Run git without a terminal prompt, without config-driven execution and without any
    transport but `transport`; raise WorkspaceError with git's own message (without paths).

    `workspace`: run in that workspace, naming its .git and tree explicitly (no discovery, so a
    .git file planted there is not followed). Elsewhere (a clone, the source repository) the
    operator's REPOSITORY_GIT_CONFIG is read as the global config: credentials, safe.directory."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    global_config = (settings.REPOSITORY_GIT_CONFIG if workspace is None else "") or os.devnull
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=global_config,
        GIT_ATTR_NOSYSTEM="1",
        GIT_NO_REPLACE_OBJECTS="1",
        GIT_PAGER="cat",
        GIT_ASKPASS="true",
        SSH_ASKPASS="true",
    )
    if workspace is not None:
        env.update(GIT_DIR=str(workspace / ".git"), GIT_WORK_TREE=str(workspace))
        cwd = workspace
    config = [*_SAFE_CONFIG, *([f"protocol.{transport}.allow=always"] if transport else [])]
    command = ["git", *(part for item in config for part in ("-c", item)), *args]
    name = next((arg for arg in args if not arg.startswith("-") and "=" not in arg), "")
    try:
        done = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise WorkspaceError(f"git {name} timed out after {timeout:g}s") from exc
    except OSError as exc:  # no git, or the directory is gone
        raise WorkspaceError(f"git {name} could not run: {exc.strerror}") from exc
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit code {done.returncode}"]
        reason = next((line for line in lines if line.startswith(("fatal:", "error:"))), lines[-1])
        logger.info("git %s failed in %s: %s", name, cwd, reason)
        reason = _PATH_IN_MESSAGE.sub("<path>", reason.removeprefix("fatal: ").removeprefix("error: "))
        raise WorkspaceError(f"git {name} failed: {reason}")
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
    (a crash mid-clone, before its base commit was stored) is made again. Returns its path;
    raises WorkspaceError."""
    path = workspace_of(session.pk)
    with owning(session):
        if session.base_commit and _is_workspace(path):
            return path
        # Checked again: the repository may have gone, or the settings changed, since the API saw it.
        check_repository(session.repository, session.base_branch, tenant=session.tenant)
        _remove(session, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _clone(session, path)
        git("checkout", "--quiet", "-b", session.branch, workspace=path)
        base_commit = git("rev-parse", "HEAD", workspace=path).strip()
        session.base_commit = base_commit
        _write_git_config(session, path)
    type(session).objects.filter(pk=session.pk).update(base_commit=base_commit)
    logger.info("session %s: workspace %s on branch %s from %s", session.pk, path, session.branch, base_commit[:12])
    return path


def _clone(session, path: Path) -> None:
    """A clone of the base branch without hooks or templates. A local repository is cloned as if
    it were remote (--no-local): its object files are copied through a pack, not hard-linked,
    since an agent that can write the workspace could otherwise rewrite the source's objects
    through a shared inode."""
    args = ["clone", "--quiet", "--template=", "--single-branch", "--no-tags"]
    if session.base_branch:
        args += ["--branch", session.base_branch]
    timeout = settings.WORKSPACE_CLONE_TIMEOUT_SECONDS
    if is_remote(session.repository):
        url = normalise_repository(session.repository)
        git(*args, "--", url, str(path), transport=parse_url(url).scheme, timeout=timeout)
    else:
        source = str(_local_source(session.repository, session.tenant))
        git(*args, "--no-local", "--", source, str(path), transport="file", timeout=timeout)


def _is_workspace(path: Path) -> bool:
    git_dir = path / ".git"
    return git_dir.is_dir() and not git_dir.is_symlink()


def _git_config(session) -> str:
    """The workspace's .git/config as we write it when the workspace is made and again before we
    run git there after agents ran: made from the session row alone, nothing the agents wrote."""
    sha256 = len(session.base_commit) == 64
    lines = [
        "[core]",
        f"\trepositoryformatversion = {1 if sha256 else 0}",
        "\tfilemode = true",
        "\tbare = false",
        "\tlogallrefupdates = true",
    ]
    if sha256:
        lines += ["[extensions]", "\tobjectformat = sha256"]
    origin = session.repository.replace("\\", "\\\\").replace('"', '\\"')
    lines += ['[remote "origin"]', f'\turl = "{origin}"', "\tfetch = +refs/heads/*:refs/remotes/origin/*"]
    return "\n".join(lines) + "\n"


def _write_git_config(session, path: Path) -> None:
    config = path / ".git" / "config"
    _delete(config)  # a symbolic link or a directory planted there is replaced, never followed
    config.write_text(_git_config(session))


def _reset_git_dir(session, path: Path) -> None:
    """Make the workspace's .git ours again before we run git there: the agents could write it.
    Its config is rewritten (no fsmonitor, filter, diff driver or alias survives), its hooks,
    attributes, alternates and any pointer to another git directory are removed. A .git that is
    not a directory, or holds a symbolic link (our git would follow it out of the workspace), is
    refused."""
    git_dir = path / ".git"
    if git_dir.is_symlink() or not git_dir.is_dir():
        raise WorkspaceError("the workspace's .git is no longer a directory")
    for parent, dirs, files in os.walk(git_dir):
        if any(os.path.islink(os.path.join(parent, name)) for name in dirs + files):
            raise WorkspaceError("the workspace's .git holds a symbolic link")
    try:
        for name in ("hooks", "info/attributes", "commondir", "config.worktree", "objects/info/alternates"):
            _delete(git_dir / name)
        _write_git_config(session, path)
    except OSError as exc:  # say, a directory the agents made unwritable
        raise WorkspaceError(f"the workspace's .git could not be reset: {exc.strerror}") from exc


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def finish_workspace(session) -> dict:
    """Commit what the tasks left in the workspace on its branch, bring the branch back into a
    local source repository, and describe the result: the branch, the base and head commits, the
    files changed and the diff (capped at WORKSPACE_DIFF_LIMIT characters). Idempotent: nothing
    new to commit, nothing committed."""
    path = workspace_of(session.pk)
    if not session.repository or not session.base_commit or not path.is_dir():
        return {}
    with owning(session):
        _reset_git_dir(session, path)
        # The index is the agents' too: rebuilt from HEAD, so that every path in it is one git checked.
        git("read-tree", "HEAD", workspace=path)
        git("add", "--all", workspace=path)
        if git("status", "--porcelain", workspace=path).strip():
            git(
                "-c", "user.name=Industrial Orchestrator", "-c", "user.email=orchestrator@localhost",
                "commit", "--quiet", "--no-verify", "-m", f"{session.title}\n\nSession {session.pk}.",
                workspace=path,
            )  # fmt: skip
        head = git("rev-parse", "HEAD", workspace=path).strip()
        if not is_remote(session.repository):
            _fetch_branch_back(session, path)
    diff = git("diff", "--no-color", "--no-ext-diff", "--no-textconv", session.base_commit, head, workspace=path)
    limit = settings.WORKSPACE_DIFF_LIMIT
    files = []
    numstat = git("diff", "--numstat", "--no-ext-diff", "--no-textconv", session.base_commit, head, workspace=path)
    for line in numstat.splitlines():
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


def _fetch_branch_back(session, path: Path) -> None:
    """The workspace's HEAD becomes the session's branch in the source repository (forced: the
    workspace is the branch's only writer). Run in the source, under its lock; the objects that
    come in are checked (transfer.fsckObjects refuses, say, a tree that holds a `.git`)."""
    source = _local_source(session.repository, session.tenant)
    # git-upload-pack runs in the workspace, and git does not pass our -c settings on to a local
    # transport's process: they go on its own command line (a shell command, hence the quoting).
    upload_pack = shlex.join(["git", *(part for item in _SAFE_CONFIG for part in ("-c", item)), "upload-pack"])
    git(
        "-c", "transfer.fsckObjects=true",
        "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules",
        f"--upload-pack={upload_pack}", "--", str(path), f"+HEAD:refs/heads/{session.branch}",
        cwd=source, transport="file",
    )  # fmt: skip


def _count(figure: str) -> int | None:
    return None if figure == "-" else int(figure)  # "-" for a binary file


def remove_workspace(session) -> None:
    """Delete the session's workspace directory (remove_session_branch deletes its branch)."""
    path = workspace_of(session.pk)
    if session.repository:
        with owning(session):
            _remove(session, path)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def remove_session_branch(session) -> bool:
    """Delete the session's `io/session-*` branch from its local source repository, under the
    repository's lock; returns whether there was one to delete. Idempotent: no branch, no
    repository, or a URL (whose clone is the workspace itself, nothing is pushed) is nothing to
    do. Only the settings' roots are checked (the session's tenant may be gone already). Raises
    WorkspaceError when git refuses, for one checked out in the source, say."""
    if not session.repository or is_remote(session.repository):
        return False
    source = _local_source(session.repository, None)
    if not source.is_dir():
        return False
    ref = f"refs/heads/{session.branch}"
    with owning(session):
        try:
            git("rev-parse", "--verify", "--quiet", ref, cwd=source, timeout=10)
        except WorkspaceError:
            return False  # no such branch: deleted before, or never fetched back
        git("branch", "--delete", "--force", "--", session.branch, cwd=source)
    logger.info("session %s: branch %s deleted from its repository", session.pk, session.branch)
    return True


def discard_session_files(session) -> list[str]:
    """Remove what a deleted session left outside the database: its workspace directory and its
    branch. Returns what stays and why (each also logged), for the caller to report; an empty
    list when everything is gone. Run after the session's rows are deleted and committed."""
    stays = []
    for what, remove in (("workspace", remove_workspace), ("branch", remove_session_branch)):
        try:
            remove(session)
        except (WorkspaceError, LockUnavailable) as exc:
            logger.warning("session %s: its %s stays: %s", session.pk, what, exc)
            stays.append(f"session {session.pk}: its {what} stays: {exc}")
    return stays


def _remove(session, path: Path) -> None:
    worktree = (path / ".git").is_file()  # made by an earlier version, as a worktree of its source
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    if worktree and not is_remote(session.repository) and Path(session.repository).is_dir():
        with suppress(WorkspaceError):
            git("worktree", "prune", cwd=session.repository)
