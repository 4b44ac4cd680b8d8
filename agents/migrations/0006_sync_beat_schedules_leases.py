from django.db import migrations

from orchestrator_project.schedules import sync_schedules


class Migration(migrations.Migration):
    # The lease reaper joins the schedules (idempotent: update_or_create by name).
    dependencies = [("agents", "0005_agent_processes")]

    operations = [migrations.RunPython(sync_schedules, migrations.RunPython.noop)]
