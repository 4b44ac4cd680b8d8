"""OpenTelemetry traces (docs/TRACING.md): the exporter follows the settings, setup happens once per
process, and a session started through the API is one trace across the real worker processes.

The worker processes export over OTLP/HTTP to a receiver this test runs on 127.0.0.1 (they cannot
share an in-memory exporter with the test); the API runs in the test process, traced into memory.
"""

import gzip
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from orchestrator_project import telemetry
from tasks.messages import task_of_message
from tasks.models import Task

from .conftest import ALL_BUILD, ROOT, create_and_start, dag_payload, member_client, wait_for_status, wait_until
from .test_eap_e2e import CAPABILITIES as EAP_CAPABILITIES
from .test_eap_e2e import start_reference


def in_a_fresh_process(script: str, **env: str) -> tuple[object, str]:
    """Run `script` after Django's setup in a fresh interpreter with no OTEL_* variable but `env`;
    the JSON of its last line of output, and all its output."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "DJANGO_SETTINGS_MODULE"}
    prelude = "import django, json; django.setup(); from django.conf import settings\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + script],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "orchestrator_project.settings", "DEBUG": "true", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout


def exporter_setting(**env: str) -> str:
    return in_a_fresh_process("print(json.dumps(settings.OTEL_TRACES_EXPORTER))", **env)[0]


def test_no_exporter_by_default_even_in_development():
    assert exporter_setting() == "none"


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
def test_otlp_once_an_endpoint_is_set(variable):
    assert exporter_setting(**{variable: "http://collector:4318"}) == "otlp"


def test_an_explicit_exporter_wins_over_the_endpoint():
    chosen = exporter_setting(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318", OTEL_TRACES_EXPORTER="console")
    assert chosen == "console"


def test_an_unknown_exporter_stops_the_process_naming_the_variable():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "-c", "import orchestrator_project.settings"],
        cwd=ROOT,
        env={**clean, "DEBUG": "true", "OTEL_TRACES_EXPORTER": "jaeger"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "OTEL_TRACES_EXPORTER must be none, console or otlp" in result.stderr


def test_the_exporter_is_the_one_the_setting_names(monkeypatch):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    assert telemetry.span_exporter("none") is None
    assert isinstance(telemetry.span_exporter("console"), ConsoleSpanExporter)
    assert isinstance(telemetry.span_exporter("otlp"), OTLPSpanExporter)


SETUP_TWICE = """
from celery.signals import before_task_publish, task_prerun
from opentelemetry import trace
from orchestrator_project import telemetry
telemetry.setup("web")
telemetry.setup("web")
with trace.get_tracer("t").start_as_current_span("probe") as span:
    context = span.get_span_context()
    recording = span.is_recording()
telemetry.shutdown()
print(json.dumps({
    "middleware": sum("opentelemetry" in m for m in settings.MIDDLEWARE),
    "publish_receivers": sum("opentelemetry" in repr(r) for r in before_task_publish.receivers),
    "prerun_receivers": sum("opentelemetry" in repr(r) for r in task_prerun.receivers),
    "psycopg_wrapped": hasattr(__import__("psycopg").connect, "__wrapped__"),
    "trace_id_valid": context.is_valid,
    "recording": recording,
}))
"""


def test_setup_twice_instruments_once_and_without_an_exporter_records_nothing():
    state, _ = in_a_fresh_process(SETUP_TWICE)

    assert state["middleware"] == 1
    assert state["publish_receivers"] == 1
    assert state["prerun_receivers"] == 1
    # The context still propagates (a trace id for the logs), but nothing is recorded, and
    # queries are not traced at all (their spans would cost without being seen).
    assert state["trace_id_valid"] and not state["recording"]
    assert not state["psycopg_wrapped"]


def test_the_console_exporter_records_and_prints_the_spans():
    state, output = in_a_fresh_process(SETUP_TWICE, OTEL_TRACES_EXPORTER="console")

    assert state["recording"] and state["middleware"] == 1 and state["psycopg_wrapped"]
    assert '"name": "probe"' in output  # shutdown() exported what was batched


def test_a_disabled_sdk_instruments_nothing():
    state, _ = in_a_fresh_process(SETUP_TWICE, OTEL_SDK_DISABLED="true")

    assert (state["middleware"], state["publish_receivers"], state["psycopg_wrapped"]) == (0, 0, False)
    assert not state["trace_id_valid"]


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    service: str
    attributes: dict


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: what a collector would get from the workers."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, request: ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    received.append(
                        ReceivedSpan(
                            span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                            span.kind, resource.get("service.name", ""), attributes,
                        )
                    )  # fmt: skip
        with self.lock:
            self.spans += received

    def received(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)


CLIENT = 3  # SPAN_KIND_CLIENT in OTLP


def _url(span: ReceivedSpan) -> str:
    return span.attributes.get("url.full") or span.attributes.get("http.url") or ""


def _value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def receiver():
    running = OtlpReceiver()
    yield running
    running.server.shutdown()
    running.server.server_close()


@pytest.fixture
def traced_stack(receiver, monkeypatch, request):
    """The worker processes, exporting to the receiver (Stack passes the environment on); their
    batches leave every 100 ms rather than every 5 s."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("EAP_POLL_INTERVAL_SECONDS", "0.1")
    return request.getfixturevalue("stack")


