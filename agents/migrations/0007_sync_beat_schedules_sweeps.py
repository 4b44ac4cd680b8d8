from django.db import migrations

from orchestrator_project.schedules import sync_schedules


class Migration(migrations.Migration):
    # The stuck-session sweep and the retention policy join the schedules (idempotent).
    dependencies = [("agents", "0006_sync_beat_schedules_leases")]

    operations = [migrations.RunPython(sync_schedules, migrations.RunPython.noop)]
