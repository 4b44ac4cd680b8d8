"""The eap executor: an EAP gateway worker hands each task to a live external agent and waits for
its result (docs/EAP.md).

The task runs through the normal Celery path on the gateway (claim, lease, retries, deadline,
cancel); only the work happens elsewhere. Push: the best live push agent whose circuit lets a
call through gets a signed POST {endpoint}/task and answers 202 (the result comes later through
the result endpoint) or 200 with the result inline. Pull: with no push agent to take it, the
task is offered and the first pull agent to GET tasks/next claims it. Either way the gateway
then waits on the EapDelivery row until the result comes, the task is aborted, its deadline
passes or the agent goes silent.
"""

import json
import logging
import time
from contextlib import suppress
from datetime import timedelta

import httpx
import pybreaker
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import InterfaceError, OperationalError, close_old_connections, connection
from django.utils import timezone
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from agents import eap, endpoints
from agents.eap_serializers import ResultSerializer, TaskOfferSerializer, offer_of
from agents.models import Agent, EapDelivery
from orchestrator_project.validation import flatten_errors

from . import TaskAborted, TaskContext, TaskFailed, TransientError

logger = logging.getLogger(__name__)
State = EapDelivery.State
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
# The most of a push reply that is read; a larger one fails the task.
REPLY_LIMIT = 1_048_576


class EapExecutor:
    kind = "eap"

    def execute(self, ctx: TaskContext) -> dict:
        deadline = time.monotonic() + ctx.timeout_s
        try:
            delivery = self._resume(ctx) or self._deliver(ctx)
            return self._wait(ctx, delivery.pk, deadline)
        except (TaskFailed, TaskAborted, TransientError):
            raise
        except SoftTimeLimitExceeded:
            # Celery's soft limit for a task with its own deadline is that deadline, counted
            # from a moment before this call: it usually fires just before our own check. It
            # may interrupt a poll's query, leaving the connection mid-command ("another command
            # is already in progress"): the deadline's own queries go on a fresh one.
            connection.close()
            return _at_deadline(ctx)
        except BaseException:
            # A shutdown, the database gone: the agent's result would have nobody to read it.
            with suppress(Exception):
                this_attempt = EapDelivery.objects.filter(task_id=ctx.task_id, attempt=ctx.attempt)
                _cancel_open(this_attempt, "the gateway stopped waiting for the result")
            raise

    def _resume(self, ctx: TaskContext) -> EapDelivery | None:
        """This attempt's delivery, if this process made it already and lost track of the run
        (tasks.running re-runs such a claim under the same attempt): wait on it again."""
        delivery = EapDelivery.objects.filter(task_id=ctx.task_id, attempt=ctx.attempt).first()
        if delivery is not None and delivery.state == State.CANCELLED:
            raise TransientError(f"the delivery of attempt {ctx.attempt} was cancelled: {delivery.error}")
        return delivery

    def _deliver(self, ctx: TaskContext) -> EapDelivery:
        candidates = list(eap.live_external_agents(ctx.capability, ctx.session_id))
        if ctx.pinned_agent:
            candidates = [a for a in candidates if a.name == ctx.pinned_agent]
            if not candidates:
                raise TransientError(f"external agent {ctx.pinned_agent}, which the task is pinned to, is not live")
        if not candidates:
            raise TransientError(f"no live external agent of the session's tenant has capability {ctx.capability}")
        # An earlier attempt's delivery (its gateway died) must not take a result any more.
        earlier = EapDelivery.objects.filter(task_id=ctx.task_id, attempt__lt=ctx.attempt)
        _cancel_open(earlier, f"superseded by attempt {ctx.attempt}")
        deadline_at = timezone.now() + timedelta(seconds=ctx.timeout_s)
        push = [a for a in candidates if a.mode == Agent.Mode.PUSH and eap.circuit_allows_call(a)]
        if push:
            return self._push(ctx, max(push, key=lambda agent: agent.score), deadline_at)
        if pulling := [a for a in candidates if a.mode == Agent.Mode.PULL]:
            # Offered to any pull agent of the tenant with the capability, or only to the pinned one.
            only = pulling[0] if ctx.pinned_agent else None
            offer = {"task_id": ctx.task_id, "attempt": ctx.attempt, "deadline": deadline_at, "agent": only}
            return EapDelivery.objects.create(**offer)
        names = ", ".join(sorted(a.name for a in candidates))
        raise TransientError(f"no external agent can take {ctx.capability} now: the circuit of {names} is open")

    def _push(self, ctx: TaskContext, agent: Agent, deadline_at) -> EapDelivery:
        """POST the task to the agent; returns its delivery, done if it answered with the result."""
        delivery = EapDelivery.objects.create(
            task_id=ctx.task_id,
            attempt=ctx.attempt,
            agent=agent,
            state=State.CLAIMED,
            claimed_at=timezone.now(),
            deadline=deadline_at,
        )
        body = json.dumps(TaskOfferSerializer(offer_of(delivery)).data, cls=DjangoJSONEncoder).encode()
        who = f"external agent {agent.name}"
        try:
            status, content = _post_with_retries(agent, body)
        except pybreaker.CircuitBreakerError as exc:
            # Raised instead of the failure that opened the circuit, which is its context.
            last = f" (last failure: {exc.__context__})" if exc.__context__ else ""
            why = f"{who} is unreachable: its circuit is open{last}"
            if not _cancel(delivery.pk, why):
                return delivery  # a push that timed out got through: its result came meanwhile
            raise TransientError(why) from exc
        except eap.PushFailed as exc:
            why = f"{who} did not take the task: {exc}"
            if not _cancel(delivery.pk, why):
                return delivery  # as above: _wait reads the reported result
            raise (TransientError if exc.transient else TaskFailed)(why) from exc
        if status == 202:
            return delivery
        if status != 200:
            why = f"{who} answered HTTP {status}; expected 200 with a result, or 202"
            _cancel(delivery.pk, why)
            raise TaskFailed(why)
        try:
            result = parse_result(content)
        except ValueError as exc:
            why = f"{who} replied with {exc}"
            _cancel(delivery.pk, why)
            raise TaskFailed(why) from exc
        eap.finish_delivery(delivery.pk, agent, result)
        return delivery

    def _wait(self, ctx: TaskContext, delivery_id: int, deadline: float) -> dict:
        """Poll the delivery until it is done, or give it up: abort, deadline, the agent went
        silent, no pull agent left to claim it. Giving up is a compare-and-set (open ->
        cancelled); losing it means the result just came, which the next read returns."""
        while True:
            delivery = _read_delivery(delivery_id)
            if delivery is None:  # the database is restarting: look again until the deadline
                if time.monotonic() >= deadline:
                    raise TaskFailed(f"the database was unavailable at the deadline ({ctx.timeout_s:g}s)")
                time.sleep(settings.EAP_POLL_INTERVAL_SECONDS)
                continue
            if delivery.state == State.DONE:
                return _outcome(delivery)
            if delivery.state == State.CANCELLED:
                raise TransientError(f"the delivery of attempt {ctx.attempt} was cancelled: {delivery.error}")
            agent = delivery.agent
            who = f"external agent {agent.name}" if agent else "no external agent"
            if ctx.should_abort():
                if _cancel(delivery_id, "the task was aborted"):
                    raise TaskAborted(f"{ctx.key} aborted while {who} ran it")
            elif time.monotonic() >= deadline:
                return _at_deadline(ctx)
            elif delivery.state == State.CLAIMED and (agent is None or not agent.is_live):
                silent = settings.AGENT_OFFLINE_AFTER_SECONDS
                why = f"{who} went silent (no heartbeat for {silent}s) while running the task"
                if agent is None:
                    why = "the external agent running the task was deleted"
                if _cancel(delivery_id, why):
                    raise TransientError(why)
            elif delivery.state == State.OFFERED and not _pull_agent_for(ctx):
                why = f"no live pull agent with capability {ctx.capability} is left to claim the task"
                if _cancel(delivery_id, why):
                    raise TransientError(why)
            else:
                time.sleep(settings.EAP_POLL_INTERVAL_SECONDS)


