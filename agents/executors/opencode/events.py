"""GET /event, OpenCode's stream of server events, read by a thread into a queue."""

import contextlib
import json
import queue
import socket
import threading

import httpx

from .client import CREDENTIALS_REJECTED

# The server sends a heartbeat every 10 s, so a read this long without a byte means a dead stream.
STREAM_READ_TIMEOUT_S = 30.0


class EventStream:
    """GET /event read by a thread into a queue, reconnecting on EOF or a read error.

    Items are ("event", dict), ("lost", reason) after the connection dropped (a new
    server.connected follows once it is back), and ("denied", reason) for a 401. The queue lets
    the run check should_abort and its deadline every POLL_S while the stream is quiet.
    """

    def __init__(self, client: httpx.Client) -> None:
        self.client = client  # its own: closed with the stream
        self.items: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(target=self._read_forever, name="opencode-events", daemon=True)

    def __enter__(self) -> "EventStream":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        sock = self._socket
        if sock is not None:
            # Closing from this thread would not wake the reader blocked in recv; shutdown does.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self.client.close()

    def _read_forever(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self._read_once()
                reason = "the server closed the event stream"
            except _Denied as exc:
                self.items.put(("denied", str(exc)))
                return
            except (httpx.HTTPError, httpx.StreamError, OSError, ValueError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if self._stop.is_set():
                return
            self.items.put(("lost", reason))
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _read_once(self) -> None:
        timeout = httpx.Timeout(self.client.timeout.connect or 10.0, read=STREAM_READ_TIMEOUT_S)
        with self.client.stream("GET", "/event", timeout=timeout) as response:
            if response.status_code == 401:
                raise _Denied(CREDENTIALS_REJECTED)
            if response.status_code >= 400:
                raise httpx.HTTPStatusError(
                    f"GET /event: HTTP {response.status_code}", request=response.request, response=response
                )
            stream = response.extensions.get("network_stream")
            self._socket = stream.get_extra_info("socket") if stream is not None else None
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith("data:"):
                    self.items.put(("event", json.loads(line[5:])))


class _Denied(Exception):
    pass
