"""The sandbox every process an executor starts runs in (docs/SECURITY.md).

With SANDBOX=bwrap, `Sandbox.popen()` wraps a command in bubblewrap so that it and everything it
spawns get:

- their own PID, IPC, UTS, cgroup and user namespaces: no platform process is visible, so none can
  be signalled, traced or have its environment read; the user id is one of our own (a per-workspace
  uid from SANDBOX_UID_BASE when the worker runs as root, shared only by the sandboxes of one
  workspace, so that no two sessions share a process budget), never root;
- their own network namespace: only their own loopback, where socat forwards HTTP_PROXY's port to
  an allow-listing proxy on a Unix socket of ours (agents.sandbox.proxy): the hosts in
  SANDBOX_ALLOWED_HOSTS and nothing else, so no route to PostgreSQL, Redis, the API or Flower;
- a filesystem of their own: the system (/usr, /etc) and the toolchains (Python, OpenCode)
  read-only, this session's workspace read-write, a private /tmp and HOME, and nothing else: not
  WORKSPACE_ROOT, not the project's source or settings, not the worker's home;
- resource limits (rlimits) from settings: data memory, processes, CPU seconds and file size; wall
  time is the task's deadline, which the executor enforces;
- an environment of only what the caller passes: bwrap itself runs with it, so not even the
  sandbox's PID 1 holds a secret.

SANDBOX=none (DEBUG only) runs the command as it is, with the same environment, and says so in
the log at every task start.
"""

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from django.conf import settings

from orchestrator_project import metrics

from .proxy import AllowListProxy

logger = logging.getLogger(__name__)

PROXY_PORT = 3128  # inside the sandbox, on its own loopback
RUN_DIR = "/run/io"  # inside the sandbox: the proxy's socket and the server's
SANDBOX_TMP = "/tmp"  # noqa: S108 - inside the sandbox: a private tmpfs of its own
SANDBOX_HOME = f"{SANDBOX_TMP}/home"
UID_RANGE = 1000
SERVER_PROCESS_RESERVE = 32  # of SANDBOX_MAX_PROCESSES, kept from a server's tools for the server
REQUIRED_TOOLS = ("bwrap", "socat", "prlimit", "setpriv")


class SandboxError(Exception):
    """The sandbox cannot be set up (a tool is missing, no uid is free)."""


@dataclass(frozen=True)
class Limits:
    memory_mb: int
    server_memory_mb: int  # a server's own (OpenCode); its tools get memory_mb
    processes: int
    cpu_seconds: int
    file_size_mb: int

    @classmethod
    def from_settings(cls) -> "Limits":
        return cls(
            memory_mb=settings.SANDBOX_MEMORY_MB,
            server_memory_mb=settings.SANDBOX_SERVER_MEMORY_MB,
            processes=settings.SANDBOX_MAX_PROCESSES,
            cpu_seconds=settings.SANDBOX_CPU_SECONDS,
            file_size_mb=settings.SANDBOX_FILE_SIZE_MB,
        )

    def describe(self) -> dict:
        return asdict(self)

    def prlimit(self, *, server: bool = False) -> list[str]:
        memory_mb = self.server_memory_mb if server else self.memory_mb
        return [
            "prlimit",
            f"--data={memory_mb * 1024 * 1024}",
            f"--nproc={self.processes}",
            f"--cpu={self.cpu_seconds}:{self.cpu_seconds + 5}",  # SIGXCPU first, SIGKILL if ignored
            f"--fsize={self.file_size_mb * 1024 * 1024}",
            "--core=0",
            "--",
        ]


# What a process killed by a signal ran into (bwrap exits with 128 + the child's signal).
_LIMIT_SIGNALS = {
    signal.SIGXFSZ: "the file size limit ({file_size_mb} MB)",
    signal.SIGXCPU: "the CPU time limit ({cpu_seconds} s)",
}


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


def install_hint() -> str:
    return "sudo apt-get install -y bubblewrap socat util-linux"


