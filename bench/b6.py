"""B6 observability cost: B1's zero-work shapes through our system with metrics, JSON logs and
tracing on, against the same with all three off, in the same run (issue 14: at most 5% added
per task, with the tracing SDK on and no exporter).

off: METRICS_ENABLED=false, console logs, OTEL_SDK_DISABLED=true.
on: metrics in multiprocess files, each worker group serving them on a port; JSON log lines;
    the tracing SDK on with no exporter (the trace context travels, the logs carry trace ids).
exported: as on, and every task's spans (psycopg and Redis too) recorded and exported over
    OTLP/HTTP to a sink in this process: what tracing every session costs; sampling
    (OTEL_TRACES_SAMPLER) cuts it.
All at log level INFO, as in production (Celery logs every task then). The modes alternate in
blocks, restarting the orchestrator and the agent worker between them.
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


MODES = ("off", "on", "exported")


def modes(sink_port: int) -> dict[str, tuple[dict, dict]]:
    """Mode -> (the orchestrator's, the agent's) environment."""
    off = {"METRICS_ENABLED": "false", "LOG_FORMAT": "console", "OTEL_SDK_DISABLED": "true"}
    on = {"METRICS_ENABLED": "true", "LOG_FORMAT": "json", "OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "none"}
    exported = {**on, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}"}

    def served(env: dict) -> tuple[dict, dict]:
        return {**env, "METRICS_PORT": str(_free_port())}, {**env, "METRICS_PORT": str(_free_port())}

    return {"off": (off, off), "on": served(on), "exported": served(exported)}


def _start(workers: Workers, orchestrator_env: dict, agent_env: dict) -> None:
    workers.orchestrator(loglevel="INFO", env=orchestrator_env)
    workers.agent(b1.AGENT, b1.CONCURRENCY, loglevel="INFO", env=agent_env)


def _stop(workers: Workers) -> None:
    workers.stop(b1.AGENT)
    workers.stop(ORCHESTRATOR)


def run_b6(workers: Workers, tenant: Tenant, repeats: int) -> dict:
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    runs = {mode: {shape: [] for shape in b1.SHAPES} for mode in MODES}
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
        "rows": [_row(shape, tasks, runs) for shape, (tasks, _, _) in b1.SHAPES.items()],
    }


def _row(shape: str, tasks: int, runs: dict) -> dict:
    ms = {mode: 1000 * statistics.median(runs[mode][shape]) / tasks for mode in MODES}
    ratio = ms["on"] / ms["off"]
    return {
        "shape": shape,
        "tasks": tasks,
        **{f"{mode}_ms_per_task": round(ms[mode], 2) for mode in MODES},
        "ratio": round(ratio, 3),
        "exported_ratio": round(ms["exported"] / ms["off"], 3),
        "target": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
        **{f"{mode}_runs_s": [round(s, 3) for s in runs[mode][shape]] for mode in MODES},
    }
