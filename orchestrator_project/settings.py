"""Settings for every process, read from environment variables (see README "Configuration")."""

import ipaddress
import json
import os
import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from orchestrator_project import logs, redaction
from orchestrator_project.repositories import RefusedRepository, parse_url_prefix

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None:
        raise ImproperlyConfigured(f"Set the environment variable {name}.")
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {raw!r}.")


def env_int(name: str, default: int, minimum: int = 0) -> int:
    return _env_number(name, default, minimum, int, "an integer")


def env_float(name: str, default: float, minimum: float = 0.0) -> float:
    return _env_number(name, default, minimum, float, "a number")


def _env_number(name: str, default, minimum, parse, kind: str):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be {kind}, got {raw!r}.") from None
    if not value >= minimum:  # also refuses nan
        raise ImproperlyConfigured(f"{name} must be at least {minimum:g}, got {raw}.")
    return value


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_rate(name: str, default: str) -> str:
    """A throttle rate as DRF reads it: requests/period, the period s, m, h or d (or a word
    starting with one: 6000/min)."""
    rate = env_str(name, default).strip()
    if not re.fullmatch(r"[0-9]+/[smhd][a-z]*", rate):
        raise ImproperlyConfigured(f"{name} must be a rate like 100/min (per s, min, hour or day), got {rate!r}.")
    return rate


def env_absolute_paths(name: str, default: str) -> list[str]:
    paths = env_list(name, default)
    for path in paths:
        if not path.startswith("/"):
            raise ImproperlyConfigured(f"{name} must list absolute paths, got {path!r}.")
    return paths


def env_url_prefixes(name: str, default: str) -> list[str]:
    prefixes = env_list(name, default)
    for prefix in prefixes:
        try:
            parse_url_prefix(prefix)
        except RefusedRepository as exc:
            raise ImproperlyConfigured(f"{name}: {prefix!r} is not a URL prefix we accept: {exc}.") from None
    return prefixes


def env_json_dict(name: str, default: dict) -> dict:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a JSON object: {exc}.") from None
    if not isinstance(value, dict):
        raise ImproperlyConfigured(f"{name} must be a JSON object.")
    return value


DEBUG = env_bool("DEBUG", False)
# No secret has a default outside DEBUG: a production process without SECRET_KEY refuses to start.
SECRET_KEY = env_str("SECRET_KEY", "insecure-dev-key-only-for-debug" if DEBUG else None)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]" if DEBUG else "")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "knox",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "axes",
    "tenants",
    "tokens",
    "sessions.apps.SessionsConfig",
    "tasks.apps.TasksConfig",
    "agents",
    "console",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "orchestrator_project.middleware.LogContextMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "api.throttling.FailedAuthenticationMiddleware",
    "orchestrator_project.middleware.RequestSizeLimitMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # django-axes: refuses a locked-out login (admin and console) before the view runs.
    "axes.middleware.AxesMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # first: counts failures, refuses locked-out logins
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "api.urls"
# The console's pages log in with Django's own login (console/urls.py).
LOGIN_URL = "console:login"
LOGIN_REDIRECT_URL = "console:sessions"
WSGI_APPLICATION = "orchestrator_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "console.context.console",
            ],
        },
    },
]

# PostgreSQL only: the task hot path (tasks/statements.py) is PostgreSQL SQL (data-modifying
# WITH, arrays), and SQLite could not take several workers writing at once anyway.
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/orchestrator"),
        conn_max_age=env_int("DB_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise ImproperlyConfigured(
        f"DATABASE_URL must be a postgres:// URL (got a {DATABASES['default']['ENGINE']} database): "
        "Industrial Orchestrator runs on PostgreSQL only."
    )
# The hot path prepares its statements once per connection. Turn this off behind a connection
# pooler in transaction mode that cannot keep prepared statements (PgBouncer before 1.21).
DB_PREPARED_STATEMENTS = env_bool("DB_PREPARED_STATEMENTS", True)
if DB_PREPARED_STATEMENTS:
    # Django turns psycopg's statement preparation off (None); a threshold no query reaches
    # keeps the ORM's queries unprepared while allowing the hot path's explicit ones.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("prepare_threshold", 2**31 - 1)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}

