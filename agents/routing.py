"""Which queue a task's message goes to.

Capability queues (cap.<capability>) balance load for free: whichever agent with the capability
is free first takes the message. Two cases route explicitly to agent.<name>:

- pinning: a task created with "agent": "<name>" runs only there, waiting while it is busy;
- workspace affinity: a task follows the agent that ran one of its upstream tasks (it has the
  workspace warm), if that agent has the capability, is live, not draining, and has a free slot.
  With several such upstream agents, the best score wins.

Score (0..1.1, higher is better), documented in docs/ROUTING.md:

    score = 0.5 * success + 0.3 * free + 0.2 * speed + 0.1 * tier / 3
    success = (completed + 1) / (completed + failed + 1)     # a new agent starts at 1.0
    free    = 1 - current_load / concurrency
    speed   = 1 / (1 + ewma_duration_s / 60)                  # a new agent (no history) gets 1.0

The optimistic priors mean a brand-new agent with a free slot scores at least as well as any
proven one, so it receives work and earns a history.
"""

from django.db.models import Count

from .models import Agent, running


def score(agent: Agent) -> float:
    done = agent.tasks_completed + agent.tasks_failed
    success = (agent.tasks_completed + 1) / (done + 1)
    free = max(0.0, 1 - agent.current_load / max(1, agent.concurrency))
    speed = 1.0 if agent.ewma_duration_s is None else 1 / (1 + agent.ewma_duration_s / 60)
    return 0.5 * success + 0.3 * free + 0.2 * speed + 0.1 * min(agent.tier, 3) / 3


def can_take(agent: Agent, capability: str, pending: int = 0) -> bool:
    """Live, not draining, has the capability and a free slot (`pending`: slots promised to
    messages sent but not yet claimed)."""
    return (
        not agent.is_external
        and agent.is_live
        and agent.status != Agent.Status.DRAINING
        and capability in agent.capabilities
        and agent.current_load + pending < agent.concurrency
    )


def affinity_agent(task, routed: dict[str, int] | None = None, among: list[int] | None = None) -> Agent | None:
    """The best live upstream agent that can take `task` now, or None. `among`: the ids of the
    agents that ran its upstreams, when the caller has them already."""
    from tasks.models import Task

    routed = routed or {}
    if among is None:
        among = Task.objects.filter(dependents=task, agent__isnull=False).values("agent_id")
    # The stored load lags until the next heartbeat; count the running tasks now instead.
    # Only our Celery workers have queues (an external agent's tasks run on an EAP gateway).
    upstream_agents = Agent.objects.filter(pk__in=among, mode=Agent.Mode.WORKER).annotate(
        running=Count("tasks", filter=running("tasks__"))
    )
    for agent in upstream_agents:
        agent.current_load = agent.running
    candidates = [a for a in upstream_agents if can_take(a, task.capability, routed.get(a.name, 0))]
    return max(candidates, key=score, default=None)


def queue_for(task, routed: dict[str, int] | None = None) -> str:
    """The queue for a task's next message. `routed` counts what the caller already sent to each
    agent in this round, so a fan-out does not pile onto the one agent that had a free slot."""
    if task.pinned_agent:
        return f"agent.{task.pinned_agent}"
    preferred = affinity_agent(task, routed)
    if preferred is None:
        return task.queue
    if routed is not None:
        routed[preferred.name] = routed.get(preferred.name, 0) + 1
    return f"agent.{preferred.name}"
