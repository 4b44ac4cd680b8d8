from celery import shared_task

from . import sweeps


@shared_task(name="sessions.sweep_degraded_sessions", acks_late=True)
def sweep_degraded_sessions() -> dict[str, int]:
    return sweeps.sweep_degraded_sessions()
