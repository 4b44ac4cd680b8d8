"""The feed of the live event streams (sessions.models.FeedEvent): one row for every change of a
task's status, whichever statement makes it, in that statement's transaction."""

from django.db import migrations

TASK_TRIGGER = """
CREATE FUNCTION io_feed_task_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO agent_sessions_feedevent (txid, tenant_id, session_id, task_id, kind, data, created_at)
    SELECT pg_current_xact_id()::text::bigint, s.tenant_id, NEW.session_id, NEW.id, 'task',
           jsonb_build_object('key', NEW.key, 'from', OLD.status, 'to', NEW.status, 'attempt', NEW.attempts,
                              'agent', (SELECT a.name FROM agents_agent a WHERE a.id = NEW.agent_id),
                              'error', left(NEW.error, 2000)),
           now()
    FROM agent_sessions_session s WHERE s.id = NEW.session_id;
    RETURN NULL;
END $$;
CREATE TRIGGER io_feed_task_status AFTER UPDATE OF status ON tasks_task
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION io_feed_task_status();
"""
DROP_TASK_TRIGGER = """
DROP TRIGGER io_feed_task_status ON tasks_task;
DROP FUNCTION io_feed_task_status();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0010_field_labels"),
        ("agent_sessions", "0009_feed_event"),
        ("agents", "0011_field_labels"),
    ]

    operations = [migrations.RunSQL(TASK_TRIGGER, DROP_TASK_TRIGGER)]
