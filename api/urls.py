"""Every URL: the REST API under /api/v1/, its schema and docs, health checks, the admin and the
console (/, which sends people to the console's sessions)."""

from django.contrib import admin
from django.urls import include, path, re_path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from orchestrator_project import health

from . import eap, errors, stream
from .agents import AgentViewSet
from .export import TenantExportView
from .metrics import metrics_view
from .preview import DecompositionPreviewView
from .schema import SchemaView
from .sessions import SessionViewSet
from .tasks import TaskViewSet
from .tenant import TenantView
from .tokens import TokenViewSet

# The admin's "View site" link opens the console.
admin.site.site_url = "/console/"

router = DefaultRouter()
router.register("sessions", SessionViewSet, basename="session")
router.register("tasks", TaskViewSet, basename="task")
router.register("agents", AgentViewSet, basename="agent")
router.register("tokens", TokenViewSet, basename="token")

urlpatterns = [
    path("api/v1/decompositions/preview/", DecompositionPreviewView.as_view(), name="decomposition-preview"),
    path("api/v1/tenant/", TenantView.as_view(), name="tenant"),
    path("api/v1/tenant/export/", TenantExportView.as_view(), name="tenant-export"),
    path("api/v1/eap/register/", eap.RegisterView.as_view(), name="eap-register"),
    path("api/v1/eap/heartbeat/", eap.HeartbeatView.as_view(), name="eap-heartbeat"),
    path("api/v1/eap/rotate/", eap.RotateView.as_view(), name="eap-rotate"),
    path("api/v1/eap/tasks/next/", eap.NextTaskView.as_view(), name="eap-tasks-next"),
    path("api/v1/eap/tasks/<str:task_id>/result/", eap.ResultView.as_view(), name="eap-task-result"),
    # Served by the stream process (api/stream_urls.py); here, a pointer to it.
    path("api/v1/sessions/<str:pk>/stream/", stream.elsewhere, name="session-stream"),
    path("api/v1/stream/", stream.elsewhere, name="tenant-stream"),
    path("api/v1/", include(router.urls)),
    path("api/schema/", SchemaView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    # Last under api/: what matched nothing above. Only paths ending in a slash, so that a missing
    # slash is still redirected to the URL with it (APPEND_SLASH) before it can be a 404.
    re_path(r"^api/[\s\S]*/$", errors.not_found, name="api-not-found"),  # any path, newlines too
    path("health/live/", health.live, name="health-live"),
    path("health/ready/", health.ready, name="health-ready"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("console/", include("console.urls")),
    path("", RedirectView.as_view(pattern_name="console:sessions"), name="root"),
]