# Bodies above this size get 413 before any parsing.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("MAX_REQUEST_BYTES", 1_048_576, minimum=1024)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tokens.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["tenants.permissions.IsTenantMember"],
    "DEFAULT_PARSER_CLASSES": [
        "orchestrator_project.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "api.pagination.Pagination",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "api.errors.exception_handler",
    # api/throttling.py; counted in the default cache (Redis), shared by every process.
    "DEFAULT_THROTTLE_CLASSES": ["api.throttling.UserRateThrottle", "api.throttling.TenantRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        "user": env_rate("API_THROTTLE_USER", "6000/min"),
        "tenant": env_rate("API_THROTTLE_TENANT", "20000/min"),
        # 401s answered to requests with credentials, per client address (api/throttling.py).
        "auth_failures": env_rate("API_THROTTLE_AUTH_FAILURES", "20/min"),
    },
    # Proxies in front of the web and stream processes: the client's address is the one this
    # many proxies back in X-Forwarded-For; with 0, REMOTE_ADDR and X-Forwarded-For is ignored.
    "NUM_PROXIES": env_int("NUM_PROXIES", 0),
    "PAGE_SIZE": 50,
}
# API tokens (docs/SECURITY.md, "Credential lifecycle"): knox, hashed at rest, `io_`-prefixed,
# several per user. A new token lives API_TOKEN_TTL_DAYS unless asked for less (0: no expiry and
# no cap). The DRF tokens of before are migrated once, to expire API_TOKEN_LEGACY_GRACE_DAYS later.
API_TOKEN_TTL_DAYS = env_int("API_TOKEN_TTL_DAYS", 90)
API_TOKEN_LEGACY_GRACE_DAYS = env_int("API_TOKEN_LEGACY_GRACE_DAYS", 30, minimum=1)
KNOX_TOKEN_MODEL = "tokens.ApiToken"  # noqa: S105 - a model name
# knox's own migrations create its table although the model is swapped out (their CreateModel
# lacks the swappable option): an unused table whose foreign key to auth_user breaks flush.
MIGRATION_MODULES = {"knox": None}
REST_KNOX = {
    "TOKEN_PREFIX": "io_",
    "AUTH_HEADER_PREFIX": "Token",
    "TOKEN_TTL": timedelta(days=API_TOKEN_TTL_DAYS) if API_TOKEN_TTL_DAYS else None,
    "AUTO_REFRESH": False,
}
# Login lockout (django-axes) on the admin's and the console's login: after LOGIN_FAILURE_LIMIT
# failed logins for one username from one address, that pair is refused (429) for
# LOGIN_LOCKOUT_MINUTES. `manage.py axes_reset_username NAME` lifts a lockout early.
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_LOCKOUT_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "api.throttling.client_address"  # NUM_PROXIES, as the API's throttles
AXES_VERBOSE = False  # no "AXES: BEGIN" line at every process's start; failures are still logged
# Keep no row per successful login (address, user agent, time): only the failed attempts a
# lockout needs, which are deleted once their cool-off has passed.
AXES_DISABLE_ACCESS_LOG = True
AXES_COOLOFF_MESSAGE = (
    f"Too many failed logins for this username from your address: locked out for "
    f"{AXES_COOLOFF_TIME.total_seconds() / 60:g} minutes. An operator can lift it sooner with "
    "`manage.py axes_reset_username USERNAME`."
)
# A list's count stops here (api/pagination.py): counting every row costs as much as the rows.
API_COUNT_LIMIT = env_int("API_COUNT_LIMIT", 10_000, minimum=100)

SPECTACULAR_SETTINGS = {
    "TITLE": "Industrial Orchestrator API",
    "DESCRIPTION": "Submit coding sessions, follow their task DAG and agents.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Serve Swagger UI's assets ourselves: no CDN needed, works offline.
    "ENUM_NAME_OVERRIDES": {
        "SessionStatusEnum": "sessions.models.Status",
        "TaskStatusEnum": "tasks.models.Task.Status",
        "AgentStatusEnum": "agents.models.Agent.Status",
        "CapabilityEnum": "agents.capabilities.CAPABILITIES",
    },
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    # drf-spectacular's default (enums as components), then the error responses every operation has.
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "api.schema.document_client_errors"],
}

