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
    queues, destination = agent.queues, [agent.worker_name]
    transaction.on_commit(lambda: [app.control.cancel_consumer(q, destination=destination) for q in queues])


def resume_agent(agent: Agent) -> None:
    """Undo a drain: consume the agent's queues again."""
    Agent.objects.filter(pk=agent.pk, status=Agent.Status.DRAINING).update(status=Agent.Status.ONLINE)
    queues, destination = agent.queues, [agent.worker_name]
    transaction.on_commit(lambda: [app.control.add_consumer(q, destination=destination) for q in queues])
