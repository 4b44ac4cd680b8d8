from django.db import migrations

from orchestrator_project.schedules import sync_schedules


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0001_initial"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(sync_schedules, migrations.RunPython.noop)]
