"""B7 the console and its event streams (issue 15).

Page: the server's time to render a session's console page (the DAG as SVG, the timeline, the
panel of one task) for a 200-task session against a 10-task one, in this process through
Django's test client (middleware, template, queries; no network), median of the repeats.

Streams: CLIENTS concurrent clients on one ASGI worker (the Procfile's `stream` process, one
uvicorn worker), each following the tenant's stream. This process then commits EVENTS task
changes, one every SPACING_S, each announced as the engine announces them, and every client
notes when each event arrives: the delay from the commit returning to the arrival, p50 and p95
over every client and event, and the worker's resident memory idle, with the clients connected,
and after the events. The clients run in this process (asyncio, httpx) and share its 2 cores
with the server: the delays include their own parsing.
"""

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path

import httpx
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from api.inputs import SessionCreateSerializer
from api.stream import server_argv
from bench import BenchError
from bench.env import ROOT, RUN_DIR
from sessions import feed
from tasks.lifecycle import create_session
from tasks.models import Task
from tenants.models import Membership, Tenant
from tokens.services import issue_token, revoke_tokens

CLIENTS = 200
EVENTS = 40
SPACING_S = 0.1
SIZES = (10, 200)
# DEBUG=false redirects plain HTTP to HTTPS unless the TLS proxy in front says it was HTTPS.
BEHIND_TLS = {"X-Forwarded-Proto": "https"}


def _specs(count: int) -> list[dict]:
    """A DAG of `count` tasks in layers of up to 10, each depending on one task of the layer before."""
    specs = []
    for index in range(count):
        depends = [f"t{index - 10}"] if index >= 10 else []
        specs.append(
            {"key": f"t{index}", "title": f"Task {index}", "capability": "code_generation", "depends_on": depends}
        )
    return specs


def _watcher(tenant: Tenant, number: int = 0):
    """A viewer of the tenant and the API token: each stream client is one (a person has at most
    STREAM_MAX_PER_USER streams open)."""
    user, _ = get_user_model().objects.get_or_create(username=f"bench-watcher-{number}")
    Membership.objects.get_or_create(user=user, tenant=tenant, defaults={"role": Membership.Role.VIEWER})
    revoke_tokens(user)  # the previous run's
    return user, issue_token(user, name="bench b7")[1]


