"""GET /api/v1/tenant/: the caller's tenant, its fair share weight and its quotas, each with its
limit and, for the counting ones, the tenant's use now."""

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from tasks.quotas import ACTIVE_SESSIONS, MAX_PRIORITY, OPEN_TASKS, TASKS_PER_SESSION, usage_of
from tenants.models import PRIORITY_ROLES, Membership, Tenant
from tenants.permissions import membership_in


class UsageSerializer(serializers.Serializer):
    limit = serializers.IntegerField(min_value=0)
    used = serializers.IntegerField(min_value=0)


class LimitSerializer(serializers.Serializer):
    limit = serializers.IntegerField(min_value=1)


class MaxPrioritySerializer(serializers.Serializer):
    """The highest session priority each role may set (viewers create no sessions)."""

    admin = serializers.IntegerField(min_value=0, max_value=9)
    operator = serializers.IntegerField(min_value=0, max_value=9)
    developer = serializers.IntegerField(min_value=0, max_value=9)


class QuotasSerializer(serializers.Serializer):
    active_sessions = UsageSerializer(help_text="Sessions not settled: pending, queued, running, degraded, paused.")
    open_tasks = UsageSerializer(help_text="Pending, queued and running tasks of the unsettled sessions.")
    tasks_per_session = LimitSerializer()
    max_priority = MaxPrioritySerializer()


class TenantSerializer(serializers.Serializer):
    slug = serializers.SlugField()
    name = serializers.CharField()
    role = serializers.ChoiceField(choices=Membership.Role.choices, help_text="Your role in this tenant.")
    weight = serializers.IntegerField(min_value=1, help_text="Fair share weight on shared capability queues.")
    quotas = QuotasSerializer()


class QuotaExceededDetailsSerializer(serializers.Serializer):
    quota = serializers.ChoiceField(choices=[ACTIVE_SESSIONS, OPEN_TASKS, TASKS_PER_SESSION, MAX_PRIORITY])
    limit = serializers.IntegerField()
    used = serializers.IntegerField(
        help_text="The tenant's use now; for tasks_per_session and max_priority, what the request asks for."
    )
    requested = serializers.IntegerField(help_text="What the request adds or asks for.")


class QuotaErrorSerializer(serializers.Serializer):
    code = serializers.ChoiceField(choices=["quota_exceeded"])
    message = serializers.CharField()
    details = QuotaExceededDetailsSerializer()


class QuotaExceededSerializer(serializers.Serializer):
    """429: {"error": {"code": "quota_exceeded", "message", "details": {quota, limit, used, requested}}}."""

    error = QuotaErrorSerializer()


QUOTA_EXCEEDED = OpenApiResponse(
    QuotaExceededSerializer, description="A quota of the tenant would be exceeded; details name it, its limit and use."
)


def quotas_of(tenant: Tenant) -> dict:
    usage = usage_of(tenant.pk)
    return {
        ACTIVE_SESSIONS: {"limit": tenant.active_sessions_limit(), "used": usage.active_sessions},
        OPEN_TASKS: {"limit": tenant.open_tasks_limit(), "used": usage.open_tasks},
        TASKS_PER_SESSION: {"limit": tenant.tasks_per_session_limit()},
        MAX_PRIORITY: {role: tenant.max_priority_of(role) for role in PRIORITY_ROLES},
    }


class TenantQuerySerializer(serializers.Serializer):
    tenant = serializers.SlugField(max_length=64, required=False)


class TenantView(APIView):
    """The caller's tenant: weight, and quotas with their limits and use."""

    @extend_schema(
        summary="Your tenant: fair share weight, quotas and their use",
        description="Each quota's limit (the tenant's, or the setting's default) and, for active sessions and "
        "open tasks, the use now. Any member may ask, viewers too. Members of several tenants name one with "
        "?tenant=.",
        parameters=[OpenApiParameter("tenant", str, description="Tenant slug; needed only if you belong to several.")],
        responses={200: TenantSerializer},
    )
    def get(self, request):
        query = TenantQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        membership = membership_in(request.user, query.validated_data.get("tenant"))
        tenant = membership.tenant
        body = {
            "slug": tenant.slug,
            "name": tenant.name,
            "role": membership.role,
            "weight": tenant.weight,
            "quotas": quotas_of(tenant),
        }
        return Response(TenantSerializer(body).data)
