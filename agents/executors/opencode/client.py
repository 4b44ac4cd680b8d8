"""The OpenCode server's HTTP API as a run calls it, with the server's answers turned into what
the engine understands: TaskFailed (the task's fault, never retried) or TransientError (try
again later). GETs are repeated a few times; a POST never is (the server queues every prompt it
receives, so a repeat could run the work twice)."""

import logging
import time
from typing import Any

import httpx

from agents.executors import TaskFailed, TransientError

logger = logging.getLogger(__name__)

CREDENTIALS_REJECTED = "OpenCode server rejected our credentials (401)"
GET_ATTEMPTS = 3


def error_message(response: httpx.Response) -> str:
    """The server's error text; bodies are {name, data: {message}} or {_tag, message} (or empty)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if not isinstance(body, dict):
        return str(body)[:500]
    name = body.get("name") or body.get("_tag") or ""
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    message = data.get("message") or body.get("message") or ""
    return f"{name}: {message}" if name and message else (name or message or response.reason_phrase)


def describe_error(error: dict) -> str:
    """A MessageError {name, data: {message, ...}} as 'APIError: the provider said ...'."""
    data = error.get("data") if isinstance(error.get("data"), dict) else {}
    message = data.get("message") or ""
    return f"{error.get('name', 'UnknownError')}: {message}" if message else str(error.get("name", "UnknownError"))


def raise_for_status(response: httpx.Response, what: str, result: dict | None = None) -> None:
    """A 401 or another 4xx fails the task (with `result`, what the run got so far); a 5xx is
    transient."""
    if response.status_code < 400:
        return
    if response.status_code == 401:
        raise TaskFailed(CREDENTIALS_REJECTED, result=result)
    message = f"OpenCode {what} failed: HTTP {response.status_code} {error_message(response)}"
    if response.status_code >= 500:
        raise TransientError(message)
    raise TaskFailed(message, result=result)


class OpenCodeClient:
    """The calls of one run, on an httpx client scoped to its workspace (`?directory=`). `result`
    is what the run got so far: a TaskFailed carries it."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def post(self, path: str, body: dict, what: str, result: dict | None = None) -> Any:
        try:
            response = self.http.post(path, json=body)
        except httpx.TransportError as exc:
            raise TransientError(f"{what} on OpenCode failed: {type(exc).__name__}: {exc}") from None
        raise_for_status(response, what, result)
        return response.json()

    def get(self, path: str, what: str, params: dict | None = None, result: dict | None = None) -> Any:
        """GETs are safe to repeat: a few attempts before a TransientError."""
        attempt = 1
        while True:
            try:
                response = self.http.get(path, params=params)
            except httpx.TransportError as exc:
                if attempt == GET_ATTEMPTS:
                    raise TransientError(f"{what} on OpenCode failed: {type(exc).__name__}: {exc}") from None
                time.sleep(0.25 * 2**attempt)
                attempt += 1
                continue
            raise_for_status(response, what, result)
            return response.json()

    def reply(self, path: str, body: dict | None, what: str, result: dict | None = None) -> None:
        """Answer a permission or question request; one answered already (404) is left alone."""
        try:
            response = self.http.post(path, json=body) if body is not None else self.http.post(path)
        except httpx.TransportError as exc:
            raise TransientError(f"{what} failed: {type(exc).__name__}: {exc}") from None
        if response.status_code == 404:  # answered already (or expired): nothing waits on it now
            logger.info("%s: %s", what, error_message(response))
            return
        raise_for_status(response, what, result)

    def abort(self, session_id: str) -> None:
        """POST /abort, and only log a failure: the caller is already giving up on the run."""
        try:
            self.http.post(f"/session/{session_id}/abort")
        except httpx.HTTPError as exc:
            logger.warning("aborting OpenCode session %s failed: %s", session_id, exc)
