"""/api/v1/agents/: the agent registry, and drain and resume (staff, or the agent's tenant's operators)."""

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.response import Response

from agents import eap, services
from agents.models import Agent
from tenants.permissions import IsTenantMember

from .eap import Conflict
from .filters import FiltersNarrowListsOnly
from .serializers import AgentSerializer


class StaffOrMember(IsTenantMember):
    """Reading the registry: members of a tenant, and staff (who run the platform's workers)."""

    def has_permission(self, request, view) -> bool:
        return bool(request.user and request.user.is_staff) or super().has_permission(request, view)


class MaySteer(BasePermission):
    """Draining or resuming an agent: a platform worker serves every tenant, so only staff may
    steer it; an external agent belongs to one tenant, whose admins and operators may."""

    message = "Only staff may drain or resume a platform worker, and only its tenant's operators an external agent."

    def has_object_permission(self, request, view, obj: Agent) -> bool:
        return obj.may_be_steered_by(request.user)


@extend_schema_view(
    list=extend_schema(
        summary="List agents",
        description="The platform's agent workers, which serve every tenant, and your tenants' external agents: "
        "status, liveness, capabilities, queues, load and counters. Filter by status and executor.",
    ),
    retrieve=extend_schema(summary="Get an agent", description="One agent, as the list shows it."),
)
class AgentViewSet(FiltersNarrowListsOnly, viewsets.ReadOnlyModelViewSet):
    """The platform's agent workers; shared by every tenant, so not tenant-scoped."""

    queryset = Agent.objects.all()
    serializer_class = AgentSerializer

    def get_queryset(self):
        # Our workers serve everyone; an external agent is seen only by its own tenant's members.
        return super().get_queryset().visible_to(self.request.user)

    filterset_fields = ["status", "executor"]

    def get_permissions(self):
        if self.action in ("drain", "resume", "revoke_credentials"):
            return [IsAuthenticated(), MaySteer()]
        return [StaffOrMember()]

    @extend_schema(
        request=None,
        responses={202: AgentSerializer},
        summary="Stop consuming; finish in-flight work",
        description="The agent takes no new work and what it runs finishes; it stays draining until it is "
        "resumed. A platform worker: staff only; an external agent: its tenant's operators and admins (403 "
        "otherwise, the agent unchanged).",
    )
    @action(detail=True, methods=["post"])
    def drain(self, request, pk=None):
        return self._steer(services.drain_agent)

    @extend_schema(
        request=None,
        responses={202: AgentSerializer},
        summary="Consume the agent's queues again",
        description="Undo a drain. Who may: as for drain (staff for a platform worker, the tenant's operators "
        "and admins for an external agent).",
    )
    @action(detail=True, methods=["post"])
    def resume(self, request, pk=None):
        return self._steer(services.resume_agent)

    @extend_schema(
        request=None,
        responses={200: AgentSerializer},
        summary="Revoke an external agent's credentials",
        description="Its token and signing secret (and the previous ones of a rotation in grace) are refused from "
        "now on and the agent goes offline: no task is routed to it, a task it runs is handed to another. It "
        "cannot get new credentials: register it again under another name. The agent's tenant's operators "
        "and admins only (403 otherwise); 409 for a platform worker, which has no such credentials.",
    )
    @action(detail=True, methods=["post"], url_path="revoke-credentials")
    def revoke_credentials(self, request, pk=None):
        agent = self.get_object()
        if not agent.is_external:
            raise Conflict(f"agent {agent.name} is a platform worker: it has no EAP credentials")
        eap.revoke_credentials(agent, actor=f"user:{request.user.get_username()}")
        agent.refresh_from_db()
        return Response(self.get_serializer(agent).data)

    def _steer(self, service) -> Response:
        agent = self.get_object()
        service(agent, actor=f"user:{self.request.user.get_username()}")
        agent.refresh_from_db()
        return Response(self.get_serializer(agent).data, status=status.HTTP_202_ACCEPTED)