# Orchestration limits.
MAX_TASKS_PER_SESSION = env_int("MAX_TASKS_PER_SESSION", 200, minimum=1)
# Fair share (tasks/fairshare.py, docs/ROUTING.md): a tenant may have this many messages in
# flight per slot of its weighted share of a capability; above 1, a few wait on the queue so that
# no slot idles between a finish and the next release.
FAIR_SHARE_BURST = env_float("FAIR_SHARE_BURST", 1.5, minimum=1.0)
MAX_TEXT_CHARS = env_int("MAX_TEXT_CHARS", 20_000, minimum=100)
# Per-tenant quotas' defaults (tasks/quotas.py); the admin overrides them per tenant. A tenant's
# tasks per session defaults to MAX_TASKS_PER_SESSION and may only narrow it.
QUOTA_ACTIVE_SESSIONS = env_int("QUOTA_ACTIVE_SESSIONS", 20)
QUOTA_OPEN_TASKS = env_int("QUOTA_OPEN_TASKS", 1000)
QUOTA_MAX_PRIORITY_DEVELOPER = env_int("QUOTA_MAX_PRIORITY_DEVELOPER", 5)
QUOTA_MAX_PRIORITY_OPERATOR = env_int("QUOTA_MAX_PRIORITY_OPERATOR", 9)
QUOTA_MAX_PRIORITY_ADMIN = env_int("QUOTA_MAX_PRIORITY_ADMIN", 9)
for _name in ("QUOTA_MAX_PRIORITY_DEVELOPER", "QUOTA_MAX_PRIORITY_OPERATOR", "QUOTA_MAX_PRIORITY_ADMIN"):
    if globals()[_name] > 9:
        raise ImproperlyConfigured(f"{_name} must be a session priority, 0..9")
TASK_DEADLINE_SECONDS = env_int("TASK_DEADLINE_SECONDS", 1800, minimum=1)
# A claim holds its task for this long; the agent renews it while the claiming process lives
# (and Beat for agents that still beat). A task whose lease ran out is re-queued (Beat).
TASK_LEASE_SECONDS = env_int("TASK_LEASE_SECONDS", 60, minimum=2)
AGENT_HEARTBEAT_SECONDS = env_int("AGENT_HEARTBEAT_SECONDS", 5, minimum=1)
AGENT_OFFLINE_AFTER_SECONDS = env_int("AGENT_OFFLINE_AFTER_SECONDS", 30, minimum=2)
# An agent's counters and EWMA duration (routing's score) cover its latest finished tasks: at
# most this many, finished at most this long ago (so a heartbeat's cost does not grow with history).
AGENT_STATS_WINDOW_HOURS = env_int("AGENT_STATS_WINDOW_HOURS", 24, minimum=1)
AGENT_STATS_WINDOW_TASKS = env_int("AGENT_STATS_WINDOW_TASKS", 200, minimum=20)
# A running session whose ready task has had no live agent this long turns degraded.
DEGRADED_AFTER_SECONDS = env_int("DEGRADED_AFTER_SECONDS", 15)
WORKSPACE_ROOT = Path(env_str("WORKSPACE_ROOT", str(BASE_DIR / "workspaces")))
# Sessions may name local repositories only under these directories (comma-separated absolute
# paths, compared on real paths): the path comes from API input. Development allows any;
# production allows none until configured. The admin can narrow them per tenant.
REPOSITORY_ROOTS = env_absolute_paths("REPOSITORY_ROOTS", "/" if DEBUG else "")
# Git URLs a session may name must lie under one of these (comma-separated, compared on parsed
# components), e.g. https://github.com/acme/: they are cloned with the workers' git credentials.
# The admin can narrow them per tenant.
REPOSITORY_URL_PREFIXES = env_url_prefixes("REPOSITORY_URL_PREFIXES", "https://,ssh://,git://" if DEBUG else "")
# A git config file of the operator's that our git commands outside a workspace (clones, checks
# and fetches in a local repository) read as their global config: credential helpers, proxies,
# safe.directory. Git in a workspace reads none. Empty: none.
REPOSITORY_GIT_CONFIG = env_str("REPOSITORY_GIT_CONFIG", "")
if REPOSITORY_GIT_CONFIG and not REPOSITORY_GIT_CONFIG.startswith("/"):
    raise ImproperlyConfigured(f"REPOSITORY_GIT_CONFIG must be an absolute path, got {REPOSITORY_GIT_CONFIG!r}.")
