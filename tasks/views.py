from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, viewsets
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import BasePermission
from rest_framework.response import Response
from rest_framework.views import APIView

from sessions.serializers import DecompositionPreviewSerializer, SessionCreateSerializer
from tenants.permissions import TenantScopedMixin

from .decomposition import (
    DEFAULT_ESTIMATE,
    Plan,
    critical_path,
    edges,
    nodes_from_specs,
    plan_session,
    topological_order,
)
from .models import Task
from .serializers import TaskSerializer


class TaskViewSet(TenantScopedMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """One task of a session in the caller's tenants, with its result."""

    queryset = Task.objects.select_related("agent").prefetch_related("depends_on")
    serializer_class = TaskSerializer
    tenant_field = "session__tenant"


class IsAnyTenantMember(BasePermission):
    """Members of any tenant in any role, viewers included: a preview changes nothing."""

    message = "You are not a member of any tenant."

    def has_permission(self, request, view) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and user.memberships.exists())


class DecompositionPreviewView(APIView):
    """The DAG a session created with the same body would get; stores nothing."""

    permission_classes = [IsAnyTenantMember]

    @extend_schema(
        request=SessionCreateSerializer,
        responses={200: DecompositionPreviewSerializer},
        summary="Preview the decomposition: tasks, edges, order, critical path and makespan, nothing stored",
    )
    def post(self, request):
        payload = SessionCreateSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        data = payload.validated_data
        slug = data.get("tenant")
        if slug and not request.user.memberships.filter(tenant__slug=slug).exists():
            raise ValidationError({"tenant": [f"you are not a member of tenant {slug!r}"]})
        plan = plan_session(
            requirements=data["requirements"],
            template=data.get("template"),
            tasks=data.get("tasks"),
            max_tasks=settings.MAX_TASKS_PER_SESSION,
        )
        return Response(DecompositionPreviewSerializer(preview_of(plan)).data)


def preview_of(plan: Plan) -> dict:
    nodes = nodes_from_specs(plan.tasks)
    path = critical_path(nodes)
    analysis = plan.analysis
    return {
        "template": plan.template,
        "analysis": {
            "complexity": analysis.complexity,
            "keywords": analysis.keywords,
            "concerns": list(analysis.concerns),
            "capabilities": list(analysis.capabilities),
            "template_scores": dict(analysis.scores),
        },
        "tasks": [_planned_task(spec, node.hours) for spec, node in zip(plan.tasks, nodes, strict=True)],
        "edges": [list(edge) for edge in edges(nodes)],
        "topological_order": topological_order(nodes),
        "critical_path": path.keys,
        "estimated_makespan_hours": round(path.hours, 2),
    }


def _planned_task(spec: dict, hours: float) -> dict:
    estimate = spec.get("estimate") or DEFAULT_ESTIMATE
    return {
        "key": spec["key"],
        "title": spec["title"],
        "capability": spec["capability"],
        "depends_on": list(spec.get("depends_on", [])),
        "required": spec.get("required", True),
        "instructions": spec.get("instructions", ""),
        "params": spec.get("params") or {},
        "estimate": estimate,
        "expected_hours": round(hours, 2),
    }
