from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.permissions import SAFE_METHODS, BasePermission

from .models import Membership


def membership_for(user, tenant_id: int) -> Membership | None:
    return Membership.objects.filter(user=user, tenant_id=tenant_id).first()


def membership_in(user, slug: str | None) -> Membership:
    """The caller's membership in the named tenant, or in their only tenant. Raises
    ValidationError for a tenant not theirs or for a member of several who named none,
    PermissionDenied for a member of none."""
    memberships = Membership.objects.filter(user=user).select_related("tenant")
    if slug:
        memberships = memberships.filter(tenant__slug=slug)
    memberships = list(memberships)  # read once: every check below counts these
    if slug and not memberships:
        raise ValidationError({"tenant": [f"you are not a member of tenant {slug!r}"]})
    if len(memberships) > 1:
        raise ValidationError({"tenant": ["you belong to several tenants; name one"]})
    if not memberships:
        raise PermissionDenied("you are a member of no tenant")
    return memberships[0]


def membership_for_write(user, slug: str | None) -> Membership:
    """The caller's membership in the tenant a new object goes to (membership_in); a viewer's
    is refused (PermissionDenied)."""
    membership = membership_in(user, slug)
    if not membership.can_mutate:
        raise PermissionDenied(f"role {membership.role} in tenant {membership.tenant.slug} cannot create sessions")
    return membership


class IsTenantMember(BasePermission):
    """Authenticated members of at least one tenant; viewers may only read.

    Object querysets are already scoped to the caller's tenants (TenantScopedMixin), so an
    object of another tenant is a 404 before this runs; here we only decide read vs write.
    """

    message = "Your role in this tenant does not allow changes."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        if request.method in SAFE_METHODS:
            return user.memberships.exists()
        return user.memberships.exclude(role=Membership.Role.VIEWER).exists()

    def has_object_permission(self, request, view, obj) -> bool:
        if request.method in SAFE_METHODS:
            return True
        membership = membership_for(request.user, obj.tenant_id)
        return membership is not None and membership.can_mutate


class TenantScopedMixin:
    """Limits a view's queryset to the tenants the caller belongs to (one place, every view)."""

    tenant_field = "tenant"

    def get_queryset(self):
        return super().get_queryset().filter(**{f"{self.tenant_field}__memberships__user": self.request.user})
