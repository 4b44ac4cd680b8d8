"""The periodic tasks Beat runs, kept in django-celery-beat's tables by data migrations.

`sync_schedules` is idempotent (update_or_create by name), so every migration that calls it
converges the database to this list. `expire_seconds` drops a run that waited longer than
its period, so a backlog after an outage never runs the same sweep many times over.
"""

import json

SCHEDULES = [
    {"name": "mark silent agents offline", "task": "agents.mark_silent_agents_offline", "every": 10},
    {"name": "sweep degraded sessions", "task": "sessions.sweep_degraded_sessions", "every": 10},
    {"name": "reap expired task leases", "task": "tasks.reap_expired_leases", "every": 10},
    {"name": "sweep stuck sessions", "task": "sessions.sweep_stuck_sessions", "every": 10},
    {"name": "apply the retention policy", "task": "sessions.apply_retention", "every": 3600},
]


def sync_schedules(apps, schema_editor=None) -> None:
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    for spec in SCHEDULES:
        interval, _ = IntervalSchedule.objects.get_or_create(every=spec["every"], period="seconds")
        PeriodicTask.objects.update_or_create(
            name=spec["name"],
            defaults={
                "task": spec["task"],
                "interval": interval,
                "queue": "housekeeping",
                "expire_seconds": spec["every"],
                "kwargs": json.dumps({}),
                "enabled": True,
            },
        )
