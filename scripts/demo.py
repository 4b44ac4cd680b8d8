"""Run one real coding session end to end on a private copy of the stack, then stop it.

`make demo` runs this. It checks PostgreSQL and Redis for its own database (ensure_services.py),
makes a small git repository whose `slugify` is not written yet (scripts/demo/repo), and starts
scripts/up.sh with the demo's Procfile (scripts/demo/Procfile) on its own database, Redis
database and ports, so it never collides with a running `make up` or with the test suite:
web, the orchestrator worker, beat, a mock LLM (mockllm, offline) and three agents:

- coder: the OpenCode executor driving the real `opencode serve` (npm opencode-ai), whose model
  is the mock LLM; it writes the code;
- tester: the shell executor running `python -m pytest -q` in the session's workspace;
- reviewer: the shell executor running `ruff check .` there.

It submits the session through the REST API, prints every transition as it happens, then the
session's branch and final diff, and stops everything it started.
Exit code 0 means the session reached `completed`.

Only the standard library, httpx and mockllm: this is also an example of a client of the API.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages are beside it
from mockllm.server import provider_config  # noqa: E402

LOG_PATH = ROOT / ".run" / "demo-stack.log"
WEB_PORT = 18000
DATABASE_URL = "postgres://postgres@127.0.0.1:5432/orchestrator_demo"
REDIS_URL = "redis://127.0.0.1:6379/1"
AGENTS = ("coder", "tester", "reviewer")
MOCKLLM_PORT = 18765
DEMO_REPO = ROOT / ".run" / "demo-repo"
WORKSPACES = ROOT / ".run" / "demo-workspaces"
OPENCODE_BIN = ROOT / "node_modules" / ".bin" / "opencode"
STARTUP_TIMEOUT_S = 90.0
SESSION_DEADLINE_S = 120.0
STOP_GRACE_S = 20.0
POLL_S = 0.3
# Statuses after which nothing more happens without an operator (docs/ARCHITECTURE.md, the session state machine).
SETTLED = {"completed", "partially_completed", "cancelled", "failed", "timeout", "stopped", "orphaned"}

DEMO_TITLE = "Demo: write slugify for the payments API"
DEMO_REQUIREMENTS = (
    "Implement slugify(text) in textutils.py: lowercase the text and join its words (letters and digits) "
    "with single hyphens, dropping punctuation, so that tests/test_textutils.py passes."
)
# The DAG: the coder writes the code; then the tester runs the tests and the reviewer lints it.
DEMO_TASKS = [
    {"key": "implement", "title": "Write slugify", "capability": "code_generation", "instructions": DEMO_REQUIREMENTS},
    {"key": "test", "title": "Run the tests", "capability": "testing", "depends_on": ["implement"]},
    {"key": "review", "title": "Lint the code", "capability": "code_review", "depends_on": ["implement"]},
]


class DemoError(Exception):
    """Something the person running the demo must read; printed as is."""


def say(message: str = "") -> None:
    print(message, flush=True)


def say_quietly(message: str) -> None:
    # Clean-up must go on when stdout is gone (a closed pipe, a closed terminal).
    with suppress(OSError):
        say(message)


def demo_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=os.environ.get("DEMO_DATABASE_URL") or DATABASE_URL,
        REDIS_URL=REDIS_URL,
        WEB_PORT=str(WEB_PORT),
        # Production settings would demand SECRET_KEY and redirect plain HTTP to HTTPS.
        DEBUG="true",
        PYTHONUNBUFFERED="1",
        PROCFILE="scripts/demo/Procfile",
        MOCKLLM_PORT=str(MOCKLLM_PORT),
        # The coder's own `opencode serve` talks to the mock LLM: no network, no provider key.
        OPENCODE_CONFIG=json.dumps(provider_config(f"http://127.0.0.1:{MOCKLLM_PORT}/v1")),
        OPENCODE_MODEL="mock/mock-model",
        SHELL_EXECUTOR_COMMANDS=json.dumps({"testing": "python -m pytest -q", "code_review": "ruff check ."}),
        WORKSPACE_ROOT=str(WORKSPACES),
        REPOSITORY_ROOTS=str(DEMO_REPO.parent),
    )
    env.pop("OPENCODE_URL", None)  # the coder starts and owns its own server
    # An operator's broker or result backend would point the demo's workers at shared queues.
    env.pop("CELERY_BROKER_URL", None)
    env.pop("CELERY_RESULT_BACKEND", None)
    return env


def prepare_services(env: dict[str, str]) -> None:
    """Create the demo database if missing and empty the demo's Redis database."""
    checked = subprocess.run([sys.executable, str(ROOT / "scripts" / "ensure_services.py")], env=env, check=False)
    if checked.returncode != 0:
        raise DemoError("PostgreSQL or Redis is not ready (see the ensure_services message above)")
    # Stale messages, locks and fencing counters of an interrupted earlier run must not leak in.
    flush_redis_db(env["REDIS_URL"])
    for port in (WEB_PORT, MOCKLLM_PORT):
        ensure_port_free(port)
    if not os.access(OPENCODE_BIN, os.X_OK):
        missing = OPENCODE_BIN.relative_to(ROOT)
        raise DemoError(f"{missing} is missing: run `make demo`, which installs opencode-ai with npm")


