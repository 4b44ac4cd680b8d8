from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from agents import eap_views
from agents.views import AgentViewSet
from sessions.views import SessionViewSet
from tasks.views import DecompositionPreviewView, TaskViewSet

from . import health

router = DefaultRouter()
router.register("sessions", SessionViewSet, basename="session")
router.register("tasks", TaskViewSet, basename="task")
router.register("agents", AgentViewSet, basename="agent")

urlpatterns = [
    path("api/v1/decompositions/preview/", DecompositionPreviewView.as_view(), name="decomposition-preview"),
    path("api/v1/eap/register/", eap_views.RegisterView.as_view(), name="eap-register"),
    path("api/v1/eap/heartbeat/", eap_views.HeartbeatView.as_view(), name="eap-heartbeat"),
    path("api/v1/eap/tasks/next/", eap_views.NextTaskView.as_view(), name="eap-tasks-next"),
    path("api/v1/eap/tasks/<str:task_id>/result/", eap_views.ResultView.as_view(), name="eap-task-result"),
    path("api/v1/", include(router.urls)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("health/live/", health.live, name="health-live"),
    path("health/ready/", health.ready, name="health-ready"),
    path("admin/", admin.site.urls),
]
