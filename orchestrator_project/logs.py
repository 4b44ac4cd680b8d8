"""Structured logs (docs/LOGGING.md): one formatter for structlog's events and for the standard
library's records (ours, Django's, Celery's, gunicorn's), rendered as JSON lines or for a
console, carrying the context bound to the current request or task and the ids of the current
OpenTelemetry span, with our own secrets redacted from every line.

settings.LOGGING is built here (logging_config) and applied by configure, Django's
LOGGING_CONFIG: every process that sets Django up (the web, the Celery workers, Beat,
manage.py) logs the same way. Celery and gunicorn are pointed at it in celery.py and
gunicorn.conf.py.
"""

import functools
import logging
import logging.config
import sys
from collections.abc import Iterable, Mapping

import structlog
from celery.signals import celeryd_after_setup, setup_logging, task_prerun
from opentelemetry import trace

from .redaction import Redactor

FORMATS = ("json", "console")
log = structlog.get_logger(__name__)


class RedactLine:
    """The last processor: the rendered line through the one redaction function's Redactor
    (orchestrator_project/redaction.py), built from this environment's secrets."""

    def __init__(self, secrets: Iterable[str]):
        self._redact = Redactor(secrets)

    def __call__(self, logger, method_name: str, line: str) -> str:
        return self._redact(line)


def add_trace_context(logger, method_name: str, event_dict: dict) -> dict:
    """trace_id and span_id of the current OpenTelemetry span, as 32 and 16 hex digits (as
    tracing backends show them); nothing when there is none (tracing off, or outside a span)."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = format(context.trace_id, "032x")
        event_dict["span_id"] = format(context.span_id, "016x")
    return event_dict


def add_access_fields(logger, method_name: str, event_dict: dict) -> dict:
    """A standard library record's arguments are not logged (its message has them already),
    except gunicorn's access line, whose request atoms become fields of an http.request event."""
    atoms = event_dict.pop("positional_args", None)
    if event_dict.get("logger") == "gunicorn.access" and isinstance(atoms, Mapping):
        event_dict.update(
            event="http.request",
            # The names the request's own context uses (orchestrator_project/middleware.py).
            request_method=atoms.get("m"),
            request_path=atoms.get("U"),
            status=_int_or_none(atoms.get("s")),
            duration_ms=round(int(atoms.get("D", 0)) / 1000, 3),
            response_bytes=_int_or_none(atoms.get("B")),
            remote_addr=atoms.get("h"),
            user_agent=atoms.get("a"),
        )
    return event_dict


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _shared_processors() -> list:
    """What both structlog's events and the standard library's records go through first."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_context,
    ]


def standard_fields_first(logger, method_name: str, event_dict: dict) -> dict:
    """timestamp, level, logger and event lead every JSON line, whatever the context adds."""
    first = {key: event_dict.pop(key) for key in ("timestamp", "level", "logger", "event") if key in event_dict}
    return {**first, **event_dict}


def _renderer(log_format: str) -> list:
    if log_format == "json":
        return [
            structlog.processors.format_exc_info,
            standard_fields_first,
            # default=str: a UUID or a datetime as its plain text, not its repr.
            structlog.processors.JSONRenderer(default=str),
        ]
    return [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]


def logging_config(*, log_format: str, level: str, secrets: Iterable[str]) -> dict:
    """settings.LOGGING: every record, structlog's or not, through one ProcessorFormatter on
    stderr. Django's and gunicorn's loggers lose their own handlers and go to it too."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    formatter = {
        "()": structlog.stdlib.ProcessorFormatter,
        "foreign_pre_chain": [*_shared_processors(), add_access_fields],
        "pass_foreign_args": True,
        "processors": [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_renderer(log_format),
            RedactLine(secrets),
        ],
    }
    through_root = {"handlers": [], "propagate": True}
    own_handler = {"handlers": ["console"], "level": "INFO", "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"structured": formatter},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "structured"}},
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            # Django's DEFAULT_LOGGING prints django.* records in plain text itself (when DEBUG).
            "django": {**through_root, "level": "INFO"},
            "django.server": {**through_root, "level": "INFO"},
            "django.db.backends": {"level": "WARNING"},
            # gunicorn's loggers do not propagate; gunicorn.conf.py hands them this config.
            "gunicorn.error": own_handler,
            "gunicorn.access": own_handler,
        },
    }


def configure(config: dict) -> None:
    """Django's LOGGING_CONFIG: apply settings.LOGGING and send structlog's events through it.
    Idempotent; Celery's setup_logging signal calls it again in its workers and Beat."""
    logging.config.dictConfig(config)
    # Python's warnings (Celery's, Django's) become records too, instead of raw lines on stderr.
    logging.captureWarnings(True)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def new_context(**values) -> None:
    """Start a fresh context (a Celery task, a request): what the previous one bound is gone."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**values)


def bind(**values) -> None:
    """Add to the current context: every line logged after it in this task or request has them."""
    structlog.contextvars.bind_contextvars(**values)


def keeps_context(func):
    """What `func` binds stays inside it: a sweep calling it for one session after another must
    not log the next session's lines with the last one's tenant."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        saved = structlog.contextvars.get_contextvars()
        try:
            return func(*args, **kwargs)
        finally:
            new_context(**saved)

    return wrapper


# Celery: its worker, pool processes and Beat log through settings.LOGGING too.


@setup_logging.connect
def _log_like_django(loglevel=None, **kwargs) -> None:
    # With a receiver here, Celery installs none of its own handlers (plain text on the root
    # logger) in the worker, its pool processes and Beat. The command line's --loglevel applies.
    from django.conf import settings

    configure(settings.LOGGING)
    if loglevel:
        logging.getLogger().setLevel(loglevel)


@celeryd_after_setup.connect
def _no_banner_in_json(sender=None, instance=None, **kwargs) -> None:
    # The worker prints its banner straight to stdout; in JSON it is one line of fields instead.
    from django.conf import settings

    if settings.LOG_FORMAT == "json":
        instance.quiet = True
        queues = sorted(instance.app.amqp.queues.consume_from or ())
        log.info("worker.starting", hostname=sender, queues=queues, concurrency=instance.concurrency)


@task_prerun.connect
def _fresh_log_context(task_id=None, task=None, **kwargs) -> None:
    # A pool process runs one task after another: nothing bound by the last may reach the next.
    new_context(message_id=task_id, celery_task=getattr(task, "name", None))