WORKSPACE_CLONE_TIMEOUT_SECONDS = env_int("WORKSPACE_CLONE_TIMEOUT_SECONDS", 600, minimum=1)
# The final diff a session's result keeps, in characters (the branch has all of it).
WORKSPACE_DIFF_LIMIT = env_int("WORKSPACE_DIFF_LIMIT", 200_000, minimum=1000)
SESSION_LOCK_TTL_SECONDS = env_int("SESSION_LOCK_TTL_SECONDS", 30, minimum=1)
# A queued task whose run_task message the broker no longer holds this long after it was queued
# is sent again (Beat). Above the time a chain takes to send its next message.
LOST_MESSAGE_AFTER_SECONDS = env_int("LOST_MESSAGE_AFTER_SECONDS", 30, minimum=1)
# Settled sessions (and their tasks and events) are deleted this many days after they finished;
# 0 keeps them forever.
SESSION_RETENTION_DAYS = env_int("SESSION_RETENTION_DAYS", 90)
# Sessions left pending (never started) or paused, untouched this many days, are deleted with
# their workspaces and branches (docs/DATA.md); 0 keeps them forever.
ABANDONED_SESSION_DAYS = env_int("ABANDONED_SESSION_DAYS", 30)
# The most rows one sweep step reads or deletes at once.
SWEEP_BATCH = env_int("SWEEP_BATCH", 500, minimum=1)
# Lease of the lock the leading Beat holds; a second Beat takes over at most this long after it dies.
BEAT_LEADER_TTL_SECONDS = env_int("BEAT_LEADER_TTL_SECONDS", 30, minimum=3)

# The shell executor runs only these operator-configured commands, one per capability.
SHELL_EXECUTOR_COMMANDS = env_json_dict(
    "SHELL_EXECUTOR_COMMANDS",
    {"testing": "python -m pytest -q", "code_review": "ruff check ."},
)
SHELL_EXECUTOR_OUTPUT_LIMIT = env_int("SHELL_EXECUTOR_OUTPUT_LIMIT", 65_536, minimum=1024)

# The opencode executor (docs/OPENCODE.md). Without OPENCODE_URL, `run_agent --executor opencode`
# starts its own `opencode serve` (OPENCODE_BIN) with a generated password and OPENCODE_CONFIG
# (a JSON object merged into the server's config, e.g. a provider block), plus OPENCODE_MODEL.
OPENCODE_URL = env_str("OPENCODE_URL", "").rstrip("/")
if OPENCODE_URL and not OPENCODE_URL.startswith(("http://", "https://")):
    raise ImproperlyConfigured(f"OPENCODE_URL must be an http(s):// URL, got {OPENCODE_URL!r}.")
OPENCODE_SERVER_USERNAME = env_str("OPENCODE_SERVER_USERNAME", "opencode")
OPENCODE_SERVER_PASSWORD = env_str("OPENCODE_SERVER_PASSWORD", "")
if OPENCODE_URL and not OPENCODE_SERVER_PASSWORD and not DEBUG:
    raise ImproperlyConfigured("Set OPENCODE_SERVER_PASSWORD: an OpenCode server without one runs unsecured.")
OPENCODE_BIN = env_str("OPENCODE_BIN", str(BASE_DIR / "node_modules" / ".bin" / "opencode"))
OPENCODE_MODEL = env_str("OPENCODE_MODEL", "")  # "provider/model"; empty: the server's default
if OPENCODE_MODEL and (not all(OPENCODE_MODEL.partition("/")[::2]) or len(OPENCODE_MODEL.split()) != 1):
    raise ImproperlyConfigured(f"OPENCODE_MODEL must look like provider/model, got {OPENCODE_MODEL!r}.")
OPENCODE_CONFIG = env_json_dict("OPENCODE_CONFIG", {})
# How the executor answers permission.asked, per permission type (edit, bash, external_directory,
# ...) with a "default": once, always or reject. Edits and commands stay inside the workspace.
OPENCODE_PERMISSION_POLICY = env_json_dict(
    "OPENCODE_PERMISSION_POLICY", {"default": "reject", "edit": "once", "bash": "once"}
)
if not all(reply in ("once", "always", "reject") for reply in OPENCODE_PERMISSION_POLICY.values()):
    raise ImproperlyConfigured("OPENCODE_PERMISSION_POLICY values must be once, always or reject.")
