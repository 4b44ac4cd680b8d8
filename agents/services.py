"""Operator actions on agents."""

from django.db import transaction

from orchestrator_project.celery import app

from .models import Agent


def drain_agent(agent: Agent) -> None:
    """Stop the worker consuming new messages; what it already runs finishes normally.

    The status is written first (a heartbeat never overwrites draining); the remote control
    command goes out after commit, to the worker's own node name.
    """
    Agent.objects.filter(pk=agent.pk).update(status=Agent.Status.DRAINING)
    _for_each_queue_after_commit(agent, app.control.cancel_consumer)


def resume_agent(agent: Agent) -> None:
    """Undo a drain: consume the agent's queues again."""
    Agent.objects.filter(pk=agent.pk, status=Agent.Status.DRAINING).update(status=Agent.Status.ONLINE)
    _for_each_queue_after_commit(agent, app.control.add_consumer)


def _for_each_queue_after_commit(agent: Agent, command) -> None:
    queues, destination = agent.queues, [agent.worker_name]
    transaction.on_commit(lambda: [command(q, destination=destination) for q in queues])
