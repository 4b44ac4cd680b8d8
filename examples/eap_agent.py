#!/usr/bin/env python3
"""A reference external agent for the External Agent Protocol (docs/EAP.md).

It shows the whole wire contract in one file (standard library + httpx, no Django): it
registers with an operator's API token, heartbeats on a thread, receives tasks by pull (polling
GET /api/v1/eap/tasks/next/) or by push (serving a signed POST /task, whose signature and
timestamp it verifies), does the "work" and reports the result.

The work is a stand-in, not a coding agent: it counts the words of the task's instructions
and echoes them back. A few task params change its behaviour, for trying out the orchestrator's
failure handling: {"reference": {"sleep_s": 2}} works that long first, {"reference": {"fail":
true}} reports a failure, {"reference": {"silent": true}} never reports.

    EAP_OPERATOR_TOKEN=... python examples/eap_agent.py --url http://127.0.0.1:8000 \\
        --mode pull --capabilities documentation,code_review

It prints one JSON line with its agent id on start (never the token or the signing secret),
and exits cleanly on SIGTERM or Ctrl-C.
"""

import argparse
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

MAX_BODY = 1_048_576
SIGNATURE_TOLERANCE_S = 300


def log(message: str) -> None:
    print(f"eap-agent: {message}", file=sys.stderr, flush=True)


def signature_problem(
    secret: str, timestamp: str, body: bytes, signature: str, now: float, previous_signature: str = ""
) -> str | None:
    """Why a push request's signature is not acceptable, or None. The signed material is
    "<X-EAP-Timestamp>.<raw body>"; the timestamp must be recent, so an old capture cannot be
    replayed. In the grace of a rotation, X-EAP-Signature is by the new secret and
    X-EAP-Signature-Previous by the old one: either matching our secret will do."""
    if not timestamp.isdigit():
        return "missing or malformed X-EAP-Timestamp"
    if abs(now - int(timestamp)) > SIGNATURE_TOLERANCE_S:
        return "X-EAP-Timestamp is too old or in the future"
    expected = "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected.encode(), given.encode()) for given in (signature, previous_signature)):
        return "bad X-EAP-Signature"
    return None


def do_the_work(task: dict) -> dict | None:
    """The stand-in for real work: a result dict, or None to never report."""
    knobs = task.get("params", {}).get("reference", {})
    if not isinstance(knobs, dict):
        knobs = {}
    time.sleep(float(knobs.get("sleep_s", 0)))
    if knobs.get("silent"):
        return None
    words = len(task.get("instructions", "").split())
    output = f"reference agent: {words} words in the instructions of {task.get('title', '')!r}"
    if knobs.get("fail"):
        return {"status": "failed", "output": output, "error": "the reference agent was asked to fail"}
    artifacts = [{"path": "instructions.txt", "content": task.get("instructions", "")}]
    return {"status": "completed", "output": output, "artifacts": artifacts}


