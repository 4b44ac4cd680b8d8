"""B6 observability cost: B1's zero-work shapes through our system with metrics, JSON logs and
tracing on, against the same with all three off, in the same run (issue 14: at most 5% added
per task).

On: metrics in multiprocess files, each worker group serving them on a port; JSON log lines;
spans recorded for every task and exported over OTLP/HTTP to a sink in this process (the cost of
a real exporter, not of a console printing them). Off: METRICS_ENABLED=false, console logs,
OTEL_SDK_DISABLED=true. Both at log level INFO, as in production (Celery logs every task then).
The modes alternate in blocks, restarting the orchestrator and the agent worker between them.
"""

import socket
import statistics
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench import b1
from bench.ours import run_session
from bench.workers import ORCHESTRATOR, Workers
from tenants.models import Tenant

TARGET_RATIO = 1.05
BLOCKS = 3  # blocks per mode; the repeats are spread over them


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that takes every export and keeps nothing."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def modes(sink_port: int) -> dict[str, tuple[dict, dict]]:
    """Mode -> (the orchestrator's, the agent's) environment."""
    off = {"METRICS_ENABLED": "false", "LOG_FORMAT": "console", "OTEL_SDK_DISABLED": "true"}
    on = {
        "METRICS_ENABLED": "true",
        "LOG_FORMAT": "json",
        "OTEL_SDK_DISABLED": "false",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
    }
    return {
        "off": (off, off),
        "on": ({**on, "METRICS_PORT": str(_free_port())}, {**on, "METRICS_PORT": str(_free_port())}),
    }


def _start(workers: Workers, orchestrator_env: dict, agent_env: dict) -> None:
    workers.orchestrator(loglevel="INFO", env=orchestrator_env)
    workers.agent(b1.AGENT, b1.CONCURRENCY, loglevel="INFO", env=agent_env)


def _stop(workers: Workers) -> None:
    workers.stop(b1.AGENT)
    workers.stop(ORCHESTRATOR)


def run_b6(workers: Workers, tenant: Tenant, repeats: int) -> dict:
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    runs = {mode: {shape: [] for shape in b1.SHAPES} for mode in ("off", "on")}
    per_block = max(1, -(-repeats // BLOCKS))
    workers.stop(ORCHESTRATOR)  # the run's own orchestrator; each mode starts one of its own
    try:
        for block in range(BLOCKS):
            for mode, (orchestrator_env, agent_env) in modes(sink.server_address[1]).items():
                _start(workers, orchestrator_env, agent_env)
                try:
                    for shape, (_, specs, _) in b1.SHAPES.items():
                        run_session(tenant, f"B6 warm-up {mode} {shape}", specs(), timeout_s=b1.RUN_TIMEOUT_S)
                    for rep in range(per_block):
                        for shape, (_, specs, _) in b1.SHAPES.items():
                            title = f"B6 {mode} {shape} #{block * per_block + rep + 1}"
                            run = run_session(tenant, title, specs(), timeout_s=b1.RUN_TIMEOUT_S)
                            runs[mode][shape].append(run.elapsed_s)
                finally:
                    _stop(workers)
    finally:
        sink.shutdown()
        workers.orchestrator()
    return {
        "repeats": per_block * BLOCKS,
        "rows": [
            _row(shape, tasks, runs["off"][shape], runs["on"][shape]) for shape, (tasks, _, _) in b1.SHAPES.items()
        ],
    }


def _row(shape: str, tasks: int, off: list[float], on: list[float]) -> dict:
    off_ms = 1000 * statistics.median(off) / tasks
    on_ms = 1000 * statistics.median(on) / tasks
    ratio = on_ms / off_ms
    return {
        "shape": shape,
        "tasks": tasks,
        "off_ms_per_task": round(off_ms, 2),
        "on_ms_per_task": round(on_ms, 2),
        "ratio": round(ratio, 3),
        "target": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
        "off_runs_s": [round(s, 3) for s in off],
        "on_runs_s": [round(s, 3) for s in on],
    }