def parse_result(content: bytes) -> dict:
    """A result reply ({"status", "output", "artifacts"?, "error"?}) as the result endpoint
    validates it; ValueError saying what is wrong otherwise."""
    try:
        data = json.loads(content, parse_constant=_no_constants)
    except ValueError:
        raise ValueError(f"malformed JSON: {content[:120]!r}") from None
    serializer = ResultSerializer(data=data)
    if not serializer.is_valid():
        path, messages = next(iter(flatten_errors(serializer.errors).items()))
        raise ValueError(f"an invalid result: {path}: {messages[0]}")
    return serializer.validated_data


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json takes NaN and Infinity; jsonb does not


def _post_with_retries(agent: Agent, body: bytes) -> tuple[int, bytes]:
    """POST through the agent's circuit breaker; a transient failure is tried again (up to
    EAP_PUSH_RETRIES more times), an open circuit or a refusal is not."""
    retrying = Retrying(
        retry=retry_if_exception(lambda exc: isinstance(exc, eap.PushFailed) and exc.transient),
        stop=stop_after_attempt(settings.EAP_PUSH_RETRIES + 1),
        wait=wait_exponential(multiplier=0.2, max=2.0),
        reraise=True,
    )
    return retrying(eap.breaker_for(agent).call, _post_once, agent, body)