@dataclass
class Sandbox:
    """One task's sandbox. Use as a context manager; `popen()` starts a process inside it."""

    workspace: Path
    kind: str = field(default_factory=lambda: settings.SANDBOX)
    allowed_hosts: list[str] = field(default_factory=lambda: list(settings.SANDBOX_ALLOWED_HOSTS))
    limits: Limits = field(default_factory=Limits.from_settings)
    read_only: list[Path] = field(default_factory=list)
    run_dir: Path | None = None
    uid: int | None = None
    proxy: AllowListProxy | None = None
    _uid_lock: object = None  # the open file whose flock holds our uid

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def __enter__(self) -> "Sandbox":
        if not self.enabled:
            logger.warning("SANDBOX=none: running agent processes unsandboxed in %s (development only)", self.workspace)
            return self
        if missing := missing_tools():
            metrics.SANDBOX_REFUSALS.labels("tools_missing").inc()
            raise SandboxError(f"the sandbox needs {', '.join(missing)}: {install_hint()}")
        self.run_dir = Path(tempfile.mkdtemp(prefix="io-sandbox-"))
        try:
            if os.geteuid() == 0:
                self.uid, self._uid_lock = _take_uid(str(self.workspace.resolve()))
                _chown_tree(self.workspace, self.uid)
                os.chown(self.run_dir, self.uid, self.uid)
            self._write_tool_shell()
            self.proxy = AllowListProxy(self.run_dir / "proxy.sock", self.allowed_hosts).start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
        if self._uid_lock is not None:
            self._uid_lock.close()
            self._uid_lock = None

    def _write_tool_shell(self) -> None:
        """The shell a server in the sandbox (OpenCode) runs its tools with ($SHELL): bash with a
        smaller process budget than the server's, so that a fork bomb in a tool leaves the
        server room to answer (RLIMIT_NPROC counts the user's processes and threads), and with
        the data memory of any sandboxed command rather than the server's."""
        tools = max(8, self.limits.processes - SERVER_PROCESS_RESERVE)
        shell = self.run_dir / "bash"
        limits = f"ulimit -u {tools}\nulimit -d {self.limits.memory_mb * 1024}"  # -d: in KiB
        shell.write_text(f'#!/bin/bash\n{limits}\nexec /bin/bash "$@"\n')
        shell.chmod(0o755)

    @property
    def tool_shell(self) -> str:
        return f"{RUN_DIR}/bash"

    @property
    def refused_hosts(self) -> list[str]:
        return list(self.proxy.refused) if self.proxy else []

    def socket_path(self, name: str) -> Path:
        """Where a Unix socket the sandbox creates in its run directory appears outside it."""
        assert self.run_dir is not None
        return self.run_dir / name

    def environ(self, env: dict[str, str]) -> dict[str, str]:
        """The environment a sandboxed process gets: `env`, with HOME, TMPDIR and the proxy."""
        if not self.enabled:
            return env
        proxy = f"http://127.0.0.1:{PROXY_PORT}"
        return {
            **env,
            "HOME": SANDBOX_HOME,
            "TMPDIR": SANDBOX_TMP,
            **{name: proxy for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
            **{name.lower(): proxy for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
        }

    def popen(self, argv: list[str], *, env: dict[str, str], serve_port: int | None = None, **kwargs):
        """Start `argv` in the sandbox, in a new session (kill its process group to end it all).
        `serve_port`: a port the process listens on inside, exposed as socket_path("serve.sock");
        such a process is a server, with the server's data limit (Limits.server_memory_mb)."""
        env = self.environ(env)
        kwargs.setdefault("start_new_session", True)
        if not self.enabled:
            return subprocess.Popen(argv, env=env, cwd=self.workspace, **kwargs)
        limits = self.limits.prlimit(server=serve_port is not None)
        command = [*limits, *self._bwrap(), *self._user(), "/bin/sh", "-c", _BOOT, "boot", *argv]
        boot_env = {**env, "IO_SERVE_PORT": str(serve_port or "")}
        return subprocess.Popen(command, env=boot_env, cwd="/", **kwargs)

    def _bwrap(self) -> list[str]:
        if self.uid is not None:  # root: bwrap mounts as root, then setpriv drops to our uid
            args = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        else:  # not root: an unprivileged user namespace
            args = ["bwrap", "--unshare-all", "--disable-userns", "--uid", "1000", "--gid", "1000"]
        args += ["--die-with-parent", "--new-session", "--hostname", "sandbox"]
        for top in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
            host = Path("/") / top
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), f"/{top}"]
            elif host.is_dir():
                args += ["--ro-bind", str(host), f"/{top}"]
        args += ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
        args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", SANDBOX_TMP]
        read_only = [*toolchain_paths(), *self.read_only]
        # bwrap makes a bind's missing parents 0700: ours may be traversed, never listed.
        parents = {p for path in [*read_only, self.workspace, Path(RUN_DIR)] for p in path.parents}
        for parent in sorted(parents - {Path("/"), Path(SANDBOX_TMP)}):
            args += ["--perms", "0711", "--dir", str(parent)]
        for path in read_only:
            args += ["--ro-bind", str(path), str(path)]
        args += ["--bind", str(self.run_dir), RUN_DIR]
        args += ["--bind", str(self.workspace), str(self.workspace), "--chdir", str(self.workspace), "--"]
        return args

    def _user(self) -> list[str]:
        if self.uid is None:
            return []
        uid = str(self.uid)
        return ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", "--no-new-privs",
                "--bounding-set=-all", "--inh-caps=-all", "--"]  # fmt: skip

    def explain(self, returncode: int | None) -> str | None:
        """What limit a sandboxed command's exit status says it ran into, in words; None if none."""
        if not self.enabled or returncode is None or returncode <= 128:
            return None
        with contextlib.suppress(ValueError):
            template = _LIMIT_SIGNALS.get(signal.Signals(returncode - 128))
            if template:
                return template.format(**self.limits.describe())
        return None

    def report(self) -> dict:
        """What the task result says about the sandbox: which, its limits, what it refused."""
        if not self.enabled:
            return {"kind": "none"}
        return {"kind": self.kind, "limits": self.limits.describe(), "refused_hosts": self.refused_hosts}


