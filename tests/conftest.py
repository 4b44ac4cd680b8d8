"""Fixtures on the real services: PostgreSQL (pytest-django's test database), Redis (a database
of its own, see tests/settings.py), real Celery worker processes for end-to-end tests and a real
Chromium for the browser tests."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connections
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from rest_framework.test import APIClient

from agents.executors import TaskContext
from agents.models import Agent
from api.stream import server_argv
from orchestrator_project import metrics
from orchestrator_project.celery import app
from orchestrator_project.redis_client import redis_client
from scripts.ensure_services import reset_vhost
from sessions.workspaces import git
from tasks.models import Task
from tenants.models import Membership

ROOT = Path(__file__).resolve().parent.parent
# pytest-django's live server binds "localhost" unless told otherwise. Cookies belong to a host
# name, not a port: a page on localhost would send no login cookie to the event stream on
# 127.0.0.1 (Stack.stream), so the browser tests use 127.0.0.1 for both.
os.environ.setdefault("DJANGO_LIVE_TEST_SERVER_ADDRESS", "127.0.0.1")


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 30.0,
    interval: float = 0.1,
    what: str | Callable[[], str] = "condition",
):
    """Poll `predicate` until it returns something truthy; fail with `what` (or what it returns,
    for a report of the state at that moment) after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def queued_broker_messages(queues: str = "orchestrator*") -> list[dict]:
    """Every message waiting on the Celery queues matching `queues` in the test Redis database
    (each priority of a queue is a list of its own)."""
    client = redis_client()
    messages = []
    for key in client.scan_iter(queues):
        if client.type(key) == b"list":
            messages += [json.loads(raw) for raw in client.lrange(key, 0, -1)]
    return messages


def at_once(calls: list[Callable[[], object]], *, timeout_s: float = 30) -> tuple[list, list[BaseException]]:
    """Run the calls in threads of their own, released together by a barrier, each closing its
    database connections when done; returns what they returned (in the order they finished) and
    what they raised."""
    barrier = threading.Barrier(len(calls))
    results: list = []
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            barrier.wait(timeout=timeout_s)
            results.append(call())
        except BaseException as exc:  # the caller asserts on them
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s * 4)
    return results, errors


def run_task_message_ids(queues: str = "cap.*") -> list[str]:
    """The ids of the run_task messages waiting on the queues matching `queues`."""
    return [m["headers"]["id"] for m in queued_broker_messages(queues)]


def consumed_queues(worker_name: str) -> set[str] | None:
    """The queues a worker consumes, as it answers a remote control inspection; None when it
    does not answer within a second."""
    replies = app.control.inspect(destination=[worker_name], timeout=1.0).active_queues() or {}
    if worker_name not in replies:
        return None
    return {queue["name"] for queue in replies[worker_name]}


@pytest.fixture(autouse=True)
def clean_redis():
    redis_client().flushdb()
    if settings.BROKER_KIND == "amqp":
        reset_vhost(settings.CELERY_BROKER_URL)
    yield


def pytest_collection_modifyitems(config, items):
    """On RabbitMQ (TEST_BROKER_URL), only the tests marked every_broker run; a test marked
    only_broker(kind) runs on that broker alone. The rest do not depend on the broker.

    Every test that uses the browser is marked browser and runs after all the others: once the
    session's Chromium is up, Django's async-safety check is off (see the browser fixture)."""
    kind = settings.BROKER_KIND
    keep, drop = [], []
    for item in items:
        only = item.get_closest_marker("only_broker")
        runs = only.args[0] == kind if only else kind == "redis" or item.get_closest_marker("every_broker")
        (keep if runs else drop).append(item)
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = sorted(keep, key=lambda item: item.get_closest_marker("browser") is not None)


def executor_context(
    workspace: Path,
    title: str = "Run the tests",
    *,
    capability: str = "testing",
    params: dict | None = None,
    timeout: float = 30.0,
    should_abort: Callable[[], bool] = lambda: False,
) -> TaskContext:
    """What run_task gives an executor, for the tests that call one directly."""
    return TaskContext(
        task_id=str(uuid.uuid4()),
        session_id=str(uuid.uuid4()),
        key="k",
        title=title,
        capability=capability,
        instructions="",
        params=params or {},
        workspace=workspace,
        attempt=1,
        timeout_s=timeout,
        should_abort=should_abort,
    )


