"""Settings come from the environment through typed helpers: a bad value stops the process with
ImproperlyConfigured naming the variable, and production has no default secret."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from orchestrator_project.settings import env_bool, env_int, env_json_dict, env_list, env_str

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("raw", "expected"), [("42", 42), ("0", 0), ("", 7)])
def test_env_int_reads_integers_and_defaults_when_empty(monkeypatch, raw, expected):
    monkeypatch.setenv("IO_TEST_INT", raw)

    assert env_int("IO_TEST_INT", 7) == expected


def test_env_int_defaults_when_unset(monkeypatch):
    monkeypatch.delenv("IO_TEST_INT", raising=False)

    assert env_int("IO_TEST_INT", 7) == 7


@pytest.mark.parametrize("raw", ["many", "1.5", "0x10", "12abc"])
def test_env_int_rejects_a_non_integer_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("IO_TEST_INT", raw)

    with pytest.raises(ImproperlyConfigured, match="IO_TEST_INT must be an integer"):
        env_int("IO_TEST_INT", 7)


def test_env_int_rejects_a_value_below_the_minimum(monkeypatch):
    monkeypatch.setenv("IO_TEST_INT", "0")

    with pytest.raises(ImproperlyConfigured, match="IO_TEST_INT must be at least 1"):
        env_int("IO_TEST_INT", 7, minimum=1)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("1", True), ("YES", True), ("on", True), ("false", False), ("0", False), ("Off", False)],
)
def test_env_bool_reads_the_usual_spellings(monkeypatch, raw, expected):
    monkeypatch.setenv("IO_TEST_BOOL", raw)

    assert env_bool("IO_TEST_BOOL", not expected) is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "truee", "y"])
def test_env_bool_rejects_anything_else_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("IO_TEST_BOOL", raw)

    with pytest.raises(ImproperlyConfigured, match="IO_TEST_BOOL must be a boolean"):
        env_bool("IO_TEST_BOOL", False)


def test_env_json_dict_reads_an_object(monkeypatch):
    monkeypatch.setenv("IO_TEST_JSON", '{"testing": "pytest -q"}')

    assert env_json_dict("IO_TEST_JSON", {}) == {"testing": "pytest -q"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "IO_TEST_JSON must be a JSON object: "),
        ('["a"]', "IO_TEST_JSON must be a JSON object"),
        ("3", "IO_TEST_JSON must be a JSON object"),
    ],
)
def test_env_json_dict_rejects_bad_json_or_a_non_object_naming_the_variable(monkeypatch, raw, message):
    monkeypatch.setenv("IO_TEST_JSON", raw)

    with pytest.raises(ImproperlyConfigured, match="IO_TEST_JSON") as excinfo:
        env_json_dict("IO_TEST_JSON", {"default": "x"})

    assert str(excinfo.value).startswith(message)


def test_env_str_without_default_requires_the_variable(monkeypatch):
    monkeypatch.delenv("IO_TEST_STR", raising=False)

    with pytest.raises(ImproperlyConfigured, match="IO_TEST_STR"):
        env_str("IO_TEST_STR")


def test_env_list_splits_and_trims(monkeypatch):
    monkeypatch.setenv("IO_TEST_LIST", " a.example, ,b.example ")

    assert env_list("IO_TEST_LIST", "") == ["a.example", "b.example"]


def import_settings(**env: str) -> subprocess.CompletedProcess:
    """Import the real settings module in a fresh interpreter with exactly these variables set."""
    clean = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DEBUG", "DJANGO_SETTINGS_MODULE")}
    clean.pop("MAX_TASKS_PER_SESSION", None)
    return subprocess.run(
        [sys.executable, "-c", "import orchestrator_project.settings"],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_production_settings_refuse_to_load_without_secret_key():
    result = import_settings(DEBUG="false")

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "SECRET_KEY" in result.stderr


def test_production_settings_load_with_a_secret_key():
    result = import_settings(DEBUG="false", SECRET_KEY="a-real-secret-from-the-environment")

    assert result.returncode == 0, result.stderr


def test_debug_settings_load_without_a_secret_key():
    assert import_settings(DEBUG="true").returncode == 0


def test_production_settings_refuse_to_run_agents_outside_the_sandbox():
    result = import_settings(DEBUG="false", SECRET_KEY="a-real-secret-from-the-environment", SANDBOX="none")

    assert result.returncode != 0
    assert "SANDBOX=none runs agent code next to the platform's secrets: DEBUG only." in result.stderr


def test_debug_settings_allow_running_agents_outside_the_sandbox():
    assert import_settings(DEBUG="true", SANDBOX="none").returncode == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DEBUG", "sometimes"),
        ("SANDBOX", "docker"),
        ("MAX_TASKS_PER_SESSION", "lots"),
        ("SANDBOX_SERVER_MEMORY_MB", "1024"),  # below SANDBOX_MEMORY_MB (2048), the tools' limit
        ("SHELL_EXECUTOR_COMMANDS", "[1]"),
        ("REPOSITORY_ROOTS", "/srv/repos,relative/repos"),
        ("REPOSITORY_URL_PREFIXES", "https://github.com/acme/,git@github.com:acme/"),
        ("REPOSITORY_URL_PREFIXES", "file:///srv/"),
        ("REPOSITORY_GIT_CONFIG", "gitconfig"),
        ("API_THROTTLE_USER", "lots"),
        ("API_THROTTLE_TENANT", "100 per minute"),
        ("API_THROTTLE_AUTH_FAILURES", "20/fortnight"),
        ("NUM_PROXIES", "-1"),
        ("LOGIN_FAILURE_LIMIT", "0"),
        ("LOGIN_LOCKOUT_MINUTES", "soon"),
    ],
)
def test_a_bad_variable_stops_the_settings_import_naming_it(name, value):
    result = import_settings(**{"DEBUG": "true", name: value})

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert name in result.stderr.strip().splitlines()[-1]


def test_a_database_other_than_postgresql_stops_the_settings_import():
    result = import_settings(DEBUG="true", DATABASE_URL="sqlite:///trial.sqlite3")

    assert result.returncode != 0
    assert "DATABASE_URL must be a postgres:// URL" in result.stderr
