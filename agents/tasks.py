from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from .models import Agent


@shared_task(name="agents.mark_silent_agents_offline", acks_late=True)
def mark_silent_agents_offline() -> int:
    """An agent that has not beaten for AGENT_OFFLINE_AFTER_SECONDS is offline."""
    silent_since = timezone.now() - timedelta(seconds=settings.AGENT_OFFLINE_AFTER_SECONDS)
    return (
        Agent.objects.exclude(status=Agent.Status.OFFLINE)
        .filter(last_heartbeat__lt=silent_since)
        .update(status=Agent.Status.OFFLINE)
    )