def make_demo_repo() -> None:
    """A fresh git repository from scripts/demo/repo, with one commit on main."""
    shutil.rmtree(DEMO_REPO, ignore_errors=True)
    shutil.rmtree(WORKSPACES, ignore_errors=True)
    shutil.copytree(ROOT / "scripts" / "demo" / "repo", DEMO_REPO)
    identity = ["-c", "user.name=Demo", "-c", "user.email=demo@localhost"]
    for command in (["init", "--quiet", "-b", "main"], ["add", "."], [*identity, "commit", "--quiet", "-m", "Start"]):
        done = subprocess.run(["git", *command], cwd=DEMO_REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise DemoError(f"git {command[0]} in {DEMO_REPO} failed: {done.stderr.strip()}")
    say(f"Repository for the session: {DEMO_REPO.relative_to(ROOT)} (slugify not written, its tests fail)")


def flush_redis_db(url: str) -> None:
    """FLUSHDB on the database the URL names, spoken in plain RESP so the demo needs no Redis client."""
    parts = urlsplit(url)
    commands = [["SELECT", parts.path.lstrip("/") or "0"], ["FLUSHDB"]]
    if parts.password:
        commands.insert(0, ["AUTH", unquote(parts.username or "default"), unquote(parts.password)])
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=5) as conn:
            for command in commands:
                encoded = f"*{len(command)}\r\n" + "".join(f"${len(arg.encode())}\r\n{arg}\r\n" for arg in command)
                conn.sendall(encoded.encode())
                reply = conn.recv(512)
                if not reply.startswith(b"+OK"):
                    raise DemoError(f"Redis refused {command[0]} on {url}: {reply.decode(errors='replace').strip()}")
    except OSError as exc:
        raise DemoError(f"could not empty Redis database {url}: {exc}") from None


def ensure_port_free(port: int) -> None:
    # Something else answering on our port would make the demo talk to the wrong stack.
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise DemoError(f"port {port} is already in use (an earlier demo still running?); free it and retry")


