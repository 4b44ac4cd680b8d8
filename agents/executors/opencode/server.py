"""An `opencode serve` for one task: started in the task's sandbox (agents.sandbox) with a
generated password and a scrubbed environment, reached over a Unix socket only the agent can
open, and stopped when the task ends. With SANDBOX=none it listens on a loopback port instead."""

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

from agents.sandbox import Sandbox

logger = logging.getLogger(__name__)

SANDBOX_PORT = 4096  # inside the sandbox's own network namespace: never taken


class OpenCodeServerError(Exception):
    """`opencode serve` could not be started."""


_LISTENING = re.compile(r"opencode server listening on (https?://\S+)")
_OUR_SETTINGS = {
    "OPENCODE_URL", "OPENCODE_SERVER_USERNAME", "OPENCODE_SERVER_PASSWORD", "OPENCODE_BIN", "OPENCODE_MODEL",
    "OPENCODE_CONFIG", "OPENCODE_CONFIG_CONTENT", "OPENCODE_PERMISSION_POLICY", "OPENCODE_QUESTION_POLICY",
    "OPENCODE_REQUEST_TIMEOUT_SECONDS", "OPENCODE_BREAKER_FAIL_MAX", "OPENCODE_BREAKER_RESET_SECONDS",
}  # fmt: skip


