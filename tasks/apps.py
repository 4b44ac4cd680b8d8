from django.apps import AppConfig


class TasksConfig(AppConfig):
    name = "tasks"

    def ready(self) -> None:
        # Every process registers the Celery tasks at startup, the web's too: the engine sends
        # them by name (tasks/messages.py), and a name resolves to its task, with the task's own
        # options, only once the task is registered. Imported here, in ready(), because the
        # module needs the models loaded.
        from . import tasks  # noqa: F401
