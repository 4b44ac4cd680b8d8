"""The External Agent Protocol's API under /api/v1/eap/ (docs/EAP.md).

Registration takes a tenant API token of an operator or admin. Everything else is the agent's
own business, authenticated by its X-Agent-Token: it sees and reports only its own tasks.
"""

import uuid

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import APIException, AuthenticationFailed, NotFound, PermissionDenied, ValidationError
from rest_framework.permissions import BasePermission
from rest_framework.response import Response
from rest_framework.views import APIView

from agents import eap
from agents.eap_serializers import (
    EapErrorSerializer,
    HeartbeatSerializer,
    RegisterSerializer,
    RegistrationSerializer,
    ResultSerializer,
    RotationSerializer,
    TaskOfferSerializer,
    offer_of,
)
from agents.models import Agent
from tenants.models import Membership, Tenant

TOKEN_HEADER = "X-Agent-Token"  # noqa: S105 - a header name


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"
    default_detail = "conflict"


class ExternalAgentUser:
    """request.user of a request an external agent made with its token."""

    is_authenticated = True
    is_anonymous = False
    is_staff = False

    def __init__(self, agent: Agent, *, by_previous_token: bool = False) -> None:
        self.agent = agent
        self.pk = f"eap-agent-{agent.pk}"  # what throttling keys on
        # Authenticated by the token a rotation replaced (in its grace), not the current one.
        self.by_previous_token = by_previous_token

    def __str__(self) -> str:
        return f"external agent {self.agent.name}"


class AgentTokenAuthentication(BaseAuthentication):
    """X-Agent-Token: the token registration returned. Checked against its stored hash in
    constant time; a missing or wrong one is a 401 (never logged)."""

    def authenticate(self, request):
        token = request.META.get("HTTP_X_AGENT_TOKEN", "")
        if not token:
            raise AuthenticationFailed(
                f"missing {TOKEN_HEADER} header: send the token that POST /api/v1/eap/register/ returned"
            )
        found = eap.agent_for_token(token)
        if found is None:
            raise AuthenticationFailed(f"invalid {TOKEN_HEADER}: no external agent has this token")
        agent, previous = found
        return ExternalAgentUser(agent, by_previous_token=previous), agent

    def authenticate_header(self, request) -> str:
        return TOKEN_HEADER  # makes failures 401s rather than 403s


class AgentTokenScheme(OpenApiAuthenticationExtension):
    target_class = AgentTokenAuthentication
    name = "agentToken"

    def get_security_definition(self, auto_schema):
        return {"type": "apiKey", "in": "header", "name": TOKEN_HEADER}


class IsExternalAgent(BasePermission):
    def has_permission(self, request, view) -> bool:
        return isinstance(request.user, ExternalAgentUser)


class CanRegisterAgents(BasePermission):
    """Operators and admins of a tenant register its external agents (the tenant is checked with
    the body, which names it)."""

    message = "Only operators and admins (in any tenant) may register external agents."

    def has_permission(self, request, view) -> bool:
        roles = (Membership.Role.ADMIN, Membership.Role.OPERATOR)
        user = request.user
        return bool(user and user.is_authenticated and user.memberships.filter(role__in=roles).exists())


def errors(*codes: int) -> dict:
    described = {
        400: "Malformed JSON or an invalid body; details name each bad field.",
        401: f"Missing or invalid credentials ({TOKEN_HEADER} for agents).",
        403: "The caller's role may not do this (for rotate: the token is the previous one of a rotation).",
        404: "Not a task id.",
        409: "Conflict; the message says why.",
    }
    return {code: OpenApiResponse(EapErrorSerializer, description=described[code]) for code in codes}


class AgentView(APIView):
    """An endpoint an external agent calls with its own token."""

    authentication_classes = [AgentTokenAuthentication]
    permission_classes = [IsExternalAgent]

    @property
    def agent(self) -> Agent:
        return self.request.user.agent


def operated_tenant(user, slug: str | None):
    """The tenant an external agent registered by `user` will serve: the one named, or the only
    one the user operates or administers."""
    roles = (Membership.Role.ADMIN, Membership.Role.OPERATOR)
    tenants = Tenant.objects.filter(memberships__user=user, memberships__role__in=roles)
    if slug is not None:
        tenant = tenants.filter(slug=slug).first()
        if tenant is None:
            raise PermissionDenied(f"you are not an operator or admin of tenant {slug!r}")
        return tenant
    operated = list(tenants[:2])
    if len(operated) > 1:
        raise ValidationError({"tenant": ["you operate several tenants: name the one this agent serves"]})
    return operated[0]  # CanRegisterAgents let the user in: there is one


