"""The console's session page: the DAG, the task panel, the timeline and the actions."""

from django.http import Http404


def detail(request, pk):  # built next (issue 15)
    raise Http404


task_panel = action = detail