def _post_once(agent: Agent, body: bytes) -> tuple[int, bytes]:
    """One signed POST to the agent's endpoint, at the address checked just now (no redirects,
    no proxy from the environment). A refusal or a non-2xx answer says only its status: the body
    of an answer we did not ask for is never copied into the task."""
    try:
        target = endpoints.pinned(agent.endpoint_url.rstrip("/") + "/task")
    except endpoints.EndpointRefused as exc:
        raise eap.PushFailed(f"its endpoint is refused: {exc}", transient=False) from None
    if not agent.signing_secret:  # revoked since it was chosen: nothing to sign with
        raise eap.PushFailed("its credentials were revoked", transient=False)
    timestamp = str(int(time.time()))
    headers = {
        "Host": target.host_header,
        "Content-Type": "application/json",
        "X-EAP-Timestamp": timestamp,
        "X-EAP-Signature": eap.sign(agent.signing_secret, timestamp, body),
    }
    # In a rotation's grace, replicas of the agent may still hold the previous secret.
    previous_secret = agent.previous_signing_secret_in_grace(timezone.now())
    if previous_secret:
        headers["X-EAP-Signature-Previous"] = eap.sign(previous_secret, timestamp, body)
    timeout = settings.EAP_PUSH_TIMEOUT_SECONDS
    try:
        with (
            httpx.Client(timeout=timeout, trust_env=False, follow_redirects=False) as client,
            client.stream(
                "POST", target.url, content=body, headers=headers, extensions={"sni_hostname": target.server_name}
            ) as reply,
        ):
            status, content = reply.status_code, _read_capped(reply)
    except httpx.TimeoutException:
        raise eap.PushFailed(f"no answer within {timeout:g}s", transient=True) from None
    except httpx.TransportError as exc:
        raise eap.PushFailed(f"{type(exc).__name__}", transient=True) from None
    if status in TRANSIENT_STATUSES:
        raise eap.PushFailed(f"HTTP {status}", transient=True, status=status)
    if not 200 <= status < 300:
        raise eap.PushFailed(f"HTTP {status}", transient=False, status=status)
    return status, content


def _read_capped(reply: httpx.Response) -> bytes:
    chunks, size = [], 0
    for chunk in reply.iter_bytes():
        size += len(chunk)
        if size > REPLY_LIMIT:
            raise eap.PushFailed(f"a reply over {REPLY_LIMIT} bytes", transient=False, status=reply.status_code)
        chunks.append(chunk)
    return b"".join(chunks)


def _read_delivery(delivery_id: int) -> EapDelivery | None:
    close_old_connections()
    try:
        return EapDelivery.objects.select_related("agent").get(pk=delivery_id)
    except (OperationalError, InterfaceError) as exc:
        logger.warning("delivery %s: database unavailable (%s); looking again", delivery_id, exc)
        return None


def _at_deadline(ctx: TaskContext) -> dict:
    """The task's deadline passed: give up this attempt's delivery (the task fails, naming the
    agent), unless its result came just now."""
    delivery = EapDelivery.objects.filter(task_id=ctx.task_id, attempt=ctx.attempt).select_related("agent").first()
    if delivery is None or delivery.state == State.OFFERED:
        why = f"no external agent claimed the task within {ctx.timeout_s:g}s"
    else:
        who = f"external agent {delivery.agent.name}" if delivery.agent else "the external agent"
        why = f"{who} did not report within {ctx.timeout_s:g}s"
    if delivery is not None and not _cancel(delivery.pk, why):
        delivery.refresh_from_db()
        if delivery.state == State.DONE:
            return _outcome(delivery)
    raise TaskFailed(why)


def _cancel(delivery_id: int, why: str) -> bool:
    """open -> cancelled unless it has finished meanwhile; returns whether this call did it."""
    return _cancel_open(EapDelivery.objects.filter(pk=delivery_id), why)


def _cancel_open(deliveries, why: str) -> bool:
    still_open = deliveries.filter(state__in=EapDelivery.OPEN)
    return bool(still_open.update(state=State.CANCELLED, finished_at=timezone.now(), error=why[:5000]))


def _pull_agent_for(ctx: TaskContext) -> bool:
    pulling = eap.live_external_agents(ctx.capability, ctx.session_id).filter(mode=Agent.Mode.PULL)
    return (pulling.filter(name=ctx.pinned_agent) if ctx.pinned_agent else pulling).exists()


def _outcome(delivery: EapDelivery) -> dict:
    agent = delivery.agent
    reported = delivery.result
    result = {
        "output": reported.get("output", ""),
        "artifacts": reported.get("artifacts", []),
        "external_agent": agent.name if agent else "",
        "mode": agent.mode if agent else "",
    }
    if delivery.error:
        name = agent.name if agent else "the external agent"
        raise TaskFailed(f"external agent {name} reported a failure: {delivery.error}", result=result)
    return result
