"""The DRF authtoken keys of before (plaintext, no expiry) become hashed tokens whose digest is
the hash of the old key, so that their holders keep working until API_TOKEN_LEGACY_GRACE_DAYS
from now; then authtoken's table goes. rest_framework.authtoken is no longer installed, so its
table is read with SQL, and only if it exists (a fresh database never had it)."""

from datetime import timedelta

from django.conf import settings
from django.db import migrations
from django.utils import timezone

LEGACY_TABLE = "authtoken_token"


def migrate_legacy_tokens(apps, schema_editor) -> None:
    from knox.crypto import hash_token
    from knox.settings import CONSTANTS

    connection = schema_editor.connection
    if LEGACY_TABLE not in connection.introspection.table_names():
        return
    token_model = apps.get_model("tokens", "ApiToken")
    expiry = timezone.now() + timedelta(days=settings.API_TOKEN_LEGACY_GRACE_DAYS)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT key, user_id FROM {LEGACY_TABLE}")  # noqa: S608 - a constant
        legacy = cursor.fetchall()
    token_model.objects.bulk_create(
        [
            token_model(
                digest=hash_token(key),
                token_key=key[: CONSTANTS.TOKEN_KEY_LENGTH],
                user_id=user_id,
                expiry=expiry,
                name="migrated DRF token",
            )
            for key, user_id in legacy
        ]
    )
    schema_editor.execute(f"DROP TABLE {LEGACY_TABLE}")
    # So that installing rest_framework.authtoken again would create its table again.
    schema_editor.execute("DELETE FROM django_migrations WHERE app = 'authtoken'")


class Migration(migrations.Migration):
    dependencies = [("tokens", "0001_api_token")]

    operations = [migrations.RunPython(migrate_legacy_tokens, migrations.RunPython.noop, elidable=False)]
