"""What every console page's layout needs (settings.TEMPLATES' context processors)."""

from sessions import feed

from . import access


def console(request) -> dict:
    if not request.path.startswith("/console/") or not request.user.is_authenticated:
        return {}
    return {
        "memberships": access.memberships_of(request),
        "current": access.current_membership(request),
        "stream_url": feed.stream_base(request),
    }
