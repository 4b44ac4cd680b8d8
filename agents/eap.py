"""The External Agent Protocol on the server side (docs/EAP.md): registration and agent tokens,
heartbeats, pull claims, results, and the circuit breaker of each push agent.

External agents are Agent rows with mode push or pull. They consume no queues: an EAP gateway
(an agent worker whose executor is agents.executors.eap) runs each task through the normal
Celery path and hands it to one of them through an EapDelivery row, on which it then waits.
"""

import hashlib
import hmac
import logging
import secrets
from datetime import datetime, timedelta

import pybreaker
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from orchestrator_project import metrics
from orchestrator_project.redaction import redact_data

from .breakers import read_states, redis_circuit_breaker
from .models import Agent, AgentEvent, EapDelivery, latest_finishes, recent_figures

logger = logging.getLogger(__name__)
TOKEN_SCHEME = "eap"  # noqa: S105 - the tag tokens start with, not a secret
# Compared against when no agent has the token's prefix, so that a miss costs the same compare.
_NO_HASH = "0" * 64


class NameTaken(Exception):
    """Another agent (external or a Celery worker) already has this name."""


class NotYourTask(Exception):
    """The task is not running on this external agent (another agent's, finished, cancelled, unknown)."""


class StaleCredentials(Exception):
    """The agent's token was replaced by a rotation meanwhile."""


