import os

from django.core.wsgi import get_wsgi_application

from orchestrator_project import telemetry

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_project.settings")
# gunicorn sets up tracing in each worker after its fork (gunicorn.conf.py post_fork), and its
# master may import this module before forking (--preload); any other server (runserver) is the
# process that serves.
if not os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/"):
    telemetry.setup("web")
application = get_wsgi_application()
