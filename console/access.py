"""Who may see and do what in the console: the API's tenant roles (tenants.models.Membership).

Every page looks up its objects through the user's memberships, so another tenant's session or
agent is a 404, never a 403 that would confirm it exists. Viewers read; the other roles may
also pause, resume, cancel and retry (Membership.can_mutate, as in the API); staff drain and
resume agents. The current tenant of the list pages is kept in the Django session.
"""

from django.http import Http404

from tenants.models import Membership, Tenant

SESSION_KEY = "console_tenant"


def memberships(user) -> list[Membership]:
    return list(Membership.objects.filter(user=user).select_related("tenant").order_by("tenant__slug"))


def memberships_of(request) -> list[Membership]:
    """The user's memberships, read once per request (the page and its layout both need them)."""
    if not hasattr(request, "_console_memberships"):
        request._console_memberships = memberships(request.user)
    return request._console_memberships


def current_membership(request) -> Membership | None:
    """The membership of the tenant the user last switched to (or the first), None for none."""
    mine = memberships_of(request)
    chosen = request.session.get(SESSION_KEY)
    return next((m for m in mine if m.tenant_id == chosen), mine[0] if mine else None)


def membership_or_404(user, tenant_id: int) -> Membership:
    membership = Membership.objects.filter(user=user, tenant_id=tenant_id).select_related("tenant").first()
    if membership is None:
        raise Http404("No such object.")
    return membership


def switch(request, slug: str) -> Tenant:
    membership = Membership.objects.filter(user=request.user, tenant__slug=slug).select_related("tenant").first()
    if membership is None:
        raise Http404("No such tenant.")
    request.session[SESSION_KEY] = membership.tenant_id
    return membership.tenant
