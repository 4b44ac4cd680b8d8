"""POST /api/v1/decompositions/preview/: the DAG a session created with the same body would get,
its order, critical path and makespan; nothing is stored."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import BasePermission
from rest_framework.response import Response
from rest_framework.views import APIView

from agents.capabilities import CAPABILITIES
from tasks.decomposition import DEFAULT_ESTIMATE, Plan, critical_path, edges, nodes_from_specs, topological_order
from tasks.decomposition.analyzer import HIGH, LOW, MEDIUM
from tasks.lifecycle import check_new_session, plan_new_session
from tasks.quotas import check_request

from .inputs import EstimateSerializer, SessionCreateSerializer
from .tenant import QUOTA_EXCEEDED


class PlannedTaskSerializer(serializers.Serializer):
    key = serializers.CharField()
    title = serializers.CharField()
    capability = serializers.ChoiceField(choices=CAPABILITIES)
    depends_on = serializers.ListField(child=serializers.CharField())
    required = serializers.BooleanField()
    instructions = serializers.CharField()
    params = serializers.DictField()
    estimate = EstimateSerializer()
    expected_hours = serializers.FloatField(help_text="PERT mean: (optimistic + 4 * likely + pessimistic) / 6.")


class AnalysisSerializer(serializers.Serializer):
    complexity = serializers.ChoiceField(choices=[LOW, MEDIUM, HIGH])
    keywords = serializers.ListField(child=serializers.CharField(), help_text="Whole words matched, in text order.")
    concerns = serializers.ListField(child=serializers.CharField())
    # A plain string child: a second enum of the capabilities would get a second name in the schema.
    capabilities = serializers.ListField(
        child=serializers.CharField(), help_text="Capabilities the requirements call for (see Task.capability)."
    )
    template_scores = serializers.DictField(child=serializers.IntegerField())


class DecompositionPreviewSerializer(serializers.Serializer):
    """What creating a session with the same body would produce; nothing is stored."""

    template = serializers.CharField(allow_blank=True, help_text='The template used; "" for an explicit DAG.')
    analysis = AnalysisSerializer()
    tasks = PlannedTaskSerializer(many=True)
    edges = serializers.ListField(
        child=serializers.ListField(child=serializers.CharField(), min_length=2, max_length=2),
        help_text="[upstream, downstream] task keys.",
    )
    topological_order = serializers.ListField(child=serializers.CharField())
    critical_path = serializers.ListField(child=serializers.CharField(), help_text="By expected duration.")
    estimated_makespan_hours = serializers.FloatField()


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
        responses={200: DecompositionPreviewSerializer, 429: QUOTA_EXCEEDED},
        summary="Preview the decomposition: tasks, edges, order, critical path and makespan, nothing stored",
        description="The same body as creating a session, checked the same way; nothing is stored. Any member "
        "of a tenant may ask, viewers too. 429 quota_exceeded when the tenant's tasks per session, or the highest "
        "priority of your role, would refuse the session (the quotas that count use are checked on create only).",
    )
    def post(self, request):
        payload = SessionCreateSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        data = payload.validated_data
        slug = data.get("tenant")
        memberships = request.user.memberships.select_related("tenant")
        if slug:
            memberships = memberships.filter(tenant__slug=slug)
            if not memberships:
                raise ValidationError({"tenant": [f"you are not a member of tenant {slug!r}"]})
        membership = memberships[0] if len(memberships) == 1 else None
        tenant = membership.tenant if membership else None
        if "repository" in data and tenant is None:  # whose repository rules would apply?
            raise ValidationError({"tenant": ["you belong to several tenants; name one"]})
        check_new_session(data, tenant=tenant)
        plan = plan_new_session(data)
        if membership:  # the quotas one request can break alone; use changes by the moment
            check_request(tenant, tasks=len(plan.tasks), priority=data["priority"], role=membership.role)
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
