"""The one redaction function: what reaches a log line, a console page or an event stream has
passed through `redact` (docs/SECURITY.md, "Redaction").

It removes our own secrets by value (the secret variables of this environment and settings'
own, as given, percent-encoded and JSON-escaped) and, whoever they belong to, what has the shape
of a credential: private keys, passwords in URLs and connection strings, `password=...` and
`token: ...` assignments, Authorization headers, and the tokens of well-known providers. An
agent's output is hostile input: a test or a tool may print anything it can read.

What it cannot know stays: a secret of no known shape, printed alone, is only text.
"""

import functools
import json
import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote, urlsplit

from django.conf import settings

REDACTED = "[redacted]"
# A shorter value is left alone: it would match all over the text, and a secret this short
# protects nothing anyway.
MIN_SECRET_LENGTH = 8
# Variables whose whole value is a secret: these, and any name with one of the suffixes
# (provider keys, OPENCODE_SERVER_PASSWORD, EAP_OPERATOR_TOKEN, GITHUB_TOKEN, ...). Passwords in
# any URL-valued variable (DATABASE_URL, REDIS_URL, CELERY_BROKER_URL, ...) are found apart.
SECRET_VARIABLES = frozenset(
    # The OTLP headers may hold a collector's API key.
    {
        "SECRET_KEY",
        "METRICS_TOKEN",
        "FLOWER_BASIC_AUTH",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    }
)
SECRET_SUFFIXES = ("_API_KEY", "_TOKEN", "_PASSWORD", "_SECRET", "_SECRET_KEY", "_SECRET_ACCESS_KEY")

# Every pattern starts with a literal (a word, "://", a known prefix): one that could scan far
# from every position would take quadratic time on a hostile output (a megabyte of "a-a-a-..."),
# holding the process that shows it (tests/test_redaction.py).
_SECRET_WORD = r"(?:passw(?:or)?d|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)"  # noqa: S105
# Not a value an earlier pattern has redacted already (an external agent's token keeps its prefix).
_FRESH = rf"(?![^\s\"',;]*{re.escape(REDACTED)})"
_SCHEME = r"(?:bearer|token|basic|digest|negotiate)"
# A JSON key that names a secret: its value goes, whatever it looks like.
_SECRET_KEY = re.compile(rf"[A-Za-z0-9_.-]*{_SECRET_WORD}", re.I)  # fullmatch only: one start
# Each pattern and its replacement; the groups a replacement keeps are not secret.
SHAPES: list[tuple[re.Pattern, str]] = [
    # An external agent's token (agents/eap.py): the public prefix stays.
    (re.compile(r"\b(eap_[0-9a-f]{12}_)[A-Za-z0-9_-]+"), rf"\g<1>{REDACTED}"),
    # A PEM private key, whole (RSA, EC, OPENSSH, PGP, ...).
    (
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----|\Z)", re.S
        ),
        REDACTED,
    ),
    # scheme://user:password@ in a URL or a connection string: the user stays.
    (re.compile(r"(://[^\s:/@'\"]{0,256}:)[^\s@/'\"]{1,512}@"), rf"\g<1>{REDACTED}@"),
    # Authorization: Bearer|Token|Basic <credential>.
    (
        re.compile(
            rf"\b((?:proxy-)?authorization\s*[:=]\s*[\"']?(?:{_SCHEME}\s+)?)(?!{_SCHEME}\s){_FRESH}[^\s\"',;]+", re.I
        ),
        rf"\g<1>{REDACTED}",
    ),
    (re.compile(rf"\b((?:bearer|token)\s+){_FRESH}[A-Za-z0-9._~+/-]{{16,}}=*", re.I), rf"\g<1>{REDACTED}"),
    # name=value, name: value, "name": "value" for a name ending in a secret's word (DB_PASSWORD, api_key, ...).
    (
        re.compile(rf"({_SECRET_WORD}[\"']?\s*[:=]\s*[\"']?)(?!{re.escape(REDACTED)})[^\s\"'&;,]+", re.I),
        rf"\g<1>{REDACTED}",
    ),
    # Well-known token shapes: GitHub, GitLab, Slack, AWS access keys, OpenAI/Anthropic-style keys, JWTs.
    (
        re.compile(
            r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_-]{20,}"
            r"|xox[abprs]-[A-Za-z0-9-]{10,}|(?:AKIA|ASIA)[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{16,}"
            r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"
        ),
        REDACTED,
    ),
]


def secret_values(environ: Mapping[str, str], also: Iterable[str] = ()) -> set[str]:
    """Our secrets as they are configured: the secret variables of `environ`, the passwords of
    its URLs, Flower's password, and `also` (settings' own, such as SECRET_KEY)."""
    found = set(also)
    for name, value in environ.items():
        if name in SECRET_VARIABLES or name.endswith(SECRET_SUFFIXES):
            found.add(value)
        if name == "FLOWER_BASIC_AUTH":
            found.add(value.partition(":")[2])
        if "://" in value:
            found |= _url_passwords(value)
    return {value for value in found if len(value) >= MIN_SECRET_LENGTH}


def _url_passwords(value: str) -> set[str]:
    try:
        password = urlsplit(value).password
    except ValueError:  # not a URL after all
        return set()
    return {password, unquote(password)} if password else set()


class Redactor:
    """Replaces each of `secrets` wherever it appears, as given, percent-encoded (in a URL) and
    JSON-escaped (in a JSON string), then every credential of a known shape (SHAPES)."""

    def __init__(self, secrets: Iterable[str]):
        forms = set()
        for secret in secrets:
            if len(secret) >= MIN_SECRET_LENGTH:
                forms |= {secret, quote(secret, safe=""), json.dumps(secret)[1:-1]}
        # Longest first, so that a secret containing another is replaced whole.
        alternatives = sorted((form for form in forms if form), key=len, reverse=True)
        self._values = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def __call__(self, text: str) -> str:
        if self._values is not None:
            text = self._values.sub(REDACTED, text)
        for pattern, replacement in SHAPES:
            text = pattern.sub(replacement, text)
        return text


@functools.cache
def _ours() -> Redactor:
    return Redactor(settings.REDACTED_SECRETS)


def redact(text: str) -> str:
    """`text` without our secrets and without anything shaped like a credential."""
    return _ours()(text) if text else text


def redact_data(value):
    """`value` (JSON-like: dicts, lists, strings) with every string redacted, keys included."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {
            redact(str(key)): REDACTED if _SECRET_KEY.fullmatch(str(key)) and item else redact_data(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_data(item) for item in value]
    return value