@dataclass
class Taken:
    """A push this agent took: when, and its inline result once there is one."""

    at: float
    result: dict | None = None
    report_later: bool = False  # a repeat was answered 202 while the inline work still ran


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self.load = 0
        self.load_lock = threading.Lock()
        self.agent_id = self.token = self.secret = None
        self.heartbeat_interval = 10.0
        # The pushes taken, by delivery id (signed with the body): a push whose id was seen already
        # is a retry or a replay, never new work. Kept for twice the signature tolerance, after
        # which a replay's timestamp is refused anyway.
        self.taken: dict[int, Taken] = {}
        self.taken_lock = threading.Lock()

    def take(self, delivery_id: int) -> tuple[Taken, bool]:
        """The record of this delivery, and whether this push is its first."""
        now = time.time()
        with self.taken_lock:
            for old in [d for d, t in self.taken.items() if now - t.at > 2 * SIGNATURE_TOLERANCE_S]:
                del self.taken[old]
            first = delivery_id not in self.taken
            return self.taken.setdefault(delivery_id, Taken(now)), first

    def answer_repeat(self, taken: Taken) -> dict | None:
        """The result to answer a repeated push with (an inline result that is ready), or None: then
        the answer is 202 and, should the first push still be working inline, the result goes to the
        result endpoint when it is done, since the gateway is no longer waiting for the first answer."""
        with self.taken_lock:
            if taken.result is None:
                taken.report_later = True
            return taken.result

    def finish_inline(self, task: dict, taken: Taken, result: dict) -> None:
        with self.taken_lock:
            taken.result = result
            report = taken.report_later
        if report:
            self.report(task["task_id"], result)

    def client(self, **headers) -> httpx.Client:
        return httpx.Client(base_url=self.args.url, timeout=30.0, headers=headers)

    def register(self, endpoint_url: str | None) -> None:
        body = {"name": self.args.name, "capabilities": self.args.capabilities, "mode": self.args.mode}
        if endpoint_url:
            body["endpoint_url"] = endpoint_url
        with self.client(Authorization=f"Token {self.args.operator_token}") as http:
            reply = http.post("/api/v1/eap/register/", json=body)
        if reply.status_code != 201:
            raise SystemExit(f"eap-agent: registration failed: HTTP {reply.status_code}: {reply.text[:500]}")
        registration = reply.json()
        self.agent_id, self.token = registration["agent_id"], registration["token"]
        self.secret = registration["signing_secret"]
        self.heartbeat_interval = float(registration["heartbeat_interval_s"])
        announced = {"agent_id": self.agent_id, "name": self.args.name, "mode": self.args.mode}
        print(json.dumps({**announced, "endpoint_url": endpoint_url}), flush=True)

    def agent_client(self) -> httpx.Client:
        return self.client(**{"X-Agent-Token": self.token})

    def heartbeat(self, http: httpx.Client, status: str | None = None) -> None:
        with self.load_lock:
            load = self.load
        body = {"status": status or ("busy" if load >= self.args.concurrency else "online"), "current_load": load}
        try:
            reply = http.post("/api/v1/eap/heartbeat/", json=body)
            if reply.status_code != 204:
                log(f"heartbeat answered HTTP {reply.status_code}: {reply.text[:200]}")
        except httpx.HTTPError as exc:
            log(f"heartbeat failed: {exc!r}")

    def beat_until_stopped(self) -> None:
        with self.agent_client() as http:
            while not self.stop.wait(self.heartbeat_interval):
                self.heartbeat(http)

    def run_task(self, task: dict) -> None:
        with self.load_lock:
            self.load += 1
        try:
            log(f"working on task {task['task_id']} attempt {task.get('attempt')} ({task['capability']})")
            result = do_the_work(task)
            if result is not None:
                self.report(task["task_id"], result)
        finally:
            with self.load_lock:
                self.load -= 1

    def report(self, task_id: str, result: dict) -> None:
        with self.agent_client() as http:
            for attempt in range(5):
                try:
                    reply = http.post(f"/api/v1/eap/tasks/{task_id}/result/", json=result)
                except httpx.HTTPError as exc:
                    log(f"reporting task {task_id} failed ({exc!r}); trying again")
                    time.sleep(min(8, 0.5 * 2**attempt))
                    continue
                if reply.status_code == 200:
                    log(f"reported task {task_id} {result['status']}")
                elif reply.status_code == 409:  # the orchestrator gave up on it (deadline, cancel)
                    log(f"task {task_id} no longer wants a result: {reply.json()['error']['message']}")
                else:
                    log(f"reporting task {task_id} answered HTTP {reply.status_code}: {reply.text[:300]}")
                return

    def pull_until_stopped(self) -> None:
        with self.agent_client() as http:
            while not self.stop.is_set():
                with self.load_lock:
                    full = self.load >= self.args.concurrency
                if full:
                    self.stop.wait(self.args.poll_interval)
                    continue
                try:
                    reply = http.get("/api/v1/eap/tasks/next/")
                except httpx.HTTPError as exc:
                    log(f"tasks/next failed: {exc!r}")
                    self.stop.wait(self.args.poll_interval)
                    continue
                if reply.status_code == 200:
                    threading.Thread(target=self.run_task, args=(reply.json(),), daemon=True).start()
                else:
                    if reply.status_code != 204:
                        log(f"tasks/next answered HTTP {reply.status_code}: {reply.text[:200]}")
                    self.stop.wait(self.args.poll_interval)


