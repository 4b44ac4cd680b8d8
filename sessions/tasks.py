from celery import shared_task

from . import sweeps


@shared_task(name="sessions.sweep_degraded_sessions", acks_late=True)
def sweep_degraded_sessions() -> dict[str, int]:
    return sweeps.sweep_degraded_sessions()


@shared_task(name="sessions.sweep_stuck_sessions", acks_late=True)
def sweep_stuck_sessions() -> dict[str, int]:
    return sweeps.sweep_stuck_sessions()


@shared_task(name="sessions.apply_retention", acks_late=True)
def apply_retention() -> int:
    return sweeps.apply_retention()