class RegisterView(APIView):
    permission_classes = [CanRegisterAgents]

    @extend_schema(
        tags=["eap"],
        operation_id="eap_register",
        summary="Register an external agent",
        description=(
            "With a tenant API token (Authorization: Token ...) of an operator or admin. The answer's "
            "token and signing_secret are shown only once. A name any agent has already is a 409."
        ),
        request=RegisterSerializer,
        responses={201: RegistrationSerializer, **errors(400, 401, 403, 409)},
    )
    def post(self, request):
        body = RegisterSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        fields = dict(body.validated_data)
        tenant = operated_tenant(request.user, fields.pop("tenant", None))
        try:
            agent, token = eap.register_external_agent(tenant=tenant, **fields)
        except eap.NameTaken:
            raise Conflict(f"an agent named {body.validated_data['name']!r} exists already") from None
        registration = {
            "agent_id": agent.pk,
            "token": token,
            "heartbeat_interval_s": settings.EAP_HEARTBEAT_INTERVAL_SECONDS,
            "signing_secret": agent.signing_secret,
        }
        return Response(RegistrationSerializer(registration).data, status=status.HTTP_201_CREATED)


class RotateView(AgentView):
    @extend_schema(
        tags=["eap"],
        operation_id="eap_rotate",
        summary="Rotate the agent's token and signing secret",
        description=(
            "Returns a new token and signing secret, shown only in this answer. The ones replaced stay valid "
            "for grace_seconds (EAP_ROTATION_GRACE_SECONDS): the old token is accepted, and pushes carry "
            "X-EAP-Signature-Previous, signed with the old secret, beside X-EAP-Signature. Only the current "
            "token may rotate (403 with the previous one)."
        ),
        request=None,
        responses={200: RotationSerializer, **errors(401, 403)},
    )
    def post(self, request):
        if request.user.by_previous_token:
            raise PermissionDenied("this token was replaced by a rotation: rotate with the current token")
        try:
            rotated = eap.rotate_credentials(self.agent)
        except eap.StaleCredentials as exc:
            raise PermissionDenied(str(exc)) from exc
        answer = {**rotated, "grace_seconds": settings.EAP_ROTATION_GRACE_SECONDS}
        return Response(RotationSerializer(answer).data)


class HeartbeatView(AgentView):
    @extend_schema(
        tags=["eap"],
        operation_id="eap_heartbeat",
        summary="Say the agent is alive",
        description="Beat every heartbeat_interval_s; silent for AGENT_OFFLINE_AFTER_SECONDS, the agent is offline.",
        request=HeartbeatSerializer,
        responses={204: OpenApiResponse(description="Noted."), **errors(400, 401)},
    )
    def post(self, request):
        body = HeartbeatSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        eap.record_heartbeat(self.agent, **body.validated_data)
        return Response(status=status.HTTP_204_NO_CONTENT)


class NextTaskView(AgentView):
    @extend_schema(
        tags=["eap"],
        operation_id="eap_tasks_next",
        summary="Claim the next task (pull agents)",
        description="Claims the oldest offered task with one of the agent's capabilities; 204 when there is none.",
        request=None,
        responses={
            200: TaskOfferSerializer,
            204: OpenApiResponse(description="Nothing to do now; ask again later."),
            **errors(401, 409),
        },
    )
    def get(self, request):
        if self.agent.mode != Agent.Mode.PULL:
            raise Conflict(f"agent {self.agent.name} is a push agent: its tasks come to its endpoint")
        delivery = eap.claim_next_delivery(self.agent)
        if delivery is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(TaskOfferSerializer(offer_of(delivery)).data)


class ResultView(AgentView):
    @extend_schema(
        tags=["eap"],
        operation_id="eap_task_result",
        summary="Report a task's result",
        description=(
            "Only for a task this agent runs now (pushed to it, or claimed with tasks/next). "
            "409 for any other task id (another agent's, finished, cancelled, unknown); nothing is written."
        ),
        request=ResultSerializer,
        responses={
            200: OpenApiResponse(ResultSerializer, description="Recorded; the answer repeats it."),
            **errors(400, 401, 404, 409),
        },
    )
    def post(self, request, task_id: str):
        try:
            task_pk = uuid.UUID(task_id)
        except ValueError:
            raise NotFound(f"{task_id[:64]!r} is not a task id") from None
        body = ResultSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            delivery = eap.report_result(self.agent, task_id=task_pk, result=dict(body.validated_data))
        except eap.NotYourTask as exc:
            raise Conflict(str(exc)) from None
        return Response(ResultSerializer(delivery.result).data)