def push_handler(agent: Agent) -> type[BaseHTTPRequestHandler]:
    class TaskHandler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/task":
                return self.answer(404, {"error": "not found"})
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self.answer(413, {"error": "body too large"})
            body = self.rfile.read(length)
            problem = signature_problem(
                agent.secret,
                self.headers.get("X-EAP-Timestamp", ""),
                body,
                self.headers.get("X-EAP-Signature", ""),
                time.time(),
                self.headers.get("X-EAP-Signature-Previous", ""),
            )
            if problem:
                log(f"refused a push: {problem}")
                return self.answer(401, {"error": problem})
            try:
                task = json.loads(body)
                task["task_id"], task["delivery_id"]  # the fields we cannot do without
            except (ValueError, KeyError, TypeError):
                return self.answer(400, {"error": "not a task"})
            taken, first = agent.take(task["delivery_id"])
            if not first:
                # The same delivery again: a retry after a timeout, or a replay. The work is not done
                # twice: the answer is the first push's inline result, or 202.
                log(f"delivery {task['delivery_id']} was pushed already: not running it again")
                result = agent.answer_repeat(taken)
                return self.answer(200, result) if result else self.answer(202, {"repeat": True})
            if agent.args.inline:
                result = do_the_work(task)
                if result is None:  # silent: never reports
                    return self.answer(202, {})
                agent.finish_inline(task, taken, result)
                return self.answer(200, result)
            threading.Thread(target=agent.run_task, args=(task,), daemon=True).start()
            return self.answer(202, {"accepted": task["task_id"]})

        def answer(self, status: int, body: dict) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format, *args) -> None:
            pass  # requests are logged by the handler where it matters

    return TaskHandler


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the orchestrator, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--operator-token",
        default=os.environ.get("EAP_OPERATOR_TOKEN"),
        help="an operator's or admin's API token (default: $EAP_OPERATOR_TOKEN; the environment keeps it "
        "out of process listings)",
    )
    parser.add_argument("--name", default=f"reference-{socket.gethostname().lower()[:40]}-{os.getpid()}")
    parser.add_argument("--capabilities", required=True, help="comma-separated, e.g. documentation,code_review")
    parser.add_argument("--mode", choices=["push", "pull"], required=True)
    parser.add_argument("--host", default="127.0.0.1", help="push: the address to serve on")
    parser.add_argument("--port", type=int, default=0, help="push: the port to serve on (0: any free one)")
    parser.add_argument("--advertise-url", help="push: the endpoint to register (default: http://HOST:PORT)")
    parser.add_argument("--inline", action="store_true", help="push: answer 200 with the result instead of 202")
    parser.add_argument("--concurrency", type=int, default=4, help="tasks worked on at once")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="pull: seconds between empty polls")
    args = parser.parse_args(argv)
    if not args.operator_token:
        parser.error("give --operator-token or set EAP_OPERATOR_TOKEN")
    args.capabilities = [c.strip() for c in args.capabilities.split(",") if c.strip()]
    args.name = "".join(c if c.isalnum() or c in "-_" else "-" for c in args.name.lower())
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    agent = Agent(args)
    server = None
    endpoint_url = None
    if args.mode == "push":
        server = ThreadingHTTPServer((args.host, args.port), push_handler(agent))
        server.daemon_threads = True
        endpoint_url = args.advertise_url or f"http://{args.host}:{server.server_address[1]}"
    agent.register(endpoint_url)

    def stop(signum, frame) -> None:
        agent.stop.set()
        if server is not None:  # shutdown() waits for serve_forever, which runs on the main thread
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=agent.beat_until_stopped, name="heartbeat", daemon=True).start()
    log(f"agent {args.name} ({args.mode}) running; capabilities {', '.join(args.capabilities)}")
    if server is not None:
        server.serve_forever(poll_interval=0.2)
        server.server_close()
    else:
        agent.pull_until_stopped()
    with agent.agent_client() as http:  # say so at once rather than fall silent
        agent.heartbeat(http, status="draining")
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
