"""Users' API tokens: stored hashed, prefixed, several per user, named, expiring, revocable, and
the DRF tokens of before migrated so that they keep working until their grace ends."""

import binascii
import os
from datetime import timedelta
from importlib import import_module

import pytest
from django.apps import apps
from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone
from knox.crypto import hash_token
from rest_framework.test import APIClient

from tests.conftest import error_of, member_token
from tokens.models import ApiToken
from tokens.services import MAX_TOKENS_PER_USER, issue_token

TOKENS = "/api/v1/tokens/"
SESSIONS = "/api/v1/sessions/"


def client_of(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


@pytest.fixture
def token(db) -> str:
    return member_token("acme", "alice")


def create(token: str, **body):
    return client_of(token).post(TOKENS, body, format="json")


def tables_holding(text: str) -> list[str]:
    """Every table of ours one of whose rows, as text, contains `text`."""
    holding = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f'SELECT 1 FROM "{table}" t WHERE strpos(t::text, %s) > 0 LIMIT 1', [text])  # noqa: S608
            if cursor.fetchone():
                holding.append(table)
    return holding


def stored_rows_as_text() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(string_agg(row_to_json(t)::text, '\n'), '') FROM tokens_apitoken t")
        return cursor.fetchone()[0]


def test_a_token_is_stored_hashed_with_its_prefix_and_no_column_holds_the_key(token):
    created = create(token, name="ci")
    key = created.json()["token"]

    assert created.status_code == 201
    assert key.startswith("io_") and created.json()["prefix"] == key[:15]
    assert tables_holding(key) == [] and tables_holding(token) == []  # in no column of any table
    assert tables_holding(key[:15]) == ["tokens_apitoken"]  # the public prefix, by which it is found
    assert ApiToken.objects.get(token_key=key[:15]).digest == hash_token(key)


def test_the_list_shows_prefixes_names_and_expiries_never_keys_or_digests(token):
    key = create(token, name="ci").json()["token"]

    listed = client_of(token).get(TOKENS).json()["results"]

    assert {row["name"] for row in listed} == {"bootstrap_tenant", "ci"}
    assert all(set(row) == {"id", "name", "prefix", "created_at", "expires_at", "last_used_at"} for row in listed)
    assert key not in str(listed) and token not in str(listed)
    assert all(row["expires_at"] for row in listed)


def test_a_new_token_expires_after_the_setting_by_default(token, settings):
    settings.API_TOKEN_TTL_DAYS = 7
    before = timezone.now()

    created = create(token, name="ci").json()

    expiry = ApiToken.objects.get(pk=created["id"]).expiry
    assert before + timedelta(days=7) <= expiry <= timezone.now() + timedelta(days=7)


def test_several_tokens_of_one_user_all_authenticate(token):
    keys = [create(token, name=f"ci {n}").json()["token"] for n in range(3)]

    assert len(set(keys)) == 3
    assert all(client_of(key).get(SESSIONS).status_code == 200 for key in [token, *keys])
    assert ApiToken.objects.filter(user__username="alice").count() == 4


def test_an_expired_token_is_refused(token):
    ApiToken.objects.filter(token_key=token[:15]).update(expiry=timezone.now() - timedelta(seconds=1))

    assert error_of(client_of(token).get(SESSIONS), 401)["code"] == "authentication_failed"


def test_using_a_token_records_when_it_was_last_used(token):
    assert ApiToken.objects.get(token_key=token[:15]).last_used_at is None

    client_of(token).get(SESSIONS)

    assert ApiToken.objects.get(token_key=token[:15]).last_used_at is not None


def test_a_revoked_token_is_refused_at_once_and_the_others_still_work(token):
    other = create(token, name="ci").json()

    answer = client_of(token).delete(f"{TOKENS}{other['id']}/")

    assert answer.status_code == 204
    assert error_of(client_of(other["token"]).get(SESSIONS), 401)["code"] == "authentication_failed"
    assert client_of(token).get(SESSIONS).status_code == 200


def test_a_token_may_revoke_itself(token):
    own = ApiToken.objects.get(token_key=token[:15])

    assert client_of(token).delete(f"{TOKENS}{own.pk}/").status_code == 204
    assert client_of(token).get(SESSIONS).status_code == 401


def test_another_users_token_is_a_404_to_see_or_revoke_and_stays_valid(token):
    bobs = member_token("acme", "bob")
    bobs_row = ApiToken.objects.get(token_key=bobs[:15])

    assert error_of(client_of(token).get(f"{TOKENS}{bobs_row.pk}/"), 404)["code"] == "not_found"
    assert error_of(client_of(token).delete(f"{TOKENS}{bobs_row.pk}/"), 404)["code"] == "not_found"
    assert bobs_row.pk not in [row["id"] for row in client_of(token).get(TOKENS).json()["results"]]
    assert client_of(bobs).get(SESSIONS).status_code == 200


