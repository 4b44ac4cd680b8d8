from django.db import migrations

from orchestrator_project.schedules import sync_schedules


class Migration(migrations.Migration):
    dependencies = [("agents", "0003_agent_routing_fields")]

    operations = [migrations.RunPython(sync_schedules, migrations.RunPython.noop)]