def start_stack(env: dict[str, str]) -> subprocess.Popen:
    """scripts/up.sh in a process group of its own, so Ctrl-C here does not reach it half-way."""
    LOG_PATH.parent.mkdir(exist_ok=True)
    say(f"Starting the stack (web :{WEB_PORT}, mock LLM :{MOCKLLM_PORT}); its log: {LOG_PATH.relative_to(ROOT)}")
    with LOG_PATH.open("wb") as log:
        return subprocess.Popen(
            [str(ROOT / "scripts" / "up.sh")],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def descendant_groups(root_pid: int) -> set[int]:
    """Process groups of every descendant of root_pid, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    groups: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            # The command name may contain spaces and parentheses; the fields after the last ")" do not.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid, ppid, pgrp = int(stat.parent.name), int(fields[1]), int(fields[2])
            children.setdefault(ppid, []).append(pid)
            groups[pid] = pgrp
    found, stack = set(), [root_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(groups[child])
            stack.append(child)
    return found


def stop_stack(stack: subprocess.Popen) -> None:
    """SIGTERM the stack's group, wait, then SIGKILL whatever is left of it."""
    # A second Ctrl-C must not interrupt the clean-up half-way and leave workers behind.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # honcho starts every Procfile process in a session of its own: remember their groups now,
    # while the process tree still shows them, in case honcho has to be killed.
    groups = descendant_groups(stack.pid) | {stack.pid}
    say_quietly("Stopping the stack ...")
    with suppress(ProcessLookupError):
        os.killpg(stack.pid, signal.SIGTERM)
    try:
        stack.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        say_quietly(f"the stack did not stop within {STOP_GRACE_S:g}s; killing it")
    for group in groups:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        stack.wait(timeout=5)
    say_quietly("Stack stopped.")


def print_log_tail(lines: int = 40) -> None:
    if not LOG_PATH.exists():
        return
    # The access-log lines of our own polling would push the interesting ones out of the tail.
    logged = [line for line in LOG_PATH.read_text(errors="replace").splitlines() if '"python-httpx/' not in line]
    tail = logged[-lines:]
    say(f"\nLast {len(tail)} lines of {LOG_PATH.relative_to(ROOT)}:")
    for line in tail:
        say(f"  | {line}")


def wait_until(what: str, check: Callable[[], bool], stack: subprocess.Popen, timeout: float) -> None:
    """Poll check() until it is true; fail early if the stack died, or after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if stack.poll() is not None:
            raise DemoError(f"the stack exited (code {stack.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise DemoError(f"gave up after {timeout:g}s waiting for {what}")
        time.sleep(POLL_S)


def api(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    """One API call; any error becomes a DemoError quoting the API's error message."""
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise DemoError(f"{method} {path} failed: {exc!r}") from None
    if response.is_error:
        raise DemoError(f"{method} {path} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def is_ready(client: httpx.Client) -> bool:
    try:
        return client.get("/health/ready/").status_code == 200
    except httpx.HTTPError:
        return False  # gunicorn is not listening yet


def bootstrap_token(env: dict[str, str]) -> str:
    # --rotate: the command prints a token only when it issues one (tokens are stored hashed).
    command = [sys.executable, "manage.py", "bootstrap_tenant", "demo", "--user", "demo", "--role", "developer"]
    command += ["--rotate"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise DemoError(f"bootstrap_tenant failed (exit {done.returncode}): {done.stderr.strip()[-1000:]}")
    say(f"Tenant ready: {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]  # the command prints the token on its last line


def agents_online(client: httpx.Client, since: datetime) -> bool:
    """Every agent live and heartbeating since this run started (not rows left by an earlier run)."""
    agents = {a["name"]: a for a in api(client, "GET", "/api/v1/agents/", params={"page_size": 200})["results"]}
    return all(
        name in agents and agents[name]["is_live"] and datetime.fromisoformat(agents[name]["last_heartbeat"]) >= since
        for name in AGENTS
    )


def session_body() -> dict[str, Any]:
    return {
        "title": DEMO_TITLE,
        "requirements": DEMO_REQUIREMENTS,
        "repository": str(DEMO_REPO),
        "base_branch": "main",
        "tasks": DEMO_TASKS,
        "priority": 5,
        "timeout_seconds": int(SESSION_DEADLINE_S),
    }


def print_plan(preview: dict[str, Any]) -> None:
    say("\nRequirements:")
    for line in DEMO_REQUIREMENTS.splitlines():
        say(f"  > {line}")
    say(f"\n  {'task':<12} {'capability':<18} after")
    for task in preview["tasks"]:
        say(f"  {task['key']:<12} {task['capability']:<18} {', '.join(task['depends_on']) or '(starts first)'}")
    say(f"\n  critical path: {' -> '.join(preview['critical_path'])}")


def submit_session(client: httpx.Client) -> str:
    body = session_body()
    preview = {k: v for k, v in body.items() if k not in ("repository", "base_branch")}
    print_plan(api(client, "POST", "/api/v1/decompositions/preview/", json=preview))
    session = api(client, "POST", "/api/v1/sessions/", json=body)
    say(f"\nCreated session {session['id']} (status {session['status']}); starting it.\n")
    api(client, "POST", f"/api/v1/sessions/{session['id']}/start/")
    return session["id"]


def fetch_new_events(client: httpx.Client, session_id: str, after: int) -> list[dict[str, Any]]:
    events, url = [], f"/api/v1/sessions/{session_id}/events/?after={after}&page_size=200"
    while url:
        page = api(client, "GET", url)
        events += page["results"]
        url = page["next"]
    return events


def fetch_tasks(client: httpx.Client, session_id: str) -> list[dict[str, Any]]:
    return api(client, "GET", f"/api/v1/sessions/{session_id}/tasks/", params={"page_size": 200})["results"]


# Which timestamp of a task says when it reached a status; the final statuses use finished_at.
STATUS_TIME_FIELD = {"pending": "created_at", "queued": "queued_at", "running": "started_at"}
Timeline = list[tuple[datetime, str]]


def parse_time(stamp: str | None) -> datetime:
    return datetime.fromisoformat(stamp) if stamp else datetime.max.replace(tzinfo=UTC)


def task_path(task: dict[str, Any], before: str) -> list[str]:
    """The statuses a task went through since `before`. A task can pass through queued and
    running between two polls; its timestamps still show that it did."""
    order = ["pending", "queued", "running"]
    passed = order[order.index(before) + 1 :] if before in order else []
    return [before] + [s for s in passed if s != task["status"] and task[STATUS_TIME_FIELD[s]]] + [task["status"]]


def task_changes(tasks: list[dict[str, Any]], seen: dict[str, str]) -> Timeline:
    changes = []
    for task in tasks:
        before = seen.get(task["key"], "pending")
        if task["status"] == before:
            continue
        seen[task["key"]] = task["status"]
        path = task_path(task, before)
        for old, new in pairwise(path):
            where = f"  on {task['agent']}" if task["agent"] and new != "queued" else ""
            stamp = task[STATUS_TIME_FIELD.get(new, "finished_at")]
            changes.append((parse_time(stamp), f"  task {task['key']:<16} {old} -> {new}{where}"))
    return changes


def session_changes(events: list[dict[str, Any]]) -> Timeline:
    return [
        (
            parse_time(e["created_at"]),
            f"session {e['from_status']} -> {e['to_status']}  ({e['reason']}, by {e['actor']})",
        )
        for e in events
    ]


def follow_session(client: httpx.Client, session_id: str, stack: subprocess.Popen) -> str:
    """Print session and task transitions in the order they happened; return the settled status."""
    last_event, status, seen = 0, "pending", {}
    deadline = time.monotonic() + SESSION_DEADLINE_S
    while status not in SETTLED:
        if time.monotonic() > deadline:
            raise DemoError(f"the session did not finish within {SESSION_DEADLINE_S:g}s (last status: {status})")
        if stack.poll() is not None:
            raise DemoError(f"the stack exited (code {stack.returncode}) while the session was {status}")
        # Events first: the tasks read afterwards then include every change that led to them.
        events = fetch_new_events(client, session_id, last_event)
        changes = session_changes(events) + task_changes(fetch_tasks(client, session_id), seen)
        for _, line in sorted(changes, key=lambda change: change[0]):
            say(line)
        if events:
            last_event, status = events[-1]["id"], events[-1]["to_status"]
        time.sleep(POLL_S)
    return status


def print_summary(client: httpx.Client, session_id: str) -> None:
    session = api(client, "GET", f"/api/v1/sessions/{session_id}/")
    say(f"\nSession {session_id}: {session['status']}")
    say(f"  {'task':<12} {'capability':<18} {'status':<11} agent")
    for task in fetch_tasks(client, session_id):
        error = f"  error: {task['error'][:300]}" if task["error"] else ""
        say(f"  {task['key']:<12} {task['capability']:<18} {task['status']:<11} {task['agent'] or '-'}{error}")
        summary = task_summary(task.get("result") or {})
        if summary:
            say(f"      {summary}")
    workspace = session["result"].get("workspace") or {}
    if workspace.get("error"):
        say(f"\nThe workspace could not be recorded: {workspace['error']}")
    elif workspace:
        files = ", ".join(f"{f['file']} (+{f['additions']} -{f['deletions']})" for f in workspace["files"])
        say(f"\nBranch {workspace['branch']} in {workspace['repository']}: {workspace['base_commit'][:10]}..")
        say(f"{workspace['head_commit'][:10]}, files changed: {files or 'none'}")
        say(f"  (see it with: git -C {workspace['repository']} log -p main..{workspace['branch']})\n")
        say("Final diff:")
        for line in workspace["diff"].splitlines():
            say(f"  | {line}")


def task_summary(result: dict[str, Any]) -> str:
    """One line on what an executor did: the model's answer and its tokens, or the command's exit."""
    if "exit_code" in result:
        last = (result.get("output") or "").strip().splitlines()[-1:] or [""]
        return f"$ {result['command']}  -> exit {result['exit_code']}: {last[0][:120]}"
    if "tokens" in result:
        answer = (result.get("output") or "").strip().replace("\n", " ")[:120]
        return f"opencode: {answer!r}; tokens {result['tokens']}"
    return ""


def print_where_to_look(database_url: str) -> None:
    say(
        "\nWhere to look, with `make up` running (API on :8000, Flower on :5555):\n"
        "  console   http://127.0.0.1:8000/console/  (the live sessions, their DAGs and the fleet; same login)\n"
        "  admin     http://127.0.0.1:8000/admin/  (create a login: .venv/bin/python manage.py createsuperuser)\n"
        "  API docs  http://127.0.0.1:8000/api/docs/\n"
        "  Flower    http://127.0.0.1:5555/  (login: the FLOWER_BASIC_AUTH that make up prints)\n"
        f"This demo's sessions stay in {database_url}; `DATABASE_URL={database_url} make up` shows them."
    )


def run_demo(env: dict[str, str], stack: subprocess.Popen, started: datetime) -> str:
    """Everything between starting and stopping the stack; returns the session's final status."""
    with httpx.Client(base_url=f"http://127.0.0.1:{WEB_PORT}", timeout=10) as client:
        wait_until("/health/ready/", lambda: is_ready(client), stack, STARTUP_TIMEOUT_S)
        client.headers["Authorization"] = f"Token {bootstrap_token(env)}"
        say(f"Waiting for the agents {' and '.join(AGENTS)} to come online ...")
        wait_until("the agents", lambda: agents_online(client, started), stack, STARTUP_TIMEOUT_S)
        session_id = submit_session(client)
        status = follow_session(client, session_id, stack)
        print_summary(client, session_id)
    print_where_to_look(env["DATABASE_URL"])
    return status


def raise_interrupt(signum: int, frame: Any) -> None:
    # `kill` or a CI timeout then cleans up exactly like Ctrl-C does.
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, raise_interrupt)
    env = demo_environment()
    stack, status = None, None
    try:
        prepare_services(env)
        make_demo_repo()
        started = datetime.now(UTC)
        stack = start_stack(env)
        status = run_demo(env, stack, started)
    except DemoError as exc:
        say(f"\ndemo failed: {exc}")
        if stack is not None:
            print_log_tail()
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        if stack is not None:
            stop_stack(stack)
    if status != "completed":
        say(f"\ndemo failed: the session ended {status}, not completed (task errors above)")
        return 1
    say("\nDemo finished: the session completed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