class PushFailed(Exception):
    """A POST {endpoint}/task that did not reach the agent (transient: worth another try) or that
    it answered with an error (`status`)."""

    def __init__(self, message: str, *, transient: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.transient, self.status = transient, status


def _not_a_push_failure(exc: BaseException) -> bool:
    """Only a POST that did not get through (transient) or a 5xx counts towards opening the
    circuit. A refusal below 500 (400, 401 ...) is the agent up and answering (it fails the task
    instead); anything else (the worker's time limit, a bug) says nothing about the agent."""
    return not (isinstance(exc, PushFailed) and (exc.transient or (exc.status or 0) >= 500))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """X-EAP-Signature of a push body: HMAC-SHA256 of "<timestamp>.<raw body>" keyed by the
    agent's signing secret. The timestamp is signed too, so a captured request cannot be
    replayed later with a fresh one (agents refuse old timestamps)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def new_credentials() -> dict:
    """A fresh token (returned as `token`, stored as its prefix and hash) and signing secret."""
    prefix = secrets.token_hex(6)
    token = f"{TOKEN_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
    return {
        "token": token,
        "token_prefix": prefix,
        "token_hash": hash_token(token),
        "signing_secret": secrets.token_hex(32),
    }


def register_external_agent(*, tenant, name: str, capabilities: list[str], mode: str, endpoint_url: str = "") -> tuple:
    """Create an external agent, online from now on; returns it and its token (shown only now:
    only the token's hash is kept). Raises NameTaken."""
    credentials = new_credentials()
    token = credentials.pop("token")
    try:
        with transaction.atomic():
            agent = Agent.objects.create(
                tenant=tenant,
                name=name,
                capabilities=sorted(set(capabilities)),
                executor=Agent.Executor.EAP,
                mode=mode,
                endpoint_url=endpoint_url,
                **credentials,
                status=Agent.Status.ONLINE,
                last_heartbeat=timezone.now(),
            )
    except IntegrityError:  # a concurrent registration of the same name won
        raise NameTaken(name) from None
    logger.info("external agent %s registered (%s, %s)", name, mode, ", ".join(agent.capabilities))
    return agent, token


def agent_for_token(token: str) -> tuple[Agent, bool] | None:
    """The external agent whose token this is, and whether it is the previous token of a
    rotation (still in its grace), or None. Found by the token's (public) prefix, then the
    hashes compared in constant time."""
    scheme, _, rest = token.partition("_")
    prefix, _, _ = rest.partition("_")
    agent, previous = None, False
    if scheme == TOKEN_SCHEME and prefix:
        in_grace = Q(previous_token_prefix=prefix, previous_credentials_expire_at__gt=timezone.now())
        agent = Agent.objects.exclude(mode=Agent.Mode.WORKER).filter(Q(token_prefix=prefix) | in_grace).first()
        previous = agent is not None and agent.token_prefix != prefix
    expected = (agent.previous_token_hash if previous else agent.token_hash) if agent else _NO_HASH
    matches = hmac.compare_digest(hash_token(token), expected or _NO_HASH)
    return (agent, previous) if agent is not None and matches else None


def rotate_credentials(agent: Agent) -> dict:
    """Give the agent a new token and signing secret (returned: {"token", "signing_secret"},
    shown only now). The ones replaced stay valid for EAP_ROTATION_GRACE_SECONDS, so that every
    replica of the agent can take up the new ones; a rotation's own previous credentials, if
    still in grace, end now. Audited as an AgentEvent."""
    credentials = new_credentials()
    token = credentials.pop("token")
    now = timezone.now()
    grace = settings.EAP_ROTATION_GRACE_SECONDS
    with transaction.atomic():
        current = Agent.objects.select_for_update().get(pk=agent.pk)
        if current.token_hash != agent.token_hash:  # another rotation came first: this token is old now
            raise StaleCredentials("this token was replaced by a rotation: rotate with the current token")
        previous = {
            "previous_token_prefix": current.token_prefix if grace else "",
            "previous_token_hash": current.token_hash if grace else "",
            "previous_signing_secret": current.signing_secret if grace else "",
            "previous_credentials_expire_at": now + timedelta(seconds=grace) if grace else None,
        }
        Agent.objects.filter(pk=agent.pk).update(**credentials, **previous)
        _audit(current, AgentEvent.Action.ROTATE, actor=f"agent:{current.name}", reason=f"grace {grace}s")
    logger.info("external agent %s rotated its credentials (grace %ss)", agent.name, grace)
    return {"token": token, "signing_secret": credentials["signing_secret"]}


def revoke_credentials(agent: Agent, *, actor: str, reason: str = "") -> None:
    """Refuse the agent's token and signing secret, current and previous, from now on: they are
    cleared, and the agent goes offline, so no task is routed to it. Audited as an AgentEvent."""
    cleared = {
        "token_prefix": "",
        "token_hash": "",
        "signing_secret": "",
        "previous_token_prefix": "",
        "previous_token_hash": "",
        "previous_signing_secret": "",
        "previous_credentials_expire_at": None,
    }
    with transaction.atomic():
        current = Agent.objects.select_for_update().get(pk=agent.pk)
        Agent.objects.filter(pk=agent.pk).update(
            **cleared, credentials_revoked_at=timezone.now(), status=Agent.Status.OFFLINE
        )
        _audit(current, AgentEvent.Action.REVOKE, actor=actor, reason=reason, to_status=Agent.Status.OFFLINE)
    logger.info("external agent %s: credentials revoked by %s", agent.name, actor)


def _audit(agent: Agent, action: str, *, actor: str, reason: str = "", to_status: str | None = None) -> None:
    AgentEvent.objects.create(
        agent_id=agent.pk,
        agent_name=agent.name,
        action=action,
        actor=actor[:100],
        reason=reason[:500],
        from_status=agent.status,
        to_status=to_status or agent.status,
    )


def record_heartbeat(agent: Agent, *, status: str, current_load: int) -> None:
    """The agent says it is alive, how loaded it is, and whether it drains. Draining sticks (an
    operator resumes it, as for our workers); a push agent whose circuit is not closed stays
    degraded whatever it says. Its counters and EWMA come from its recent deliveries."""
    if status == Agent.Status.DRAINING:
        reported = Agent.Status.DRAINING
    elif agent.mode == Agent.Mode.PUSH and circuit_state(agent) != pybreaker.STATE_CLOSED:
        reported = Agent.Status.DEGRADED
    else:
        reported = status
    done = EapDelivery.objects.filter(agent_id=agent.pk, state=EapDelivery.State.DONE)
    figures = recent_figures(
        (error == "", error != "", claimed, finished)
        for error, claimed, finished in latest_finishes(done, "error", "claimed_at", "finished_at")
    )
    # One statement, so that an operator's drain in between is not overwritten.
    Agent.objects.filter(pk=agent.pk).update(
        last_heartbeat=timezone.now(),
        status=Case(When(status=Agent.Status.DRAINING, then=Value(Agent.Status.DRAINING)), default=Value(reported)),
        current_load=current_load,
        **figures,
    )
    metrics.HEARTBEATS.labels(agent.name).inc()


def _live_external_agents():
    """External agents that beat recently and take new work."""
    silent_since = timezone.now() - timedelta(seconds=settings.AGENT_OFFLINE_AFTER_SECONDS)
    return (
        Agent.objects.exclude(mode=Agent.Mode.WORKER)
        .exclude(status__in=(Agent.Status.OFFLINE, Agent.Status.DRAINING))
        .filter(last_heartbeat__gte=silent_since, credentials_revoked_at__isnull=True)
    )


def live_external_agents(capability: str, session_id):
    """Those of them with the capability that serve the session's tenant."""
    return _live_external_agents().filter(tenant__sessions=session_id, capabilities__contains=[capability])


def external_capabilities() -> set[str]:
    """The capabilities some live external agent can take a task of now (a pull agent, or a push
    agent whose circuit lets a call through): what an EAP gateway can really serve."""
    agents = _live_external_agents()
    return {c for a in agents if a.mode == Agent.Mode.PULL or circuit_allows_call(a) for c in a.capabilities}


def claim_next_delivery(agent: Agent) -> EapDelivery | None:
    """GET tasks/next: the oldest offered delivery of a task with one of the agent's capabilities,
    now claimed by it; None if there is none (or the agent drains). Offers of an attempt that
    has moved on (the gateway died and the task was taken back) are passed over. Rows another
    claim holds are skipped, so concurrent agents never take the same delivery."""
    if agent.status == Agent.Status.DRAINING:
        return None
    with transaction.atomic():
        offered = (
            EapDelivery.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("task")
            .filter(
                state=EapDelivery.State.OFFERED,
                task__capability__in=agent.capabilities,
                task__session__tenant_id=agent.tenant_id,  # never another tenant's task
                task__status="running",
                task__attempts=F("attempt"),
            )
            .filter(Q(agent__isnull=True) | Q(agent=agent))  # an offer pinned to one agent is its alone
            .order_by("created_at")
        )
        delivery = offered.first()
        if delivery is None:
            return None
        delivery.state, delivery.agent, delivery.claimed_at = EapDelivery.State.CLAIMED, agent, timezone.now()
        delivery.save(update_fields=["state", "agent", "claimed_at"])
    logger.info("task %s attempt %s claimed by external agent %s", delivery.task_id, delivery.attempt, agent.name)
    return delivery


def report_result(agent: Agent, *, task_id, result: dict) -> EapDelivery:
    """POST tasks/{id}/result: store the agent's (validated) result on its claimed delivery of
    the task's current attempt; the gateway waiting on it records the task. Raises NotYourTask
    (and changes nothing) for another agent's task, a delivery no longer claimed, or an attempt
    the task has moved on from."""
    not_yours = f"task {task_id} is not a running task of agent {agent.name}"
    with transaction.atomic():
        delivery = (
            EapDelivery.objects.select_for_update(of=("self",))
            .select_related("task")
            .filter(task_id=task_id, agent=agent)
            .order_by("-attempt")
            .first()
        )
        if delivery is None:
            raise NotYourTask(not_yours)
        if delivery.state != EapDelivery.State.CLAIMED:
            why = f": its delivery is {delivery.state}" + (f" ({delivery.error})" if delivery.error else "")
            raise NotYourTask(not_yours + why)
        task = delivery.task
        if task.status != "running" or task.attempts != delivery.attempt:
            raise NotYourTask(f"{not_yours}: it is {task.status} (attempt {task.attempts})")
        result = redact_data(result)  # the agent's output, stored redacted (docs/DATA.md)
        delivery.state, delivery.result, delivery.finished_at = EapDelivery.State.DONE, result, timezone.now()
        delivery.error = _failure_of(agent, result)
        delivery.save(update_fields=["state", "result", "error", "finished_at"])
    logger.info("external agent %s reported task %s %s", agent.name, task_id, result["status"])
    return delivery


def finish_delivery(delivery_id: int, agent: Agent, result: dict) -> None:
    """claimed -> done with a result the agent answered a push with (inline); nothing if the
    delivery was given up meanwhile (the wait then reads why)."""
    claimed = EapDelivery.objects.filter(pk=delivery_id, state=EapDelivery.State.CLAIMED)
    result = redact_data(result)  # the agent's output, stored redacted (docs/DATA.md)
    claimed.update(
        state=EapDelivery.State.DONE, result=result, error=_failure_of(agent, result), finished_at=timezone.now()
    )


def _failure_of(agent: Agent, result: dict) -> str:
    """The delivery's error: empty for a completed result, never empty for a failed one."""
    if result["status"] != "failed":
        return ""
    return (result.get("error") or f"agent {agent.name} reported a failure without saying why")[:5000]


# The circuit breaker of each push agent. Its state lives in Redis, so that every gateway
# process (and the API, for heartbeats) sees the same circuit; each process keeps its own
# CircuitBreaker object over it.
_breakers: dict[tuple, tuple[pybreaker.CircuitBreaker, pybreaker.CircuitRedisStorage]] = {}


class _AgentStatusFollowsCircuit(pybreaker.CircuitBreakerListener):
    """Open: the agent is degraded (it gets no work); closed again: online. Whichever process
    first notices a change writes it; the updates are idempotent."""

    def __init__(self, agent_id: int, name: str) -> None:
        self.agent_id, self.name = agent_id, name

    def state_change(self, cb, old_state, new_state) -> None:
        agent = Agent.objects.filter(pk=self.agent_id)
        if new_state.name == pybreaker.STATE_OPEN:
            if agent.filter(status__in=(Agent.Status.ONLINE, Agent.Status.BUSY)).update(status=Agent.Status.DEGRADED):
                logger.warning("circuit of external agent %s opened: degraded", self.name)
        elif new_state.name == pybreaker.STATE_CLOSED and old_state is not None:
            recovered = agent.filter(status=Agent.Status.DEGRADED).update(status=Agent.Status.ONLINE)
            if recovered:
                logger.info("circuit of external agent %s closed: online again", self.name)


def breaker_for(agent: Agent) -> pybreaker.CircuitBreaker:
    """The agent's circuit breaker in this process: every failed POST counts (transient failures
    and 5xx), an answer resets the count."""
    return _breaker_and_storage(agent)[0]


def _breaker_and_storage(agent: Agent) -> tuple:
    key = (agent.pk, settings.EAP_BREAKER_FAIL_MAX, settings.EAP_BREAKER_RESET_SECONDS)
    if key not in _breakers:
        _breakers[key] = redis_circuit_breaker(
            _circuit_namespace(agent),
            name=f"eap:{agent.name}",
            fail_max=settings.EAP_BREAKER_FAIL_MAX,
            reset_timeout=settings.EAP_BREAKER_RESET_SECONDS,
            exclude=[_not_a_push_failure],
            listeners=[_AgentStatusFollowsCircuit(agent.pk, agent.name)],
        )
    return _breakers[key]


def _circuit_namespace(agent: Agent) -> str:
    return f"eap:circuit:{agent.pk}"


def circuit_states(agents) -> dict[int, str | None]:
    """{agent id: its circuit's state} for the push agents among `agents` (the others have no
    circuit), in one Redis round trip; None where Redis did not answer. For pages that show many."""
    push = [agent for agent in agents if agent.mode == Agent.Mode.PUSH]
    states = read_states([_circuit_namespace(agent) for agent in push])
    return {agent.pk: state for agent, state in zip(push, states, strict=True)}


def circuit_state(agent: Agent) -> str:
    """closed, open or half-open, as every process sees it."""
    return _breaker_and_storage(agent)[1].state


def circuit_allows_call(agent: Agent) -> bool:
    """Closed; half-open (a trial call is under way, and one whose caller died must not keep the
    circuit half-open for good); or open for longer than the reset time (the next call is the trial)."""
    _, storage = _breaker_and_storage(agent)
    if storage.state != pybreaker.STATE_OPEN:
        return True
    opened_at: datetime | None = storage.opened_at
    return opened_at is None or timezone.now() >= opened_at + timedelta(seconds=settings.EAP_BREAKER_RESET_SECONDS)
