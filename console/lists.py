"""The console's list pages: sessions, the fleet, and the tenant switcher."""

from django.http import Http404


def sessions(request):  # built next (issue 15)
    raise Http404


fleet = switch_tenant = agent_action = sessions
