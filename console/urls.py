"""The console's pages, under /console/ (docs/CONSOLE.md)."""

from django.contrib.auth import views as auth_views
from django.urls import path

from . import lists, session

app_name = "console"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="console/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("tenant/", lists.switch_tenant, name="switch-tenant"),
    path("", lists.sessions, name="sessions"),
    path("fleet/", lists.fleet, name="fleet"),
    path("fleet/agents/<int:pk>/<str:action>/", lists.agent_action, name="agent-action"),
    path("sessions/<uuid:pk>/", session.detail, name="session"),
    path("sessions/<uuid:pk>/tasks/<uuid:task>/", session.task_panel, name="task"),
    path("sessions/<uuid:pk>/<str:action>/", session.action, name="session-action"),
]
