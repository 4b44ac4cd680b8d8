from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    """The web console (docs/CONSOLE.md): server-rendered pages over the data the engine keeps,
    updated live from the event streams (api/stream.py)."""

    name = "console"
