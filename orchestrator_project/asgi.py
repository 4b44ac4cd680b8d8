"""The event streams' process (api/stream.py): an ASGI application that serves only them.

Started by gunicorn with uvicorn's worker (the Procfile's `stream`), on a port of its own or
behind the same proxy as the API, which sends it /api/v1/stream/ and /api/v1/sessions/*/stream/.
It keeps only the middleware a stream needs (sessions and authentication for the console's
login; all of it async). Django still gives each request a thread for its synchronous parts
(here: authentication at connect), which stays idle while the stream is open; hence a cap of
streams per user (STREAM_MAX_PER_USER) and a stream's longest life (STREAM_MAX_SECONDS).
"""

import os

import django
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler

from orchestrator_project import telemetry

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_project.settings")
django.setup(set_prefix=False)
settings.ROOT_URLCONF = "api.stream_urls"
settings.MIDDLEWARE = [
    # Tracing's, when gunicorn's post_fork set it up (gunicorn.conf.py).
    *(name for name in settings.MIDDLEWARE if name.startswith("opentelemetry.")),
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
if not os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/"):
    telemetry.setup("stream")
application = ASGIHandler()
