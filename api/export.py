"""GET /api/v1/tenant/export/: a tenant's data as streamed JSON Lines, for its admins
(tasks/export.py writes the lines; docs/DATA.md, "Export")."""

import re

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.views import APIView

from agents.eap_serializers import EapErrorSerializer
from tasks.export import export_lines
from tenants.models import Membership
from tenants.permissions import membership_in

NDJSON = "application/x-ndjson"
SLUG = re.compile(r"[-a-zA-Z0-9_]{1,64}")


class JSONErrorsNegotiation(BaseContentNegotiation):
    """The export answers JSON Lines, whatever the client accepts; an error is always JSON (the
    one error shape), never a 406 for an Accept: application/x-ndjson."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


def admin_membership(user, slug: str | None) -> Membership:
    """The caller's admin membership of the named tenant, or of their only tenant."""
    if slug and not SLUG.fullmatch(slug):  # checked before the query: a NUL byte is a database error
        raise ValidationError({"tenant": ["not a tenant slug (letters, digits, '-' and '_', at most 64)"]})
    membership = membership_in(user, slug)
    if membership.role != Membership.Role.ADMIN:
        raise PermissionDenied(f"only an admin of tenant {membership.tenant.slug} may export its data")
    return membership


class TenantExportView(APIView):
    permission_classes = [IsAuthenticated]
    renderer_classes = [JSONRenderer]
    content_negotiation_class = JSONErrorsNegotiation

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
            400: OpenApiResponse(EapErrorSerializer, description="Unknown or ambiguous tenant."),
            401: OpenApiResponse(EapErrorSerializer, description="Not authenticated."),
            403: OpenApiResponse(EapErrorSerializer, description="Not an admin of the tenant."),
        },
    )
    def get(self, request):
        slug = request.query_params.get("tenant") or None
        tenant = admin_membership(request.user, slug).tenant
        response = StreamingHttpResponse(export_lines(tenant), content_type=NDJSON)
        response["Content-Disposition"] = f'attachment; filename="{tenant.slug}-export.jsonl"'
        response["Cache-Control"] = "no-store"
        return response