# Inside the sandbox, before the command: the proxy bridge (and the server's, when asked),
# waiting until the proxy port listens (0100007F:0C38 is 127.0.0.1:3128 in /proc/net/tcp).
_BOOT = f"""
socat TCP-LISTEN:{PROXY_PORT},bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:{RUN_DIR}/proxy.sock 2>/dev/null &
if [ -n "$IO_SERVE_PORT" ]; then
  socat UNIX-LISTEN:{RUN_DIR}/serve.sock,fork,mode=600 TCP:127.0.0.1:$IO_SERVE_PORT 2>/dev/null &
fi
unset IO_SERVE_PORT
mkdir -p "$HOME"
i=0
while ! grep -q ' 0100007F:{PROXY_PORT:04X} ' /proc/net/tcp && [ $i -lt 500 ]; do i=$((i+1)); sleep 0.01; done
exec "$@"
"""


def toolchain_paths() -> list[Path]:
    """Read-only in every sandbox besides the system: this Python (and its virtualenv), the
    OpenCode binary's directory and SANDBOX_READ_ONLY_PATHS. Only what exists and lies outside
    /usr, which is there anyway."""
    paths = {Path(sys.base_prefix), Path(sys.prefix), Path(settings.OPENCODE_BIN).resolve().parent}
    paths.update(Path(p) for p in settings.SANDBOX_READ_ONLY_PATHS)
    kept = sorted(p for p in paths if p.exists() and not p.is_relative_to("/usr"))
    return [p for p in kept if not any(p != q and p.is_relative_to(q) for q in kept)]


def _take_uid(owner: str):
    """The user id of the sandboxes working in `owner` (a workspace) on this host: the one they
    already hold, else one that no sandbox holds. Sandboxes of one workspace share it, so that
    each can write what the other wrote; no other sandbox has it, so no other shares its process
    budget. Held by a shared flock on the slot's file (which names its owner) until the returned
    file is closed."""
    directory = Path(tempfile.gettempdir()) / "io-sandbox-uids"
    directory.mkdir(mode=0o700, exist_ok=True)
    with open(directory / "guard", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one chooser at a time on this host
        free = None
        for offset in range(UID_RANGE):
            path = directory / str(offset)
            if not path.exists():
                free = offset if free is None else free
                break
            handle = open(path, "r+")  # noqa: SIM115 - held until the sandbox ends
            if handle.read() == owner:
                fcntl.flock(handle, fcntl.LOCK_SH)
                return settings.SANDBOX_UID_BASE + offset, handle
            if free is None and _unheld(handle):
                free = offset
            handle.close()
        if free is None:
            metrics.SANDBOX_REFUSALS.labels("no_free_uid").inc()
            raise SandboxError(f"all {UID_RANGE} sandbox user ids are in use")
        handle = open(directory / str(free), "w")  # noqa: SIM115 - held until the sandbox ends
        handle.write(owner)
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_SH)
        return settings.SANDBOX_UID_BASE + free, handle


def _unheld(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(handle, fcntl.LOCK_UN)
    return True


def _chown_tree(root: Path, uid: int) -> None:
    """Give the workspace to the sandbox's user (what our git wrote there is root's)."""
    root.mkdir(parents=True, exist_ok=True)
    for directory, dirs, files in os.walk(root):
        for name in [directory, *(os.path.join(directory, n) for n in dirs + files)]:
            if os.lstat(name).st_uid != uid:
                os.lchown(name, uid, uid)
