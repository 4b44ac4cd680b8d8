"""GET /api/v1/tasks/{id}/: one task, with its result."""

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, viewsets

from tasks.models import Task
from tenants.permissions import TenantScopedMixin

from .serializers import TaskSerializer


@extend_schema_view(
    retrieve=extend_schema(
        summary="Get a task",
        description="One task of a session in your tenants, with its result (output, artifacts, diff, tokens, "
        "cost) and error.",
    )
)
class TaskViewSet(TenantScopedMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """One task of a session in the caller's tenants, with its result."""

    queryset = Task.objects.select_related("agent").prefetch_related("depends_on")
    serializer_class = TaskSerializer
    tenant_field = "session__tenant"