OPENCODE_QUESTION_POLICY = env_str("OPENCODE_QUESTION_POLICY", "first_option")
if OPENCODE_QUESTION_POLICY not in ("first_option", "reject"):
    raise ImproperlyConfigured(
        f"OPENCODE_QUESTION_POLICY must be first_option or reject, got {OPENCODE_QUESTION_POLICY!r}."
    )
OPENCODE_REQUEST_TIMEOUT_SECONDS = env_int("OPENCODE_REQUEST_TIMEOUT_SECONDS", 30, minimum=1)
# Connection failures to one OpenCode server before its circuit opens, and how long it stays open.
OPENCODE_BREAKER_FAIL_MAX = env_int("OPENCODE_BREAKER_FAIL_MAX", 3, minimum=1)
OPENCODE_BREAKER_RESET_SECONDS = env_int("OPENCODE_BREAKER_RESET_SECONDS", 30, minimum=1)
# Environment variables a started server gets besides PATH, locale, proxies, OPENCODE_* flags and
# *_API_KEY (comma-separated; e.g. AWS_ACCESS_KEY_ID for Bedrock). Nothing else of the worker's.
OPENCODE_SERVER_ENV = env_list("OPENCODE_SERVER_ENV", "")

# The sandbox every process an executor starts runs in (docs/SECURITY.md): bwrap (bubblewrap, the
# default, required when DEBUG is false) or none (DEBUG only, a warning at every task start).
SANDBOX = env_str("SANDBOX", "bwrap")
if SANDBOX not in ("bwrap", "none"):
    raise ImproperlyConfigured(f"SANDBOX must be bwrap or none, got {SANDBOX!r}.")
if SANDBOX == "none" and not DEBUG:
    raise ImproperlyConfigured("SANDBOX=none runs agent code next to the platform's secrets: DEBUG only.")
if OPENCODE_URL and SANDBOX != "none":
    raise ImproperlyConfigured(
        "OPENCODE_URL names an OpenCode server outside the sandbox: unset it (each task starts its own "
        "server in its sandbox), or use SANDBOX=none in development."
    )
# Known providers' API hosts, for the default of SANDBOX_ALLOWED_HOSTS.
MODEL_PROVIDER_HOSTS = {
    "anthropic": "api.anthropic.com", "openai": "api.openai.com", "openrouter": "openrouter.ai",
    "google": "generativelanguage.googleapis.com", "mistral": "api.mistral.ai", "groq": "api.groq.com",
    "deepseek": "api.deepseek.com", "xai": "api.x.ai", "opencode": "opencode.ai",
}  # fmt: skip


def _model_hosts() -> str:
    """The configured model provider's host: each baseURL in OPENCODE_CONFIG (with its port when
    it names one) and the API host of OPENCODE_MODEL's provider when it is a known one."""
    hosts = []
    for provider in (OPENCODE_CONFIG.get("provider") or {}).values():
        url = urlparse(str(((provider or {}).get("options") or {}).get("baseURL") or ""))
        if url.hostname:
            hosts.append(f"{url.hostname}:{url.port}" if url.port else url.hostname)
    known = MODEL_PROVIDER_HOSTS.get(OPENCODE_MODEL.partition("/")[0])
    return ",".join(hosts + ([known] if known else []))


