"""OpenTelemetry tracing (docs/OBSERVABILITY.md). Set up after the fork in every process."""


def setup(service: str) -> None:
    """Set up tracing for this process; called once it is the process that will do the work."""
