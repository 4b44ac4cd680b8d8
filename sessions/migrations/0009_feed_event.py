"""The feed of the live event streams (sessions.models.FeedEvent), filled with what the sessions
that exist already would have written, and the triggers that write it for sessions from now on:
one row when a session is created and one for each of its events (transitions and notes), in the
same transaction."""

import django.db.models.deletion
from django.db import migrations, models

SESSION_TRIGGERS = """
CREATE FUNCTION io_feed_session_created() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO agent_sessions_feedevent (txid, tenant_id, session_id, task_id, kind, data, created_at)
    VALUES (pg_current_xact_id()::text::bigint, NEW.tenant_id, NEW.id, NULL, 'session',
            jsonb_build_object('from', NULL, 'to', NEW.status, 'reason', 'created', 'actor', '', 'version', NEW.version),
            NEW.created_at);
    RETURN NULL;
END $$;
CREATE TRIGGER io_feed_session_created AFTER INSERT ON agent_sessions_session
    FOR EACH ROW EXECUTE FUNCTION io_feed_session_created();

CREATE FUNCTION io_feed_session_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO agent_sessions_feedevent (txid, tenant_id, session_id, task_id, kind, data, created_at)
    SELECT pg_current_xact_id()::text::bigint, s.tenant_id, NEW.session_id, NULL, 'session',
           jsonb_build_object('from', NEW.from_status, 'to', NEW.to_status, 'reason', NEW.reason,
                              'actor', NEW.actor, 'version', NEW.version),
           NEW.created_at
    FROM agent_sessions_session s WHERE s.id = NEW.session_id;
    RETURN NULL;
END $$;
CREATE TRIGGER io_feed_session_event AFTER INSERT ON agent_sessions_sessionevent
    FOR EACH ROW EXECUTE FUNCTION io_feed_session_event();
"""
# What the feed would hold for the sessions that exist already: their creation and their events
# (their tasks' past changes were never recorded). Transaction id 3 is visible in every snapshot:
# these rows are replayed with their session, never delivered as news.
BACKFILL = """
INSERT INTO agent_sessions_feedevent (txid, tenant_id, session_id, task_id, kind, data, created_at)
SELECT 3, s.tenant_id, s.id, NULL, 'session',
       jsonb_build_object('from', NULL, 'to', 'pending', 'reason', 'created', 'actor', '', 'version', 0),
       s.created_at
FROM agent_sessions_session s ORDER BY s.created_at;
INSERT INTO agent_sessions_feedevent (txid, tenant_id, session_id, task_id, kind, data, created_at)
SELECT 3, s.tenant_id, e.session_id, NULL, 'session',
       jsonb_build_object('from', e.from_status, 'to', e.to_status, 'reason', e.reason, 'actor', e.actor,
                          'version', e.version),
       e.created_at
FROM agent_sessions_sessionevent e JOIN agent_sessions_session s ON s.id = e.session_id ORDER BY e.id;
"""
DROP_SESSION_TRIGGERS = """
DROP TRIGGER io_feed_session_event ON agent_sessions_sessionevent;
DROP FUNCTION io_feed_session_event();
DROP TRIGGER io_feed_session_created ON agent_sessions_session;
DROP FUNCTION io_feed_session_created();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("agent_sessions", "0008_field_labels"),
    ]

    operations = [
        migrations.CreateModel(
            name="FeedEvent",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("txid", models.BigIntegerField()),
                ("tenant_id", models.BigIntegerField()),
                ("task_id", models.UUIDField(blank=True, null=True)),
                ("kind", models.CharField(choices=[("session", "Session"), ("task", "Task")], max_length=8)),
                ("data", models.JSONField()),
                ("created_at", models.DateTimeField()),
                (
                    "session",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="+", to="agent_sessions.session"
                    ),
                ),
            ],
            options={
                "ordering": ["id"],
                "indexes": [
                    models.Index(fields=["session", "txid"], name="feed_session_txid"),
                    models.Index(fields=["tenant_id", "txid"], name="feed_tenant_txid"),
                ],
            },
        ),
        migrations.RunSQL(BACKFILL, migrations.RunSQL.noop),
        migrations.RunSQL(SESSION_TRIGGERS, DROP_SESSION_TRIGGERS),
    ]
