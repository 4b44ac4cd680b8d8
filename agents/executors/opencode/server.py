"""An `opencode serve` owned by an agent worker: started on a loopback port with a generated
password, a private state directory and a scrubbed environment, stopped with the worker."""

import atexit
import contextlib
import ctypes
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections import deque
from pathlib import Path

from django.conf import settings

logger = logging.getLogger(__name__)

STOP_GRACE_S = 1.0


class OpenCodeServerError(Exception):
    """`opencode serve` could not be started."""


_LISTENING = re.compile(r"opencode server listening on (https?://\S+)")
_OUR_SETTINGS = {
    "OPENCODE_URL", "OPENCODE_SERVER_USERNAME", "OPENCODE_SERVER_PASSWORD", "OPENCODE_BIN", "OPENCODE_MODEL",
    "OPENCODE_CONFIG", "OPENCODE_CONFIG_CONTENT", "OPENCODE_PERMISSION_POLICY", "OPENCODE_QUESTION_POLICY",
    "OPENCODE_REQUEST_TIMEOUT_SECONDS", "OPENCODE_BREAKER_FAIL_MAX", "OPENCODE_BREAKER_RESET_SECONDS",
}  # fmt: skip


class OpenCodeServer:
    """An `opencode serve` owned by this process: a loopback port, a generated password, a
    private HOME/XDG state directory and OPENCODE_CONFIG_CONTENT built from settings. Stopped
    by stop() or at exit; PR_SET_PDEATHSIG kills it if its parent is killed outright."""

    def __init__(
        self,
        *,
        binary: str | Path,
        config: dict,
        username: str = "opencode",
        password: str | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.binary = Path(binary)
        self.config = config
        self.username = username
        self.password = password or secrets.token_urlsafe(24)
        self.startup_timeout_s = startup_timeout_s
        self.url = ""
        self.state_dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.output: deque[str] = deque(maxlen=200)
        self._owner_pid = os.getpid()

    def __repr__(self) -> str:  # never the password
        return f"OpenCodeServer(url={self.url!r}, binary={str(self.binary)!r})"

    @classmethod
    def from_settings(cls) -> "OpenCodeServer":
        config = {"autoupdate": False, "share": "disabled", **settings.OPENCODE_CONFIG}
        if settings.OPENCODE_MODEL:
            config["model"] = settings.OPENCODE_MODEL
        return cls(binary=settings.OPENCODE_BIN, config=config, username=settings.OPENCODE_SERVER_USERNAME)

    def environ(self) -> dict[str, str]:
        """What a client of this server needs (run_agent exports it for the pool processes)."""
        return {
            "OPENCODE_URL": self.url,
            "OPENCODE_SERVER_USERNAME": self.username,
            "OPENCODE_SERVER_PASSWORD": self.password,
        }

    def start(self) -> "OpenCodeServer":
        if not os.access(self.binary, os.X_OK):
            raise OpenCodeServerError(
                f"no opencode binary at {self.binary}: run `make opencode` (npm ci) or set OPENCODE_BIN"
            )
        self.state_dir = Path(tempfile.mkdtemp(prefix="opencode-state-"))
        port = _free_port()
        self.proc = subprocess.Popen(
            [str(self.binary), "serve", "--hostname", "127.0.0.1", "--port", str(port)],
            cwd=self.state_dir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # stop() ends the server and whatever its tools started
            preexec_fn=_die_with_parent,  # one libc call between fork and exec: takes no lock
        )
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(ready,), name="opencode-serve-output", daemon=True).start()
        atexit.register(self.stop)
        if not ready.wait(self.startup_timeout_s) or not self.url:
            state = "exited" if self.proc.poll() is not None else f"not ready after {self.startup_timeout_s:g}s"
            self.stop()
            output = "".join(self.output).strip() or "(no output)"
            raise OpenCodeServerError(f"opencode serve {state}; its output:\n{output}")
        logger.info("started opencode serve (pid %s) at %s", self.proc.pid, self.url)
        return self

    def _env(self) -> dict[str, str]:
        home = self.state_dir
        # The model's bash tool inherits this environment: only what the server needs passes, never
        # the worker's secrets (SECRET_KEY, DATABASE_URL ...). Our settings share opencode's
        # OPENCODE_ prefix and one name (to opencode, OPENCODE_CONFIG is a file path); its own
        # flags (OPENCODE_DISABLE_...) and provider keys (*_API_KEY, OPENCODE_SERVER_ENV) pass.
        env = {key: value for key, value in os.environ.items() if _passes_to_server(key)}
        env.setdefault("OPENCODE_DISABLE_AUTOUPDATE", "1")  # the version is pinned in package-lock.json
        env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / "config"),
            XDG_DATA_HOME=str(home / "data"),
            XDG_CACHE_HOME=str(home / "cache"),
            XDG_STATE_HOME=str(home / "state"),
            OPENCODE_SERVER_USERNAME=self.username,
            OPENCODE_SERVER_PASSWORD=self.password,
            OPENCODE_CONFIG_CONTENT=json.dumps(self.config),
        )
        return env

    def _drain(self, ready: threading.Event) -> None:
        """Read the server's output for its ready line, then keep the pipe from filling up."""
        for line in self.proc.stdout:
            self.output.append(line)
            found = _LISTENING.search(line)
            if found and not ready.is_set():
                self.url = found.group(1).rstrip("/")
                ready.set()
        self.proc.wait()
        ready.set()  # it exited: start() reports that rather than waiting out its timeout

    def stop(self) -> None:
        if self.proc is None or os.getpid() != self._owner_pid:
            return  # forked pool processes inherit this object; only the owner stops the server
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                # 1.18.33 exits at once on SIGTERM until it has served a session; afterwards it
                # ignores it. Its state directory is thrown away, so there is nothing to flush.
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None


_SERVER_ENV = {
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
}  # fmt: skip


def _passes_to_server(key: str) -> bool:
    if key in _SERVER_ENV or key in settings.OPENCODE_SERVER_ENV or key.endswith("_API_KEY"):
        return True
    return key.startswith("OPENCODE_") and key not in _OUR_SETTINGS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # not Linux/glibc: no parent-death signal, stop() and atexit still apply
    _libc = None


def _die_with_parent() -> None:
    if _libc is not None and hasattr(_libc, "prctl"):
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; SIGKILL, as it may ignore SIGTERM


def start_server_for_worker() -> OpenCodeServer:
    """Start the agent's own `opencode serve` and point this process and its future pool
    processes at it: the environment for anything exec'd, settings for the forked children
    (settings were read before the server existed)."""
    server = OpenCodeServer.from_settings().start()
    os.environ.update(server.environ())
    settings.OPENCODE_URL = server.url
    settings.OPENCODE_SERVER_USERNAME = server.username
    settings.OPENCODE_SERVER_PASSWORD = server.password
    return server