# Hosts a sandboxed process may reach through the sandbox's proxy: host (ports 80 and 443),
# host:port, or *.domain. Nothing else is reachable, the platform's own services included.
SANDBOX_ALLOWED_HOSTS = env_list("SANDBOX_ALLOWED_HOSTS", _model_hosts())
# Limits of every sandboxed process: data memory, processes of the sandbox's user, CPU seconds
# and the size of any one file written. Wall time is the task's deadline.
SANDBOX_MEMORY_MB = env_int("SANDBOX_MEMORY_MB", 2048, minimum=64)
# OpenCode 1.18.33 (Bun) maps about 2 GB of data it never touches (VmData 2.0 GB at 75 MB RSS):
# at 2048 a thread it starts can fail to get a stack, and Bun crashes (SIGILL). Never below the
# tools' limit: the tool shell lowers its own limit to theirs, and cannot raise it.
SANDBOX_SERVER_MEMORY_MB = env_int("SANDBOX_SERVER_MEMORY_MB", max(4096, SANDBOX_MEMORY_MB), minimum=SANDBOX_MEMORY_MB)
SANDBOX_MAX_PROCESSES = env_int("SANDBOX_MAX_PROCESSES", 256, minimum=16)
SANDBOX_CPU_SECONDS = env_int("SANDBOX_CPU_SECONDS", 1800, minimum=1)
SANDBOX_FILE_SIZE_MB = env_int("SANDBOX_FILE_SIZE_MB", 1024, minimum=1)
# A worker running as root runs each sandbox as a user id of its own from this base (1,000 ids).
SANDBOX_UID_BASE = env_int("SANDBOX_UID_BASE", 700_000, minimum=1000)
# Directories visible read-only in every sandbox besides the system, Python and OpenCode
# (toolchains the configured shell commands need, e.g. /opt/node).
SANDBOX_READ_ONLY_PATHS = env_list("SANDBOX_READ_ONLY_PATHS", "")

# Celery. The hard limit kills a runaway task; the soft limit lets run_task record the failure
# first. The broker is Redis (the default) or RabbitMQ (amqp://); the result backend is Redis.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND", REDIS_URL)
BROKER_SCHEMES = {"redis": "redis", "rediss": "redis", "amqp": "amqp", "amqps": "amqp", "pyamqp": "amqp"}
BROKER_KIND = BROKER_SCHEMES.get(urlparse(CELERY_BROKER_URL).scheme)
if BROKER_KIND is None:
    raise ImproperlyConfigured(
        "CELERY_BROKER_URL must be a redis://, rediss://, amqp:// or amqps:// URL, "
        f"got {urlparse(CELERY_BROKER_URL).scheme!r}."
    )
CELERY_TASK_SOFT_TIME_LIMIT = TASK_DEADLINE_SECONDS
CELERY_TASK_TIME_LIMIT = TASK_DEADLINE_SECONDS + 60
# Redis redelivers an unacked message after visibility_timeout, so it must exceed the longest
# task, and it must be set in all three places or the result backend and the broker disagree
# (Celery docs, "Redis caveats").
_VISIBILITY_TIMEOUT = CELERY_TASK_TIME_LIMIT * 2
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"visibility_timeout": _VISIBILITY_TIMEOUT}
CELERY_VISIBILITY_TIMEOUT = _VISIBILITY_TIMEOUT
if BROKER_KIND == "redis":
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": _VISIBILITY_TIMEOUT,
        # Ten priority levels; the Redis transport consumes 0 first.
        "priority_steps": list(range(10)),
        "sep": ":",
        "queue_order_strategy": "priority",
    }
else:
    # RabbitMQ: classic durable queues with ten priorities (x-max-priority; quorum queues have
    # two), persistent messages, and a publish returns only once the broker has confirmed it.
    # A consumer that dies returns its unacked messages to the queue at once.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}
    CELERY_TASK_QUEUE_MAX_PRIORITY = 9
    # Without a heartbeat a dead TCP peer is noticed only by the kernel, many minutes later.
    CELERY_BROKER_HEARTBEAT = 10
# The broker priority of an API priority (0..9, 9 most urgent): Redis consumes 0 first, RabbitMQ 9.
BROKER_PRIORITY_INVERTED = BROKER_KIND == "redis"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_CREATE_MISSING_QUEUES = True
CELERY_TASK_DEFAULT_QUEUE = "orchestrator"
CELERY_TASK_DEFAULT_PRIORITY = 4 if BROKER_PRIORITY_INVERTED else 5  # the API's default priority, 5
CELERY_TASK_ROUTES = {
    "agents.mark_silent_agents_offline": {"queue": "housekeeping"},
    "sessions.sweep_degraded_sessions": {"queue": "housekeeping"},
    "tasks.reap_expired_leases": {"queue": "housekeeping"},
    "sessions.sweep_stuck_sessions": {"queue": "housekeeping"},
    "sessions.apply_retention": {"queue": "housekeeping"},
}
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_EXPIRES = 24 * 3600
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Celery's Django fix-up closes the database connection around every task unless this is set;
# reconnecting per task dominated short tasks. Connections that are too old or saw an error are
# still dropped before each task (tasks/tasks.py, task_prerun).
CELERY_DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", 1000)
CELERY_BEAT_SCHEDULER = "orchestrator_project.beat:LeaderScheduler"
CELERY_TIMEZONE = TIME_ZONE

