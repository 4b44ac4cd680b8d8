"""The stream process's URLs (orchestrator_project/asgi.py): the event streams, and nothing else."""

from django.urls import path

from . import stream

urlpatterns = [
    path("api/v1/sessions/<str:pk>/stream/", stream.session_stream, name="session-stream"),
    path("api/v1/stream/", stream.tenant_stream, name="tenant-stream"),
]
