from django.db import migrations, models

# Existing pending tasks: count the upstreams that have not finished (see Task.upstream_open).
COUNT_OPEN_UPSTREAMS = """
UPDATE tasks_task t SET upstream_open = (
    SELECT count(*) FROM tasks_task_depends_on e JOIN tasks_task u ON u.id = e.to_task_id
    WHERE e.from_task_id = t.id AND u.status NOT IN ('completed', 'failed', 'skipped', 'cancelled')
)
WHERE t.status = 'pending'
"""


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0004_task_dispatched_to"),
    ]

    operations = [
        migrations.AddField(
            model_name="task",
            name="upstream_open",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.RunSQL(COUNT_OPEN_UPSTREAMS, migrations.RunSQL.noop),
    ]
