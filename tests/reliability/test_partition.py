"""Agents on other hosts, and one of them cut off mid-task.

Each agent host is a network namespace of its own (`ip netns`), joined to this one by a veth pair
with addresses of its own (10.213.N.0/30). The control plane (this process, the orchestrator
worker and Beat) stays here; PostgreSQL and Redis listen on 127.0.0.1 here, so socat forwards the
host side of each veth to them, and the agents in the namespaces reach them only through their
link. Cutting a host's link is `ip link set <veth> down` on this side.

While its link is down, agent A's tasks run again on agent B once A counts as silent; when the link
comes back, A's late run is refused (its attempt is stale, and it was asked to abort), every session
completes, each task's side effect happened once, and A serves again. The namespaces, the veths and
the forwarders go even when the test fails, and a run that crashed before is cleaned up first.
"""

import subprocess
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pytest
from django.conf import settings

from agents.executors.scripted import side_effects_of
from agents.models import Agent
from sessions.models import SessionEvent
from tasks.models import Task
from tests.conftest import create_and_start, member_client, wait_until, worker_database_url

from .conftest import settled

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.only_broker("redis")]

PREFIX = "io-part"  # every namespace and veth of this test starts with it
SUBNET = "10.213"
FORWARDED_PORTS = (5432, 6379)  # PostgreSQL and Redis (the broker too)
TASK_S = 25.0  # long enough that A's run is still going when its link comes back
SILENT_AFTER_S = 5  # the orchestrator's AGENT_OFFLINE_AFTER_SECONDS in this test
SESSIONS = 2


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass
class Host:
    """A network namespace joined to this one by a veth pair, with PostgreSQL and Redis
    forwarded to it."""

    number: int
    forwarders: list[subprocess.Popen] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.number}"

    @property
    def link(self) -> str:  # this side of the veth pair
        return f"{PREFIX}{self.number}h"

    @property
    def gateway(self) -> str:  # this side's address, which the host reaches the services at
        return f"{SUBNET}.{self.number}.1"

    def create(self) -> None:
        ip("netns", "add", self.netns)
        inside = f"{PREFIX}{self.number}n"
        ip("link", "add", self.link, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", self.netns)
        ip("addr", "add", f"{self.gateway}/30", "dev", self.link)
        ip("link", "set", self.link, "up")
        ip("netns", "exec", self.netns, "ip", "addr", "add", f"{SUBNET}.{self.number}.2/30", "dev", inside)
        ip("netns", "exec", self.netns, "ip", "link", "set", inside, "up")
        ip("netns", "exec", self.netns, "ip", "link", "set", "lo", "up")
        for port in FORWARDED_PORTS:
            self.forwarders.append(
                subprocess.Popen(
                    ["socat", f"TCP-LISTEN:{port},bind={self.gateway},reuseaddr,fork", f"TCP:127.0.0.1:{port}"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        reachable = ["bash", "-c", f"exec 3<>/dev/tcp/{self.gateway}/{FORWARDED_PORTS[-1]}"]
        wait_until(
            lambda: subprocess.run(["ip", "netns", "exec", self.netns, *reachable], check=False).returncode == 0,
            timeout=10,
            what=f"{self.netns} to reach Redis through its link",
        )

    def cut(self) -> None:
        ip("link", "set", self.link, "down")

    def heal(self) -> None:
        ip("link", "set", self.link, "up")

    def env(self) -> dict[str, str]:
        """The agent's DATABASE_URL and REDIS_URL: the test's database and Redis, through the link."""
        redis = urlparse(settings.REDIS_URL)
        return {
            "DATABASE_URL": worker_database_url(self.gateway, 5432),
            "REDIS_URL": redis._replace(netloc=f"{self.gateway}:6379").geturl(),
        }

    def remove(self) -> None:
        for forwarder in self.forwarders:
            forwarder.kill()
            forwarder.wait()
        remove_host(self.number)


def remove_host(number: int) -> None:
    """Delete a host's namespace and veth if they exist (the veth's peer goes with either)."""
    ip("link", "del", f"{PREFIX}{number}h", check=False)
    ip("netns", "del", f"{PREFIX}-{number}", check=False)


@pytest.fixture
def hosts():
    # A run that crashed may have left its hosts and forwarders behind.
    subprocess.run(["pkill", "-f", f"socat TCP-LISTEN:.*bind={SUBNET}\\."], check=False)
    for number in (1, 2):
        remove_host(number)
    made = [Host(1), Host(2)]
    try:
        for host in made:
            host.create()
        yield made
    finally:
        for host in made:
            host.remove()
        leftovers = ip("netns", "list").stdout
        assert PREFIX not in leftovers, f"namespaces left behind: {leftovers}"


def work(seconds: float) -> dict:
    params = {"duration_s": seconds, "count_side_effect": True}
    return {
        "requirements": "one task with a side effect",
        "tasks": [{"key": "work", "title": "work", "capability": "code_generation", "params": params}],
    }


def runs_on(session_ids, agent: str) -> int:
    return Task.objects.filter(session_id__in=session_ids, status="running", agent__name=agent).count()


# `hosts` before `sweeping`: the agents stop before their namespaces go.
def test_an_agent_host_cut_off_mid_task_loses_its_work_to_another_and_serves_again(hosts, sweeping):
    stack = sweeping
    first, second = hosts
    # Silent after 5 s instead of 30, so the test does not wait half a minute for it.
    stack.kill("orchestrator")
    stack.orchestrator(env={"AGENT_OFFLINE_AFTER_SECONDS": str(SILENT_AFTER_S)})
    stack.agent("part-a", ["code_generation"], concurrency=SESSIONS, netns=first.netns, env=first.env())
    client = member_client("acme", "alice")
    session_ids = [create_and_start(client, work(TASK_S)) for _ in range(SESSIONS)]
    wait_until(lambda: runs_on(session_ids, "part-a") == SESSIONS, what="A running every task")
    stack.agent("part-b", ["code_generation"], concurrency=SESSIONS, netns=second.netns, env=second.env())

    first.cut()
    try:
        wait_until(lambda: runs_on(session_ids, "part-b") == SESSIONS, timeout=60, what="B running A's tasks again")
    finally:
        first.heal()

    # A's late runs: asked to abort once it hears Redis again, and refused by the attempt check
    # when they record. B's runs complete the sessions.
    wait_until(lambda: len(settled(session_ids)) == SESSIONS, timeout=90, what="every session to settle")
    assert set(settled(session_ids).values()) == {"completed"}
    tasks = Task.objects.filter(session_id__in=session_ids).select_related("agent")
    log_of_a = stack.logs / "part-a.log"
    wait_until(
        lambda: all(f"task {t.pk} on part-a" in log_of_a.read_text() for t in tasks),
        timeout=60,
        what="A to end its late runs",
    )
    for task in tasks.all():
        assert (task.status, task.agent.name, task.attempts) == ("completed", "part-b", 2)
        assert side_effects_of(task.session_id) == {"work": 1}
    taken_back = SessionEvent.objects.filter(session_id__in=session_ids, reason__contains="attempt 1 on")
    taken_back |= SessionEvent.objects.filter(session_id__in=session_ids, reason__contains="agent part-a went silent")
    assert set(taken_back.values_list("session_id", flat=True)) == set(map(uuid.UUID, session_ids))

    # Healed, A beats again and takes work: a task pinned to it runs there.
    wait_until(lambda: Agent.objects.get(name="part-a").is_live, timeout=30, what="A live again")
    pinned = work(0.1)
    pinned["tasks"][0]["agent"] = "part-a"
    healed = create_and_start(client, pinned)
    wait_until(lambda: settled([healed]).get(healed) == "completed", timeout=60, what="the pinned task on A")
    assert Task.objects.get(session_id=healed).agent.name == "part-a"
    assert side_effects_of(healed) == {"work": 1}