class OpenCodeServer:
    """An `opencode serve` owned by this process: a generated password and OPENCODE_CONFIG_CONTENT
    built from settings. In `sandbox` (enabled) it listens on the sandbox's own loopback and is
    reached through `socket`; otherwise on a free loopback port with a private HOME/XDG state
    directory. Stopped by stop() or at exit; it dies with this process if that is killed."""

    def __init__(
        self,
        *,
        binary: str | Path,
        config: dict,
        username: str = "opencode",
        password: str | None = None,
        startup_timeout_s: float = 60.0,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.binary = Path(binary)
        self.config = config
        self.username = username
        self.password = password or secrets.token_urlsafe(24)
        self.startup_timeout_s = startup_timeout_s
        self.sandbox = sandbox if sandbox is not None and sandbox.enabled else None
        self.url = ""
        self.socket: Path | None = None  # the Unix socket to reach a sandboxed server through
        self.state_dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.output: deque[str] = deque(maxlen=200)
        self._drainer: threading.Thread | None = None
        self._owner_pid = os.getpid()

    def __repr__(self) -> str:  # never the password
        return f"OpenCodeServer(url={self.url!r}, binary={str(self.binary)!r})"

    @classmethod
    def from_settings(cls, sandbox: Sandbox | None = None) -> "OpenCodeServer":
        config = {"autoupdate": False, "share": "disabled", **settings.OPENCODE_CONFIG}
        if settings.OPENCODE_MODEL:
            config["model"] = settings.OPENCODE_MODEL
        return cls(
            binary=settings.OPENCODE_BIN,
            config=config,
            username=settings.OPENCODE_SERVER_USERNAME,
            sandbox=sandbox,
        )

    def __enter__(self) -> "OpenCodeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "OpenCodeServer":
        if not os.access(self.binary, os.X_OK):
            raise OpenCodeServerError(
                f"no opencode binary at {self.binary}: run `make opencode` (npm install) or set OPENCODE_BIN"
            )
        output = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
        output.update(text=True, errors="replace")
        if self.sandbox is not None:
            env = {**self._env(), "SHELL": self.sandbox.tool_shell}  # tools: a smaller process budget
            self.proc = self.sandbox.popen(self._argv(SANDBOX_PORT), env=env, serve_port=SANDBOX_PORT, **output)
        else:
            self.state_dir = Path(tempfile.mkdtemp(prefix="opencode-state-"))
            self.proc = subprocess.Popen(
                self._argv(_free_port()),
                cwd=self.state_dir,
                env=self._env(),
                start_new_session=True,  # stop() ends the server and whatever its tools started
                preexec_fn=_die_with_parent,  # one libc call between fork and exec: takes no lock
                **output,
            )
        ready = threading.Event()
        self._drainer = threading.Thread(target=self._drain, args=(ready,), name="opencode-serve-output", daemon=True)
        self._drainer.start()
        atexit.register(self.stop)
        if not ready.wait(self.startup_timeout_s) or not self.url:
            state = "exited" if self.proc.poll() is not None else f"not ready after {self.startup_timeout_s:g}s"
            self.stop()
            output = "".join(self.output).strip() or "(no output)"
            raise OpenCodeServerError(f"opencode serve {state}; its output:\n{output}")
        if self.sandbox is not None:
            self.socket = self.sandbox.socket_path("serve.sock")  # socat listened before the server ran
            self.url = "http://opencode"
        logger.info("started opencode serve (pid %s) at %s", self.proc.pid, self.socket or self.url)
        return self

    def _argv(self, port: int) -> list[str]:
        return [str(self.binary.resolve()), "serve", "--hostname", "127.0.0.1", "--port", str(port)]

    def environ(self) -> dict[str, str]:
        """What a client of this server needs."""
        return {
            "OPENCODE_URL": self.url,
            "OPENCODE_SERVER_USERNAME": self.username,
            "OPENCODE_SERVER_PASSWORD": self.password,
        }

    def _env(self) -> dict[str, str]:
        # The model's bash tool inherits this environment: only what the server needs passes, never
        # the worker's secrets (SECRET_KEY, DATABASE_URL ...). Our settings share opencode's
        # OPENCODE_ prefix and one name (to opencode, OPENCODE_CONFIG is a file path); its own
        # flags (OPENCODE_DISABLE_...) and provider keys (*_API_KEY, OPENCODE_SERVER_ENV) pass.
        env = {key: value for key, value in os.environ.items() if _passes_to_server(key)}
        # The version is pinned in package-lock.json; the workspace is hostile input, so its own
        # opencode.json / .opencode (permissions, MCP servers, plugins, providers) must not
        # configure the server; and a sandboxed server can reach only the model's host anyway.
        for flag in ("AUTOUPDATE", "PROJECT_CONFIG", "MODELS_FETCH", "LSP_DOWNLOAD", "SHARE"):
            env.setdefault(f"OPENCODE_DISABLE_{flag}", "1")
        if self.state_dir is not None:  # a sandbox has a private HOME of its own
            home = self.state_dir
            env.update(
                HOME=str(home),
                XDG_CONFIG_HOME=str(home / "config"),
                XDG_DATA_HOME=str(home / "data"),
                XDG_CACHE_HOME=str(home / "cache"),
                XDG_STATE_HOME=str(home / "state"),
            )
        env.update(
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

    def last_output(self, limit: int = 4000) -> str:
        """The end of what the server printed (a crash report, say), once its pipe has been read to
        the end, with the secrets it was given redacted. A tool in the sandbox can write to the
        server's output too: log it as data (%r), never as lines of our own."""
        if self._drainer is not None:
            self._drainer.join(timeout=2)
        text = "".join(self.output)[-limit:]
        secrets_given = [self.password, *(value for key, value in os.environ.items() if _is_secret(key))]
        for secret in filter(None, secrets_given):
            text = text.replace(secret, "[redacted]")
        return text.strip()

    def stop(self) -> None:
        """Kill the server and whatever its tools started. Its state is thrown away with it, so
        there is nothing to flush (and after serving a session, 1.18.33 ignores SIGTERM)."""
        if self.proc is None or os.getpid() != self._owner_pid:
            return  # forked pool processes inherit this object; only the owner stops the server
        atexit.unregister(self.stop)
        if self.proc.poll() is None:
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


def _is_secret(key: str) -> bool:
    """A provider credential the server is given (its keys, OPENCODE_SERVER_ENV)."""
    return key in settings.OPENCODE_SERVER_ENV or key.endswith("_API_KEY")


def _passes_to_server(key: str) -> bool:
    if key in _SERVER_ENV or _is_secret(key):
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
