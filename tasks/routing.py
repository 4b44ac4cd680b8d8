"""Which queue a task's message goes to.

Capability queues (cap.<capability>) balance load for free: whichever agent with the capability
is free first takes the message. Two cases route explicitly to agent.<name>:

- pinning: a task created with "agent": "<name>" runs only there, waiting while it is busy;
- workspace affinity: a task follows the agent that ran one of its upstream tasks (it has the
  workspace warm), if that agent can take it now (Agent.can_take). With several such upstream
  agents, the best Agent.score wins (docs/ROUTING.md).
"""

from django.db.models import Count, OuterRef, Subquery
from django.db.models.functions import Coalesce

from agents.models import Agent

from .models import Task, running


def affinity_agent(task: Task, routed: dict[str, int] | None = None, among: list[int] | None = None) -> Agent | None:
    """The best live upstream agent that can take `task` now, or None. `among`: the ids of the
    agents that ran its upstreams, when the caller has them already."""
    routed = routed or {}
    if among is None:
        among = Task.objects.filter(dependents=task, agent__isnull=False).values("agent_id")
    # The stored load lags until the next heartbeat; count the running tasks now instead.
    # Only our Celery workers have queues (an external agent's tasks run on an EAP gateway).
    # Counted in a subquery over its running tasks only (a partial index), never its history.
    running_now = (
        Task.objects.filter(running(), agent=OuterRef("pk")).order_by().values("agent").annotate(n=Count("pk"))
    )
    upstream_agents = Agent.objects.filter(pk__in=among, mode=Agent.Mode.WORKER).annotate(
        running=Coalesce(Subquery(running_now.values("n")), 0)
    )
    for agent in upstream_agents:
        agent.current_load = agent.running
    candidates = [a for a in upstream_agents if a.can_take(task.capability, routed.get(a.name, 0))]
    return max(candidates, key=lambda agent: agent.score, default=None)


def queue_for(task: Task, routed: dict[str, int] | None = None) -> str:
    """The queue for a task's next message. `routed` counts what the caller already sent to each
    agent in this round, so a fan-out does not pile onto the one agent that had a free slot."""
    if task.pinned_agent:
        return task.queue
    preferred = affinity_agent(task, routed)
    if preferred is None:
        return task.queue
    if routed is not None:
        routed[preferred.name] = routed.get(preferred.name, 0) + 1
    return f"agent.{preferred.name}"
