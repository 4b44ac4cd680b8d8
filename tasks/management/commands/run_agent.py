"""`manage.py run_agent`: one agent worker process (docs/ARCHITECTURE.md)."""

import logging
import threading

import structlog
from billiard.process import active_children
from celery.signals import worker_ready
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import close_old_connections

from agents.capabilities import CAPABILITIES
from agents.models import NAME_PATTERN, Agent
from agents.runtime import AgentRuntime, set_current_agent
from orchestrator_project.celery import app
from tasks.fleet import NameTaken, record_heartbeat, register_worker

logger = logging.getLogger(__name__)
log = structlog.get_logger(__name__)


class Command(BaseCommand):
    help = "Run one agent: a Celery worker consuming cap.<capability> queues and agent.<name>."

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True, help="unique agent name (lowercase letters, digits, - and _)")
        parser.add_argument(
            "--capabilities",
            required=True,
            help="comma-separated, e.g. code_generation,testing; an EAP gateway may have none ('') and then "
            "takes only tasks pinned to an external agent",
        )
        parser.add_argument("--executor", required=True, choices=Agent.Executor.values)
        parser.add_argument("--concurrency", type=int, default=1, help="tasks run at once (default 1)")
        parser.add_argument("--duration", type=float, default=0.0, help="scripted: default seconds per task")
        parser.add_argument("--fail-rate", type=float, default=0.0, help="scripted: default failure chance 0..1")
        parser.add_argument("--loglevel", default="INFO")

    def handle(self, *args, name, capabilities, executor, concurrency, duration, fail_rate, loglevel, **options):
        caps = self._parse_capabilities(capabilities, none_allowed=executor == Agent.Executor.EAP)
        if not NAME_PATTERN.match(name):
            raise CommandError(f"--name {name!r}: use lowercase letters, digits, '-' and '_' (at most 100)")
        if not 1 <= concurrency <= 64:
            raise CommandError("--concurrency must be between 1 and 64")
        if duration < 0 or not 0 <= fail_rate <= 1:
            raise CommandError("--duration must be >= 0 and --fail-rate between 0 and 1")
        defaults = {"duration_s": duration, "fail_rate": fail_rate} if executor == Agent.Executor.SCRIPTED else {}
        try:
            agent = register_worker(name=name, capabilities=caps, executor=executor, concurrency=concurrency)
        except NameTaken:
            raise CommandError(f"{name!r} is the name of an external agent (EAP); choose another --name") from None
        set_current_agent(AgentRuntime(agent.pk, agent.name, executor, defaults))
        stop = threading.Event()
        # A beat in progress at shutdown finishes before the agent is marked offline: a beat
        # written after that would show a stopped agent online.
        beating = threading.Lock()

        # Online only once the worker consumes (and receives control commands such as drain).
        @worker_ready.connect(weak=False)
        def go_online(**kwargs) -> None:
            beat(agent)
            start_heartbeat(agent, stop, beating)

        # A log line, not a print: in JSON (LOG_FORMAT) every line of the process is one.
        log.info("agent.starting", agent=name, queues=agent.queues, executor=executor, concurrency=concurrency)
        try:
            app.worker_main(
                [
                    "worker",
                    f"--hostname={agent.worker_name}",  # drain and resume address it by this name
                    f"--queues={','.join(agent.queues)}",
                    f"--concurrency={concurrency}",
                    f"--loglevel={loglevel}",
                ]
            )
        finally:
            stop.set()
            with beating:
                close_old_connections()
                Agent.objects.filter(pk=agent.pk).update(status=Agent.Status.OFFLINE, current_load=0)

    def _parse_capabilities(self, raw: str, none_allowed: bool) -> list[str]:
        caps = [c.strip() for c in raw.split(",") if c.strip()]
        unknown = sorted(set(caps) - set(CAPABILITIES))
        if (not caps and not none_allowed) or unknown:
            raise CommandError(
                f"unknown capabilities: {', '.join(unknown) or '(none given)'}; known: {', '.join(CAPABILITIES)}"
            )
        return sorted(set(caps))


def beat(agent: Agent) -> None:
    """One heartbeat, naming the worker's live pool processes: their tasks' leases are renewed."""
    record_heartbeat(agent, processes=[child.pid for child in active_children()])


def start_heartbeat(agent: Agent, stop: threading.Event, lock: threading.Lock) -> None:
    """Beat from the worker's main process until `stop`, each beat under `lock`; Beat's sweep
    marks silent agents offline."""

    def beating() -> None:
        while not stop.wait(settings.AGENT_HEARTBEAT_SECONDS):
            with lock:
                if stop.is_set():
                    return
                try:
                    close_old_connections()
                    beat(agent)
                except Exception:  # the database may be restarting; try again next beat
                    logger.warning("heartbeat of agent %s failed", agent.name, exc_info=True)

    threading.Thread(target=beating, name=f"heartbeat-{agent.name}", daemon=True).start()
