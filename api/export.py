"""GET /api/v1/tenant/export/: a tenant's data as streamed JSON Lines, for its admins
(tenants/export.py writes the lines; docs/DATA.md, "Export")."""

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.views import APIView

from tenants.export import export_lines
from tenants.models import Membership

NDJSON = "application/x-ndjson"


class NDJSONRenderer(BaseRenderer):
    """Lets a client ask for JSON Lines (Accept: application/x-ndjson). The export itself is a
    streamed response; only an error passes through here, as one JSON line."""

    media_type = NDJSON
    format = "ndjson"

    def render(self, data, accepted_media_type=None, renderer_context=None) -> bytes:
        return JSONRenderer().render(data) + b"\n"


def admin_membership(user, slug: str | None) -> Membership:
    """The caller's admin membership of the named tenant, or of their only tenant."""
    memberships = Membership.objects.filter(user=user).select_related("tenant")
    if slug:
        memberships = memberships.filter(tenant__slug=slug)
        if not memberships:
            raise ValidationError({"tenant": [f"you are not a member of tenant {slug!r}"]})
    elif len(memberships) > 1:
        raise ValidationError({"tenant": ["you belong to several tenants; name one"]})
    membership = memberships.first()
    if membership is None:
        raise PermissionDenied("you are a member of no tenant")
    if membership.role != Membership.Role.ADMIN:
        raise PermissionDenied(f"only an admin of tenant {membership.tenant.slug} may export its data")
    return membership


class TenantExportView(APIView):
    permission_classes = [IsAuthenticated]
    renderer_classes = [JSONRenderer, NDJSONRenderer]

    @extend_schema(
        summary="Export the tenant's data",
        description=(
            "The tenant's data as JSON Lines, streamed: one object per line with a `type` (tenant, member, "
            "session, task, event, checkpoint, eap_delivery). Admins of the tenant only. Name the tenant "
            "with `tenant` when you belong to several."
        ),
        parameters=[
            OpenApiParameter("tenant", OpenApiTypes.STR, description="The tenant's slug (required if several).")
        ],
        responses={
            (200, NDJSON): OpenApiResponse(OpenApiTypes.STR, description="JSON Lines, one object per line."),
            (400, "application/json"): OpenApiResponse(description="Unknown or ambiguous tenant."),
            (401, "application/json"): OpenApiResponse(description="Not authenticated."),
            (403, "application/json"): OpenApiResponse(description="Not an admin of the tenant."),
        },
    )
    def get(self, request):
        slug = request.query_params.get("tenant") or None
        tenant = admin_membership(request.user, slug).tenant
        response = StreamingHttpResponse(export_lines(tenant), content_type=NDJSON)
        response["Content-Disposition"] = f'attachment; filename="{tenant.slug}-export.jsonl"'
        response["Cache-Control"] = "no-store"
        return response
