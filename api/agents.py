"""/api/v1/agents/: the agent registry, and drain and resume for operators."""

from django.db.models import Q
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import BasePermission
from rest_framework.response import Response

from agents import services
from agents.models import Agent
from tenants.models import Membership

from .serializers import AgentSerializer


class IsOperator(BasePermission):
    """Agents are shared by every tenant: only operators and admins may steer them."""

    message = "Only operators and admins may drain or resume agents."

    def has_permission(self, request, view) -> bool:
        roles = (Membership.Role.ADMIN, Membership.Role.OPERATOR)
        user = request.user
        return bool(user and user.is_authenticated and user.memberships.filter(role__in=roles).exists())


@extend_schema_view(
    list=extend_schema(
        summary="List agents",
        description="The platform's agent workers, which serve every tenant, and your tenants' external agents: "
        "status, liveness, capabilities, queues, load and counters. Filter by status and executor.",
    ),
    retrieve=extend_schema(summary="Get an agent", description="One agent, as the list shows it."),
)
class AgentViewSet(viewsets.ReadOnlyModelViewSet):
    """The platform's agent workers; shared by every tenant, so not tenant-scoped."""

    queryset = Agent.objects.all()
    serializer_class = AgentSerializer

    def get_queryset(self):
        # Our workers serve everyone; an external agent is seen only by its own tenant's members.
        visible = Q(tenant__isnull=True) | Q(tenant__memberships__user=self.request.user)
        return super().get_queryset().filter(visible).distinct()

    filterset_fields = ["status", "executor"]

    def get_permissions(self):
        # Agents have no tenant, so steering them is a platform role, not a tenant object check.
        return [IsOperator()] if self.action in ("drain", "resume") else super().get_permissions()

    @extend_schema(
        request=None,
        responses={202: AgentSerializer},
        summary="Stop consuming; finish in-flight work",
        description="Operators and admins: the agent takes no new work and what it runs finishes. "
        "It stays draining until it is resumed.",
    )
    @action(detail=True, methods=["post"])
    def drain(self, request, pk=None):
        return self._steer(services.drain_agent)

    @extend_schema(
        request=None,
        responses={202: AgentSerializer},
        summary="Consume the agent's queues again",
        description="Operators and admins: undo a drain.",
    )
    @action(detail=True, methods=["post"])
    def resume(self, request, pk=None):
        return self._steer(services.resume_agent)

    def _steer(self, service) -> Response:
        agent = self.get_object()
        service(agent)
        agent.refresh_from_db()
        return Response(AgentSerializer(agent).data, status=status.HTTP_202_ACCEPTED)