# Metrics (docs/OBSERVABILITY.md). The web serves /metrics to a scraper that sends
# "Authorization: Bearer <METRICS_TOKEN>"; without a token, only to loopback clients in development
# (DEBUG) and to nobody otherwise. A Celery worker (an agent, the orchestrator) serves its own on
# METRICS_ADDRESS:METRICS_PORT when the port is set. A scraper's host must be in ALLOWED_HOSTS.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
METRICS_PORT = env_int("METRICS_PORT", 0)
METRICS_ADDRESS = env_str("METRICS_ADDRESS", "127.0.0.1")

# Tracing (docs/TRACING.md). Every process instruments Django, Celery and httpx, so trace context
# always propagates, and psycopg and Redis too when spans go somewhere; OTEL_TRACES_EXPORTER says
# where: none (records nothing), console (stdout, for development) or otlp (OTLP over HTTP to the endpoint; the
# exporter reads OTEL_EXPORTER_OTLP_* itself). Off unless configured: otlp once an OTLP endpoint
# is set, none otherwise (console by default would bury development's and the tests' logs in
# spans). OTEL_SDK_DISABLED turns tracing off entirely: no instrumentation, no trace ids.
_OTLP_ENDPOINT = env_str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "") or env_str("OTEL_EXPORTER_OTLP_ENDPOINT", "")
OTEL_TRACES_EXPORTER = env_str("OTEL_TRACES_EXPORTER", "") or ("otlp" if _OTLP_ENDPOINT else "none")
if OTEL_TRACES_EXPORTER not in ("none", "console", "otlp"):
    raise ImproperlyConfigured(f"OTEL_TRACES_EXPORTER must be none, console or otlp, got {OTEL_TRACES_EXPORTER!r}.")
OTEL_SDK_DISABLED = env_bool("OTEL_SDK_DISABLED", False)

# The live event streams (api/stream.py, docs/CONSOLE.md), served by an ASGI process of their
# own. STREAM_URL: where browsers reach it ("" when a proxy serves it on the API's own origin);
# STREAM_ALLOWED_ORIGINS: the console's origins it lets read a stream with their cookies when it
# runs on an origin of its own (make up: the API on :8000, the streams on :8001).
STREAM_URL = env_str("STREAM_URL", "").rstrip("/")
STREAM_ALLOWED_ORIGINS = env_list("STREAM_ALLOWED_ORIGINS", "")
STREAM_HEARTBEAT_SECONDS = env_float("STREAM_HEARTBEAT_SECONDS", 15.0, minimum=0.1)
# Each reader looks at the database this often even when no change was announced (a lost
# pub/sub message, a change made where nothing announces it).
STREAM_POLL_SECONDS = env_float("STREAM_POLL_SECONDS", 5.0, minimum=0.05)
STREAM_DB_POOL_SIZE = env_int("STREAM_DB_POOL_SIZE", 10, minimum=1)
STREAM_BATCH = env_int("STREAM_BATCH", 500, minimum=1)
# A stream closes after this long and the browser reconnects where it was: authenticated again,
# so that a logout, a removed token or a deactivated user ends what they had open.
STREAM_MAX_SECONDS = env_float("STREAM_MAX_SECONDS", 900.0, minimum=1.0)
STREAM_MAX_PER_USER = env_int("STREAM_MAX_PER_USER", 20, minimum=1)