def _session(tenant: Tenant, user, size: int):
    data = SessionCreateSerializer(data={"title": f"B7 {size}", "requirements": "bench", "tasks": _specs(size)})
    data.is_valid(raise_exception=True)
    session, _ = create_session(tenant=tenant, user=user, data=data.validated_data)
    # Half the tasks done, as a session watched mid-run looks.
    done = list(session.tasks.order_by("position").values_list("pk", flat=True)[: size // 2])
    Task.objects.filter(pk__in=done).update(status=Task.Status.COMPLETED, attempts=1, result={"output": "ok " * 20})
    return session


def measure_page(tenant: Tenant, user, repeats: int) -> dict:
    client = Client(SERVER_NAME="127.0.0.1")
    client.force_login(user)
    rows = {}
    for size in SIZES:
        session = _session(tenant, user, size)
        task = session.tasks.order_by("position").first()
        url = f"{reverse('console:session', args=[session.pk])}?task={task.pk}"
        times = []
        for _ in range(repeats + 1):  # the first warms the template cache
            started = time.perf_counter()
            response = client.get(url, secure=True)  # as behind the TLS proxy DEBUG=false expects
            times.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise BenchError(f"the console page of a {size}-task session answered {response.status_code}")
        rows[size] = round(statistics.median(times[1:]) * 1000, 2)
    return {"ms": rows, "ratio": round(rows[SIZES[1]] / rows[SIZES[0]], 2)}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise BenchError(f"no VmRSS for process {pid}")


def _worker_pid(master: int) -> int:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == master:  # ppid
            return int(stat.parent.name)
    raise BenchError("the stream process has no worker")


class StreamServer:
    def __init__(self, env: dict[str, str]):
        self.port = _free_port()
        RUN_DIR.mkdir(exist_ok=True)
        with open(RUN_DIR / "bench-stream.log", "wb") as log:
            self.proc = subprocess.Popen(
                server_argv(f"127.0.0.1:{self.port}"),
                cwd=ROOT, env={**env, "DB_CONN_MAX_AGE": "0"}, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/api/v1/stream/", headers=BEHIND_TLS, timeout=1).status_code == 401:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError("the stream process did not start; see .run/bench-stream.log")
            time.sleep(0.2)
        self.worker = _worker_pid(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def _follow(client: httpx.AsyncClient, url: str, token: str, arrivals: dict, ready: asyncio.Event, counter: list):
    async with client.stream("GET", url, headers={"Authorization": f"Token {token}", **BEHIND_TLS}) as response:
        if response.status_code != 200:
            raise BenchError(f"a stream client got {response.status_code}")
        async for line in response.aiter_lines():
            if line.startswith("retry:"):
                counter[0] += 1
                if counter[0] == CLIENTS:
                    ready.set()
            elif line.startswith("data:") and "task" in (event := json.loads(line[5:])):
                arrivals.setdefault((event["task"], event["to"]), []).append(time.monotonic())


def _commit_events(tenant: Tenant, session, committed: dict) -> None:
    tasks = list(session.tasks.filter(status=Task.Status.PENDING).order_by("position").values_list("pk", flat=True))
    for pk in tasks[:EVENTS]:
        Task.objects.filter(pk=pk).update(status=Task.Status.QUEUED)
        committed[(str(pk), Task.Status.QUEUED)] = time.monotonic()
        feed.announce(tenant.pk, session.pk)
        time.sleep(SPACING_S)


async def _streams(url: str, tokens: list[str], tenant: Tenant, session, server: StreamServer) -> dict:
    arrivals: dict = {}
    committed: dict = {}
    ready, counter = asyncio.Event(), [0]
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as client:
        followers = [asyncio.create_task(_follow(client, url, token, arrivals, ready, counter)) for token in tokens]
        await asyncio.wait_for(ready.wait(), 60)
        connected_mb = _rss_mb(server.worker)
        await asyncio.to_thread(_commit_events, tenant, session, committed)
        deadline = time.monotonic() + 30
        while any(len(arrivals.get(key, ())) < CLIENTS for key in committed) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        after_mb = _rss_mb(server.worker)
        for follower in followers:
            follower.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
    delays = sorted(at - committed[key] for key, times in arrivals.items() if key in committed for at in times)
    expected = len(committed) * CLIENTS
    if len(delays) != expected:
        raise BenchError(f"the stream clients got {len(delays)} of the {expected} deliveries")
    return {
        "clients": CLIENTS,
        "events": len(committed),
        "deliveries": len(delays),
        "delay_p50_ms": round(statistics.median(delays) * 1000, 1),
        "delay_p95_ms": round(delays[int(0.95 * (len(delays) - 1))] * 1000, 1),
        "rss_connected_mb": connected_mb,
        "rss_after_mb": after_mb,
    }


def measure_streams(env: dict[str, str], tenant: Tenant, user) -> dict:
    tokens = [_watcher(tenant, number)[1] for number in range(CLIENTS)]
    session = _session(tenant, user, 2 * EVENTS)
    server = StreamServer(env)
    try:
        idle_mb = _rss_mb(server.worker)
        result = asyncio.run(_streams(f"{server.url}/api/v1/stream/", tokens, tenant, session, server))
    finally:
        server.stop()
    return {"rss_idle_mb": idle_mb, **result}


def run_b7(env: dict[str, str], tenant: Tenant, repeats: int) -> dict:
    user, _ = _watcher(tenant)
    return {"page": measure_page(tenant, user, repeats), "streams": measure_streams(env, tenant, user)}
