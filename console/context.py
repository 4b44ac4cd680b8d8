"""What every console page's layout needs (settings.TEMPLATES' context processors)."""

from django.conf import settings

from . import access


def console(request) -> dict:
    if not request.path.startswith("/console/") or not request.user.is_authenticated:
        return {}
    return {
        "memberships": access.memberships(request.user),
        "current": access.current_membership(request),
        "stream_url": settings.STREAM_URL,
    }