# Logs (docs/LOGGING.md): JSON lines on stderr, or lines for a person at a console; one
# formatter for every logger of every process, with the secrets of this environment redacted.
LOG_FORMAT = env_str("LOG_FORMAT", "console" if DEBUG else "json")
if LOG_FORMAT not in logs.FORMATS:
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or console, got {LOG_FORMAT!r}.")
LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    raise ImproperlyConfigured(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {LOG_LEVEL!r}.")
LOGGING_CONFIG = "orchestrator_project.logs.configure"
# Our secrets by value, which orchestrator_project/redaction.py removes from every log line,
# page and event stream.
REDACTED_SECRETS = redaction.secret_values(
    os.environ,
    also=[SECRET_KEY, METRICS_TOKEN, OPENCODE_SERVER_PASSWORD, DATABASES["default"].get("PASSWORD") or ""],
)
LOGGING = logs.logging_config(log_format=LOG_FORMAT, level=LOG_LEVEL, secrets=REDACTED_SECRETS)

# Load balancers and orchestrators probe health, and Prometheus scrapes /metrics (with its
# token), over plain HTTP inside the platform's network: no redirect to HTTPS for them.
SECURE_REDIRECT_EXEMPT = [r"^health/", r"^metrics$"]
if not DEBUG:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True

# External Agent Protocol (docs/EAP.md): agents registered over the API, reached by the `eap`
# executor of a gateway agent worker. The interval is what registration tells an agent; like
# our own workers, one silent for AGENT_OFFLINE_AFTER_SECONDS is offline.
EAP_HEARTBEAT_INTERVAL_SECONDS = env_int(
    "EAP_HEARTBEAT_INTERVAL_SECONDS", max(1, min(10, AGENT_OFFLINE_AFTER_SECONDS // 3)), minimum=1
)
if EAP_HEARTBEAT_INTERVAL_SECONDS >= AGENT_OFFLINE_AFTER_SECONDS:
    raise ImproperlyConfigured(
        f"EAP_HEARTBEAT_INTERVAL_SECONDS ({EAP_HEARTBEAT_INTERVAL_SECONDS}) must be below "
        f"AGENT_OFFLINE_AFTER_SECONDS ({AGENT_OFFLINE_AFTER_SECONDS})."
    )
# One POST {endpoint}/task to a push agent: its timeout, and how many times a transient failure
# (connect error, timeout, 429, 502, 503, 504) is tried again within one attempt of the task.
EAP_PUSH_TIMEOUT_SECONDS = env_float("EAP_PUSH_TIMEOUT_SECONDS", 10.0, minimum=0.1)
EAP_PUSH_RETRIES = env_int("EAP_PUSH_RETRIES", 2)
# Networks an operator trusts push endpoints in, beyond the public internet (comma-separated
# CIDRs). Loopback only in development (DEBUG), so that a local agent can be tried; metadata
# addresses are refused whatever this says. See docs/SECURITY.md.
# Plain http push endpoints: development only.
EAP_ENDPOINT_ALLOW_HTTP = env_bool("EAP_ENDPOINT_ALLOW_HTTP", DEBUG)
if EAP_ENDPOINT_ALLOW_HTTP and not DEBUG:
    raise ImproperlyConfigured("EAP_ENDPOINT_ALLOW_HTTP: push endpoints must use https when DEBUG is false.")
EAP_ENDPOINT_ALLOW_NETWORKS = env_list("EAP_ENDPOINT_ALLOW_NETWORKS", "127.0.0.0/8,::1/128" if DEBUG else "")
for _network in EAP_ENDPOINT_ALLOW_NETWORKS:
    try:
        ipaddress.ip_network(_network, strict=False)
    except ValueError:
        raise ImproperlyConfigured(f"EAP_ENDPOINT_ALLOW_NETWORKS: {_network!r} is not a network (CIDR).") from None
# A push agent's circuit opens after this many consecutive failed POSTs (the agent shows as
# degraded and gets no work), and lets one trial POST through after the reset time.
EAP_BREAKER_FAIL_MAX = env_int("EAP_BREAKER_FAIL_MAX", 5, minimum=1)
EAP_BREAKER_RESET_SECONDS = env_int("EAP_BREAKER_RESET_SECONDS", 30, minimum=1)
# How often the gateway looks at a delivery it waits on (a result, a cancel, the deadline).
EAP_POLL_INTERVAL_SECONDS = env_float("EAP_POLL_INTERVAL_SECONDS", 0.3, minimum=0.05)
# After POST /api/v1/eap/rotate/, the agent's previous token and signing secret stay valid this long.
EAP_ROTATION_GRACE_SECONDS = env_int("EAP_ROTATION_GRACE_SECONDS", 3600)
