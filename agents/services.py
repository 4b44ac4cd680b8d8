"""Operator actions on agents: drain and resume, each audited (models.AgentEvent)."""

import logging

from django.db import transaction

from orchestrator_project.celery import app

from .models import Agent, AgentEvent

logger = logging.getLogger(__name__)


def drain_agent(agent: Agent, *, actor: str, reason: str = "") -> AgentEvent:
    """Stop the worker consuming new messages; what it already runs finishes normally.

    The status is written first (a heartbeat never overwrites draining), with the audit row in
    the same transaction; the remote control command goes out after commit, to the worker's own
    node name.
    """
    with transaction.atomic():
        event = _record(agent, AgentEvent.Action.DRAIN, actor=actor, reason=reason, to=lambda _: Agent.Status.DRAINING)
        _for_each_queue_after_commit(agent, app.control.cancel_consumer)
    return event


def resume_agent(agent: Agent, *, actor: str, reason: str = "") -> AgentEvent:
    """Undo a drain: consume the agent's queues again (an agent that is not draining keeps its
    status; the command goes out all the same, in case a worker missed the drain's undo)."""

    def online_if_draining(status: str) -> str:
        return Agent.Status.ONLINE if status == Agent.Status.DRAINING else status

    with transaction.atomic():
        event = _record(agent, AgentEvent.Action.RESUME, actor=actor, reason=reason, to=online_if_draining)
        _for_each_queue_after_commit(agent, app.control.add_consumer)
    return event


def _record(agent: Agent, action: str, *, actor: str, reason: str, to) -> AgentEvent:
    # The row lock orders this against another operator's action, so that each audit row's
    # from_status is the status the action found. A heartbeat's update waits for it, and its
    # own statement keeps draining (tasks/fleet.py, agents/eap.py).
    before = Agent.objects.select_for_update().values_list("status", flat=True).get(pk=agent.pk)
    after = to(before)
    if after != before:
        Agent.objects.filter(pk=agent.pk).update(status=after)
    logger.info("agent %s: %s by %s (%s -> %s)", agent.name, action, actor, before, after)
    return AgentEvent.objects.create(
        agent_id=agent.pk,
        agent_name=agent.name,
        action=action,
        actor=actor[:100],
        reason=reason[:500],
        from_status=before,
        to_status=after,
    )


def _for_each_queue_after_commit(agent: Agent, command) -> None:
    queues, destination = agent.queues, [agent.worker_name]
    transaction.on_commit(lambda: [command(q, destination=destination) for q in queues])
