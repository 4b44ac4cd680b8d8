"""OpenTelemetry tracing (docs/TRACING.md): one trace runs from the API call that starts a session
through dispatch_session, every run_task and the agents' HTTP calls to finalize_session.

`setup(service)` runs once in every process that does the work, after any fork: gunicorn's
workers (post_fork), each Celery pool process (worker_process_init), a Celery worker whose pool
does not fork, Beat, and the web outside gunicorn (wsgi.py). A process that is about to fork
(gunicorn's master, a Celery worker's main process) never sets up: BatchSpanProcessor's thread
and the exporter's connections would not survive the fork.

Django, Celery and httpx are instrumented whatever the exporter: the trace context travels in
the requests, in Celery's message headers and in outgoing HTTP headers, so a trace id exists for
the logs to carry. Without an exporter (the default) nothing is recorded: every span is a
non-recording one (sampler always_off), and psycopg and Redis are left alone: a span per query
and per command costs tens of microseconds even unrecorded, a dozen of each per task
(docs/TRACING.md, "Cost").
"""

import os
import threading

from celery.signals import beat_embedded_init, beat_init, worker_init, worker_process_init, worker_process_shutdown
from django.conf import settings

SERVICE_PREFIX = "orchestrator-"
# Probes and scrapes would otherwise open a trace each, every few seconds.
DEFAULT_EXCLUDED_URLS = "/health/,/metrics"

_lock = threading.Lock()
_set_up = False
_provider = None


def setup(service: str) -> None:
    """Set up tracing for this process (its service name is orchestrator-<service>); only the
    first call in a process does anything."""
    global _set_up, _provider
    with _lock:
        if _set_up:
            return
        _set_up = True
        if settings.OTEL_SDK_DISABLED:
            return
        from opentelemetry import trace

        exporter = span_exporter(settings.OTEL_TRACES_EXPORTER)
        _provider = tracer_provider(service, exporter)
        trace.set_tracer_provider(_provider)
        instrument(_provider, storage=exporter is not None)


def tracer_provider(service: str, exporter):
    """A tracer provider that sends its spans to `exporter` in batches; with no exporter, one
    that records nothing (trace context still propagates)."""
    # The SDK and the instrumentations are imported here, not at the top: they take most of a
    # second to import, and every process imports this module, manage.py's shortest commands too.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    # OTEL_SERVICE_NAME, when set, names every process alike; by default each kind has its own.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: SERVICE_PREFIX + service}
    # With an exporter, the sampler is the SDK's: OTEL_TRACES_SAMPLER (parentbased_always_on by default).
    provider = TracerProvider(resource=Resource.create(attributes), sampler=None if exporter else ALWAYS_OFF)
    if exporter is not None:
        # Batched: a span's export never runs on the task's own time (OTEL_BSP_* tune the batches).
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def span_exporter(kind: str):
    """The exporter OTEL_TRACES_EXPORTER names: None for none, console, or OTLP over HTTP (which
    reads its endpoint, headers and timeout from OTEL_EXPORTER_OTLP_*)."""
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ValueError(f"unknown span exporter {kind!r}")


def _instrumentors() -> list[tuple]:
    """Each instrumentor (a singleton that refuses to instrument twice), its options, and whether
    it traces storage (queries, commands) rather than the hops between processes."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    excluded = None if os.environ.get("OTEL_PYTHON_DJANGO_EXCLUDED_URLS") else DEFAULT_EXCLUDED_URLS
    return [
        (DjangoInstrumentor(), {"excluded_urls": excluded}, False),
        (CeleryInstrumentor(), {}, False),
        (HTTPXClientInstrumentor(), {}, False),
        (PsycopgInstrumentor(), {}, True),
        (RedisInstrumentor(), {}, True),
    ]


def instrument(provider, *, storage: bool = True) -> None:
    """Trace Django's requests, Celery's publishes and runs (the context goes in the message
    headers) and httpx requests into `provider`; with `storage`, psycopg's queries and Redis
    commands too."""
    for instrumentor, options, traces_storage in _instrumentors():
        if (storage or not traces_storage) and not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider, **options)


def uninstrument() -> None:
    """Undo instrument(), for a test that traces a part of the process's life."""
    for instrumentor, _, _ in _instrumentors():
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


def shutdown() -> None:
    """Export what is still batched; for processes that end without running atexit handlers
    (Celery's pool processes leave with os._exit)."""
    if _provider is not None:
        _provider.shutdown()


# Celery: after the fork in each pool process (the exporter's thread and connections would not
# survive one), in a worker whose pool does not fork, and in Beat.


@worker_process_init.connect
def _set_up_pool_process(**kwargs) -> None:
    setup("worker")


@worker_init.connect
def _set_up_worker_without_fork(sender=None, **kwargs) -> None:
    # A pool that does not fork runs the tasks in this very process and sends no
    # worker_process_init (solo sends one). Prefork, the default, sets up in each pool process.
    pool = getattr(sender, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if name.split(":")[0].rsplit(".", 1)[-1] in ("threads", "thread", "gevent", "eventlet"):
        setup("worker")


@beat_init.connect
@beat_embedded_init.connect
def _set_up_beat(**kwargs) -> None:
    setup("beat")


@worker_process_shutdown.connect
def _pool_process_exits(**kwargs) -> None:
    shutdown()  # a pool process leaves with os._exit, past the SDK's atexit flush