@pytest.mark.parametrize("path", ["999999999/", "abc/", "-1/", "1.5/"])
def test_an_unknown_token_id_is_a_404(token, path):
    assert client_of(token).delete(f"{TOKENS}{path}").status_code == 404
    assert ApiToken.objects.count() == 1


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": ["ci"]}, "name"),
        ({"name": "ci", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"name": "ci", "expires_at": "not a time"}, "expires_at"),
        ({"name": "ci", "expires_at": "9999-01-01T00:00:00Z"}, "expires_at"),
    ],
)
def test_a_bad_new_token_is_a_400_naming_the_field_and_nothing_is_issued(token, body, field):
    error = error_of(create(token, **body), 400)

    assert field in error["details"]
    assert ApiToken.objects.count() == 1


def test_a_token_made_with_a_token_expires_no_later_than_its_maker(token):
    maker = ApiToken.objects.get(token_key=token[:15])
    maker.expiry = timezone.now() + timedelta(hours=1)
    maker.save(update_fields=["expiry"])

    made = create(token, name="child").json()

    assert ApiToken.objects.get(pk=made["id"]).expiry <= maker.expiry


def test_no_more_than_the_cap_of_valid_tokens_per_user(token):
    user = get_user_model().objects.get(username="alice")
    for n in range(MAX_TOKENS_PER_USER - 1):
        issue_token(user, name=f"t{n}")

    assert error_of(create(token, name="one too many"), 409)["code"] == "conflict"
    assert ApiToken.objects.filter(user=user).count() == MAX_TOKENS_PER_USER


def test_tokens_need_authentication(db):
    assert error_of(APIClient().get(TOKENS), 401)["code"] == "not_authenticated"
    assert error_of(APIClient().post(TOKENS, {"name": "x"}, format="json"), 401)["code"] == "not_authenticated"


def test_a_header_that_is_not_utf8_is_a_401(db):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token \xff\xfe")

    assert error_of(client.get(SESSIONS), 401)["code"] == "authentication_failed"


def test_the_admin_lists_prefixes_only_and_revokes(admin_client, token):
    row = ApiToken.objects.get(token_key=token[:15])

    page = admin_client.get("/admin/tokens/apitoken/").content.decode()
    detail = admin_client.get(f"/admin/tokens/apitoken/{row.pk}/change/").content.decode()

    assert token[:15] in page
    assert row.digest not in page + detail and token not in page + detail
    assert admin_client.get("/admin/tokens/apitoken/add/").status_code == 403
    admin_client.post("/admin/tokens/apitoken/", {"action": "revoke", "_selected_action": [row.pk]})
    assert not ApiToken.objects.filter(pk=row.pk).exists()
    assert client_of(token).get(SESSIONS).status_code == 401


LEGACY_TABLE_SQL = """
CREATE TABLE authtoken_token (
    key varchar(40) PRIMARY KEY,
    created timestamptz NOT NULL,
    user_id integer NOT NULL UNIQUE REFERENCES auth_user (id) DEFERRABLE INITIALLY DEFERRED
)"""


def test_a_drf_token_of_before_the_migration_authenticates_after_it_until_its_grace_ends(token, settings):
    """What DRF's authtoken app left in the database (its table, as its migrations made it, and
    a key as it generated one), then the data migration."""
    settings.API_TOKEN_LEGACY_GRACE_DAYS = 10
    user = get_user_model().objects.get(username="alice")
    legacy_key = binascii.hexlify(os.urandom(20)).decode()
    with connection.cursor() as cursor:
        cursor.execute(LEGACY_TABLE_SQL)
        cursor.execute("INSERT INTO authtoken_token VALUES (%s, now(), %s)", [legacy_key, user.pk])
        cursor.execute("INSERT INTO django_migrations (app, name, applied) VALUES ('authtoken', '0001_initial', now())")
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # as if the rows were written long ago
    migration = import_module("tokens.migrations.0002_legacy_drf_tokens")

    with connection.schema_editor() as editor:
        migration.migrate_legacy_tokens(apps, editor)

    assert client_of(legacy_key).get(SESSIONS).status_code == 200
    migrated = ApiToken.objects.get(token_key=legacy_key[:15])
    assert migrated.digest == hash_token(legacy_key)
    assert timezone.now() + timedelta(days=9) < migrated.expiry <= timezone.now() + timedelta(days=10)
    assert legacy_key not in stored_rows_as_text()
    assert "authtoken_token" not in connection.introspection.table_names()
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM django_migrations WHERE app = 'authtoken'")
        assert cursor.fetchone()[0] == 0
    migrated.expiry = timezone.now() - timedelta(seconds=1)
    migrated.save(update_fields=["expiry"])
    assert client_of(legacy_key).get(SESSIONS).status_code == 401


def test_the_migration_does_nothing_without_drf_tables(db):
    migration = import_module("tokens.migrations.0002_legacy_drf_tokens")

    with connection.schema_editor() as editor:
        migration.migrate_legacy_tokens(apps, editor)

    assert not ApiToken.objects.exists()