def commit_repository(path: Path, files: dict[str, str] | None = None) -> Path:
    """`path` (made if missing, with `files` written in it) as a git repository whose branch
    main has one commit of everything in it."""
    path.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    for command in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "Start"]):
        git("-c", "user.name=t", "-c", "user.email=t@t", *command, cwd=path)
    return path


def member_client(tenant_slug: str, username: str, role: str = Membership.Role.DEVELOPER) -> APIClient:
    """An API client authenticated as a member of the tenant (created through the real command)."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {member_token(tenant_slug, username, role)}")
    return client


def member_token(tenant_slug: str, username: str, role: str = Membership.Role.DEVELOPER) -> str:
    """An API token of a member of the tenant (created if new), issued by the real command."""
    from io import StringIO

    out = StringIO()
    call_command("bootstrap_tenant", tenant_slug, user=username, role=role, rotate=True, stdout=out, stderr=StringIO())
    return out.getvalue().strip().splitlines()[-1]


def staff_client() -> APIClient:
    """An API client authenticated as a staff user, a member of no tenant (who runs the platform)."""
    from django.contrib.auth import get_user_model

    from tokens.services import issue_token

    user = get_user_model().objects.create_user("root-of-platform", is_staff=True)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {issue_token(user)[1]}")
    return client


@pytest.fixture
def dns(monkeypatch) -> dict[str, str]:
    """Name resolution as the test says (DNS is an edge we do not own): `dns["host"] = "1.2.3.4"`;
    names not in it resolve for real."""
    answers: dict[str, str] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in answers:
            family = socket.AF_INET6 if ":" in answers[host] else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (answers[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


@pytest.fixture
def api(db) -> APIClient:
    return member_client("acme", "alice")


def error_of(response, status: int) -> dict:
    """The error body of a response that must have `status`, checked for the one error shape."""
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def dag_payload(**overrides) -> dict:
    """A 6-task DAG with a fan-out (design -> api, ui, tests) and a fan-in (-> review -> docs)."""
    payload = {
        "title": "Rate limiting",
        "requirements": "Add rate limiting to the payments API",
        "tasks": [
            {"key": "design", "title": "Design", "capability": "system_design"},
            {"key": "api", "title": "API", "capability": "code_generation", "depends_on": ["design"]},
            {"key": "ui", "title": "UI", "capability": "code_generation", "depends_on": ["design"]},
            {"key": "tests", "title": "Tests", "capability": "test_generation", "depends_on": ["design"]},
            {"key": "review", "title": "Review", "capability": "code_review", "depends_on": ["api", "ui", "tests"]},
            {"key": "docs", "title": "Docs", "capability": "documentation", "depends_on": ["review"]},
        ],
    }
    payload.update(overrides)
    return payload


def create_and_start(client, payload: dict) -> str:
    created = client.post("/api/v1/sessions/", payload, format="json")
    assert created.status_code == 201, created.content
    session_id = created.json()["id"]
    started = client.post(f"/api/v1/sessions/{session_id}/start/")
    assert started.status_code == 202, started.content
    return session_id


def wait_for_status(client, session_id: str, statuses: set[str], timeout: float = 60) -> dict:
    def settled():
        body = client.get(f"/api/v1/sessions/{session_id}/").json()
        return body if body["status"] in statuses else None

    return wait_until(settled, timeout=timeout, what=f"session {session_id} to reach {statuses}")


def chain_payload(seconds: float) -> dict:
    keys = ["one", "two", "three"]
    return {
        "requirements": "a chain of three slow tasks",
        "tasks": [
            {
                "key": key,
                "title": key,
                "capability": "code_generation",
                "depends_on": keys[:i][-1:],
                "params": {"duration_s": seconds},
            }
            for i, key in enumerate(keys)
        ],
    }


def task_status(session_id: str, key: str) -> str:
    return Task.objects.get(session_id=session_id, key=key).status


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_database_url(host: str | None = None, port: int | None = None) -> str:
    """pytest's test database (not the one DATABASE_URL names) as a URL for a process the test
    starts, reached at `host`:`port` when given (a test host's way through its link)."""
    db = settings.DATABASES["default"]
    credentials = f"{quote(db['USER'], safe='')}:{quote(db['PASSWORD'] or '', safe='')}"
    return f"postgres://{credentials}@{host or db['HOST']}:{port or db['PORT']}/{db['NAME']}"


class Stack:
    """Real Celery worker processes: one orchestrator worker and agents started by run_agent."""

    def __init__(self, env: dict | None = None) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.extra_env = env or {}  # every process's, over the defaults below
        # One directory per test, so that a failure's logs survive the tests after it.
        test = os.environ.get("PYTEST_CURRENT_TEST", "stack").split(" ")[0].rsplit("::", 1)[-1]
        self.logs = ROOT / ".pytest-workers" / test[:100]
        self.logs.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict:
        # Each process is the first of a process group of its own (its own metrics directory).
        inherited = {name: value for name, value in os.environ.items() if name != metrics.ENV}
        return {
            **inherited,
            "DJANGO_SETTINGS_MODULE": "orchestrator_project.settings",
            "DEBUG": "true",
            "DATABASE_URL": worker_database_url(),
            "DB_CONN_MAX_AGE": "0",
            "REDIS_URL": settings.REDIS_URL,
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        mode = "a" if name in self.procs else "w"  # a restarted process adds to its log
        log = open(self.logs / f"{name}.log", mode)  # noqa: SIM115 - closed with the process
        # A session (process group) of its own, so that a test can kill an agent with its pool.
        env = {**self.env(), **(env or {})}
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def orchestrator(self, env: dict | None = None) -> subprocess.Popen:
        return self._spawn(
            "orchestrator",
            [sys.executable, "-m", "celery", "-A", "orchestrator_project", "worker", "-Q", "orchestrator,housekeeping",
             "-n", "orchestrator-test@%h", "-c", "2", "--loglevel=INFO"],
            env,
        )  # fmt: skip

    def beat(self, name: str, env: dict | None = None) -> subprocess.Popen:
        return self._spawn(
            name,
            # --quiet, as in the Procfile: Beat prints its banner before any logging is set up.
            [sys.executable, "-m", "celery", "-A", "orchestrator_project", "--quiet", "beat", "--loglevel=INFO",
             f"--pidfile={self.logs / (name + '.pid')}"],
            env,
        )  # fmt: skip

    def agent(
        self,
        name: str,
        capabilities: list[str],
        *,
        concurrency: int = 2,
        duration: float = 0.0,
        executor: str = "scripted",
        netns: str | None = None,
        env: dict | None = None,
    ):
        """An agent (run_agent), in the network namespace `netns` if given (a host of its own)."""
        proc = self._spawn(
            name,
            [*(["ip", "netns", "exec", netns] if netns else []),
             sys.executable, "manage.py", "run_agent", "--name", name, "--executor", executor,
             "--capabilities", ",".join(capabilities), "--concurrency", str(concurrency),
             "--duration", str(duration)],
            env,
        )  # fmt: skip

        def online() -> bool:
            if proc.poll() is not None:
                self.print_log_tails()
                raise AssertionError(f"agent {name} exited with {proc.returncode} before coming online")
            return Agent.objects.filter(name=name, status="online").exists()

        wait_until(online, what=f"agent {name} online")
        return proc

    def stream(self, env: dict | None = None, port: int | None = None) -> str:
        """The event streams' ASGI process (gunicorn with uvicorn's worker, as the Procfile runs
        it) on `port` (a free one by default: a restart passes the old one, so that browsers
        reconnect to it); returns its base URL once it answers."""
        port = port or free_port()
        proc = self._spawn("stream", server_argv(f"127.0.0.1:{port}"), env)
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            if proc.poll() is not None:
                self.print_log_tails()
                raise AssertionError(f"the stream process exited with {proc.returncode}")
            try:
                return httpx.get(f"{url}/api/v1/stream/", timeout=1).status_code == 401
            except httpx.TransportError:
                return False

        wait_until(answers, what="the stream process answering")
        return url

    def kill(self, name: str) -> None:
        """SIGKILL a process and every process it started, as a crashed host would lose them."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_one(self, name: str) -> None:
        """Stop one process as an operator would (SIGTERM), and wait for it."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    def print_log_tails(self, lines: int = 40) -> None:
        for name in self.procs:
            tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:]
            print(f"--- last {lines} lines of {name} ---", *tail, sep="\n")

    def kill_all(self) -> None:
        """End every process at once, as a crashed host would lose them: a test's stack at its
        end. Celery's graceful shutdown takes 2-3 s per worker, most of a short test's time; the
        tests of that shutdown call stop()."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop(self) -> None:
        """Stop every process as an operator would (SIGTERM), and wait for them."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


ALL_BUILD = ["system_design", "code_generation"]
ALL_QA = ["test_generation", "code_review", "documentation", "testing"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@contextmanager
def running_stack(request, env: dict | None = None, orchestrator_env: dict | None = None) -> Iterator[Stack]:
    """A Stack with its orchestrator worker started; killed at the end (Stack.kill_all), with the
    logs' tails printed when the test failed. `env`: every process's; `orchestrator_env`: its own."""
    running = Stack(env=env)
    try:
        running.orchestrator(orchestrator_env)
        yield running
    finally:
        running.kill_all()
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            running.print_log_tails()


@pytest.fixture
def stack(request, transactional_db):
    """Real worker processes: an orchestrator worker now, agents as the test asks for them."""
    with running_stack(request) as running:
        yield running


# Debian's Chromium, which `make test` installs (scripts/ensure_services.py); never a browser build
# that Playwright downloads.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the whole run, driven by Playwright's sync API. A test asks for
    `page` (below), or for `browser` when it needs contexts of its own (two users at once).

    Playwright's sync API runs an asyncio event loop in this thread from start() to stop(), and
    Django refuses ORM calls in a thread with a running loop (SynchronousOnlyOperation), in the
    test and in pytest-django's teardown alike. The loop only carries Playwright's messages while
    the test waits on a page call, never Django code, so the check is off (DJANGO_ALLOW_ASYNC_UNSAFE)
    while the browser runs. That is the rest of the run: pytest_collection_modifyitems orders the
    tests that use the browser after all the others, which keep the check. The live server that
    a page talks to (pytest-django's live_server) runs in a thread of its own, without a loop.

    Playwright passes --no-sandbox to Chromium unless asked not to: the tests run as root in CI,
    where Chromium's sandbox refuses to start.
    """
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"Chromium is missing ({CHROMIUM}): the browser tests drive Debian's chromium. `make test` "
            "installs it when run as root; otherwise: sudo apt-get install -y chromium",
            pytrace=False,
        )
    playwright = sync_playwright().start()
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()
    finally:
        playwright.stop()
        if previous is None:
            del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


def save_screenshot(page: Page, name: str) -> Path:
    """The page as the docs show it (docs/screenshots/<name>.png): always saved with the test's
    logs (.pytest-workers/<test>/), and over the docs' copy only with UPDATE_SCREENSHOTS=1, so
    that a test run leaves the checkout as it found it."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "browser").split(" ")[0].rsplit("::", 1)[-1]
    path = ROOT / ".pytest-workers" / test[:100] / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=path)
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(path, ROOT / "docs" / "screenshots" / f"{name}.png")
    return path


@pytest.fixture
def page(browser: Browser, request) -> Iterator[Page]:
    """A page in a browser context of the test's own (no cookies or storage from another test),
    closed after it. When the test fails, a screenshot of the page as it was is saved to
    .pytest-workers/<test>/failure.png, and its path shown with the failure."""
    context = browser.new_context()
    page = context.new_page()
    try:
        yield page
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            screenshot = ROOT / ".pytest-workers" / request.node.name[:100] / "failure.png"
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            with suppress(PlaywrightError):  # a page that crashed has nothing to show
                page.screenshot(path=screenshot, full_page=True)
                # The failure's report is printed at the end of the run, with its sections.
                report.sections.append(("browser screenshot", str(screenshot)))
    finally:
        context.close()
