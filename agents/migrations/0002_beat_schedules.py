import json

from django.db import migrations

# Periodic housekeeping, created idempotently: re-running the migration (or a second Beat)
# finds the rows and changes nothing. `expires` drops a run that waited longer than its period.
SCHEDULES = [
    {"name": "mark silent agents offline", "task": "agents.mark_silent_agents_offline", "every": 10},
]


def create_schedules(apps, schema_editor):
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


def remove_schedules(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTask.objects.filter(name__in=[spec["name"] for spec in SCHEDULES]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0001_initial"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create_schedules, remove_schedules)]
