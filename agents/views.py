from rest_framework import viewsets

from .models import Agent
from .serializers import AgentSerializer


class AgentViewSet(viewsets.ReadOnlyModelViewSet):
    """The platform's agent workers; shared by every tenant, so not tenant-scoped."""

    queryset = Agent.objects.all()
    serializer_class = AgentSerializer
    filterset_fields = ["status", "executor"]
