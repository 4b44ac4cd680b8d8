from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from .models import Agent


@shared_task(name="agents.mark_silent_agents_offline", acks_late=True)
def mark_silent_agents_offline() -> dict[str, int]:
    """An agent that has not beaten for AGENT_OFFLINE_AFTER_SECONDS is offline, and the tasks
    it was running are taken back at once (re-queued, or orphaned when their attempts are used
    up) rather than when their leases run out."""
    from tasks.leases import recover_tasks_of

    silent_since = timezone.now() - timedelta(seconds=settings.AGENT_OFFLINE_AFTER_SECONDS)
    done = {"offline": 0, "recovered": 0}
    for agent in Agent.objects.exclude(status=Agent.Status.OFFLINE).filter(last_heartbeat__lt=silent_since):
        # Compare-and-set: an agent that beat meanwhile, or a second sweep, changes nothing.
        went = Agent.objects.filter(pk=agent.pk, last_heartbeat=agent.last_heartbeat).exclude(
            status=Agent.Status.OFFLINE
        )
        if not went.update(status=Agent.Status.OFFLINE):
            continue
        done["offline"] += 1
        silent_for = (timezone.now() - agent.last_heartbeat).total_seconds()
        why = f"agent {agent.name} went silent (no heartbeat for {silent_for:.0f}s) while running"
        done["recovered"] += recover_tasks_of(agent, why)
    return done