@pytest.fixture
def api_spans(transactional_db):
    """The API in this process, instrumented as a web process is, into memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.instrument(provider)
    yield exporter
    telemetry.uninstrument()


@pytest.mark.e2e
def test_a_session_started_through_the_api_is_one_trace_across_the_workers(
    receiver, traced_stack, live_server, api_spans
):
    stack = traced_stack
    # design and the code tasks on a scripted agent; review and docs on an external agent the
    # EAP gateway pushes them to over HTTP (tests: a scripted agent of its own).
    stack.agent("builder", ALL_BUILD)
    stack.agent("tester", ["test_generation"])
    stack.agent("eap-gateway", EAP_CAPABILITIES, executor="eap", concurrency=2)
    start_reference(stack, live_server.url, name="ref-push", mode="push")
    client = member_client("acme", "alice")

    session_id = create_and_start(client, dag_payload())
    assert wait_for_status(client, session_id, {"completed", "failed", "partially_completed"})["status"] == "completed"

    start = [s for s in api_spans.get_finished_spans() if s.kind == SpanKind.SERVER and "start" in s.name]
    assert len(start) == 1, [s.name for s in api_spans.get_finished_spans()]
    assert start[0].attributes["http.method"] == "POST"
    trace_id = format(start[0].context.trace_id, "032x")
    tasks = {t.pk: t for t in Task.objects.filter(session_id=session_id)}

    def whole_trace() -> list[ReceivedSpan] | None:
        spans = [s for s in receiver.received() if s.trace_id == trace_id]
        names = [s.name for s in spans]
        ran = {task_of_message(s.attributes["messaging.message.id"]) for s in spans if s.name == "run/tasks.run_task"}
        done = "run/tasks.finalize_session" in names and "run/tasks.dispatch_session" in names
        return spans if done and ran == set(tasks) else None

    spans = wait_until(
        whole_trace,
        timeout=30,
        what=lambda: f"the whole trace; received {sorted({s.name for s in receiver.received()})}",
    )
    by_id = {s.span_id: s for s in spans}
    runs = [s for s in spans if s.name == "run/tasks.run_task"]
    assert len(runs) == len(tasks) == 6, [(s.attributes["messaging.message.id"], s.service) for s in runs]
    # Everything the workers exported (Celery, queries, Redis, HTTP) is this one trace: no task,
    # publish or query started a trace of its own.
    assert {s.trace_id for s in receiver.received()} == {trace_id}
    assert {s.service for s in spans} == {"orchestrator-worker"}
    dispatch = next(s for s in spans if s.name == "run/tasks.dispatch_session")
    # dispatch_session was published by the API request (after its commit), inside its span.
    published = [s for s in api_spans.get_finished_spans() if format(s.context.span_id, "016x") == dispatch.parent_id]
    assert [s.name for s in published] == ["apply_async/tasks.dispatch_session"]
    assert published[0].parent.span_id == start[0].context.span_id
    # Each run_task hangs off the publish that sent it, in whichever worker that happened.
    assert {by_id[s.parent_id].name for s in runs} == {"apply_async/tasks.run_task"}
    # The gateway's POSTs to the external agent are children of the run_task of their task.
    posts = [s for s in spans if s.kind == CLIENT and _url(s).endswith("/task")]
    assert len(posts) == 2, sorted({s.name for s in spans})
    for post in posts:
        assert by_id[post.parent_id].name == "run/tasks.run_task"
    keys = {tasks[task_of_message(by_id[p.parent_id].attributes["messaging.message.id"])].key for p in posts}
    assert keys == {"review", "docs"}
