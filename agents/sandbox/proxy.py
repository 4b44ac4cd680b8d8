"""The sandbox's only way out: an HTTP proxy on a Unix socket that admits only allowed hosts.

A sandbox has no network but its own loopback. Its HTTP_PROXY / HTTPS_PROXY point at a port on
that loopback, which socat inside the sandbox forwards to this proxy's socket (bind-mounted in);
the proxy answers `CONNECT host:port` (HTTPS and any TCP) and absolute-form `GET http://host/...`
requests for hosts in the allow list, and 403 for everything else. The proxy runs in the agent
process, one per sandbox, so what it refused is known to the task that ran there.

Kept small on purpose: it is the trust boundary between agent-run code and the network.
"""

import contextlib
import logging
import selectors
import socket
import socketserver
import threading
from pathlib import Path

from orchestrator_project import metrics

logger = logging.getLogger(__name__)

HEAD_LIMIT = 64 * 1024
CONNECT_TIMEOUT_S = 10.0


def allows(allowed: list[str], host: str, port: int) -> bool:
    """Whether `host:port` is in the allow list: `host` (ports 80 and 443), `host:port`, or
    `*.domain` (any subdomain, ports 80 and 443). Host names compare case-insensitively."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        name, _, entry_port = entry.lower().rpartition(":") if _has_port(entry) else (entry.lower(), "", "")
        if entry_port and int(entry_port) != port:
            continue
        if not entry_port and port not in (80, 443):
            continue
        if name == host or (name.startswith("*.") and host.endswith(name[1:])):
            return True
    return False


def _has_port(entry: str) -> bool:
    head, sep, tail = entry.rpartition(":")
    return bool(sep) and tail.isdigit() and not head.endswith(":")  # not a bare IPv6 address


class AllowListProxy:
    """Serve the proxy on `socket_path` from a daemon thread until stop()."""

    def __init__(self, socket_path: Path, allowed: list[str]) -> None:
        self.socket_path = socket_path
        self.allowed = list(allowed)
        self.refused: list[str] = []  # "host:port" of every refused request, in order
        self._server: socketserver.ThreadingUnixStreamServer | None = None

    def start(self) -> "AllowListProxy":
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy.handle(self.request)

        self._server = socketserver.ThreadingUnixStreamServer(str(self.socket_path), Handler)
        self._server.daemon_threads = True
        self.socket_path.chmod(0o666)  # the sandbox's user id differs from ours
        serve = self._server.serve_forever
        # A short poll: stop() waits for the serving loop's next poll.
        threading.Thread(target=serve, kwargs={"poll_interval": 0.02}, name="sandbox-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def handle(self, client: socket.socket) -> None:
        head, rest = _read_head(client)
        if head is None:
            return
        method, target, host, port = _parse_request_line(head)
        if host is None:
            _answer(client, 400, "not a proxy request")
            return
        if not allows(self.allowed, host, port):
            self.refused.append(f"{host}:{port}")
            metrics.SANDBOX_REFUSALS.labels("egress").inc()
            logger.warning("sandbox proxy refused %s:%s", host, port)
            _answer(client, 403, f"{host}:{port} is not in SANDBOX_ALLOWED_HOSTS")
            return
        try:
            upstream = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            _answer(client, 502, f"cannot connect to {host}:{port}: {exc.strerror or exc}")
            return
        with upstream:
            if method == "CONNECT":
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
            else:
                upstream.sendall(_origin_form(head, target) + rest)
            _pipe(client, upstream)


def _read_head(client: socket.socket) -> tuple[bytes | None, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(4096)
        if not chunk:
            return None, b""
        data += chunk
        if len(data) > HEAD_LIMIT:
            _answer(client, 431, "request head too large")
            return None, b""
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _parse_request_line(head: bytes) -> tuple[str, str, str | None, int]:
    """(method, target, host, port) of the request; host None when it is not a proxy request."""
    try:
        method, target, _version = head.split(b"\r\n", 1)[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        return "", "", None, 0
    if method == "CONNECT":
        authority = target
        default_port = 443
    elif target.startswith("http://"):
        authority = target.removeprefix("http://").split("/", 1)[0]
        default_port = 80
    else:
        return method, target, None, 0
    if "@" in authority:
        return method, target, None, 0
    host, port = authority, default_port
    if authority.startswith("["):  # [v6]:port
        host, _, tail = authority[1:].partition("]")
        port = int(tail[1:]) if tail.startswith(":") and tail[1:].isdigit() else default_port
    elif ":" in authority:
        host, _, raw_port = authority.rpartition(":")
        if not raw_port.isdigit():
            return method, target, None, 0
        port = int(raw_port)
    if not host or not 0 < port < 65536:
        return method, target, None, 0
    return method, target, host, port


def _origin_form(head: bytes, target: str) -> bytes:
    """The request as its origin server expects it: a path, not the proxy's absolute URL, and no
    Proxy-* headers."""
    path = "/" + target.removeprefix("http://").partition("/")[2]
    lines = head.split(b"\r\n")
    method, _, version = lines[0].split(b" ")
    kept = [line for line in lines[1:] if not line.lower().startswith(b"proxy-")]
    return b"\r\n".join([b" ".join([method, path.encode(), version]), *kept])


def _answer(client: socket.socket, status: int, reason: str) -> None:
    body = f"sandbox proxy: {reason}\n".encode()
    head = f"HTTP/1.1 {status} Refused\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    with contextlib.suppress(OSError):
        client.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    a.settimeout(None)
    b.settimeout(None)
    with selectors.DefaultSelector() as selector:
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        while True:
            for key, _ in selector.select():
                try:
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
                except OSError:
                    return
