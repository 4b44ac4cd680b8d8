"""The capabilities: what an agent can do and what a task needs, one Celery queue each."""

CAPABILITIES = (
    "requirements_analysis",
    "system_design",
    "architecture_planning",
    "task_decomposition",
    "code_generation",
    "test_generation",
    "testing",
    "documentation",
    "refactoring",
    "code_review",
    "security_audit",
    "performance_analysis",
    "compliance_check",
    "debugging",
    "bug_fixing",
    "troubleshooting",
    "root_cause_analysis",
    "optimization",
    "deployment",
    "configuration",
    "monitoring",
    "scaling",
)


def capability_queue(capability: str) -> str:
    return f"cap.{capability}"


# Every EAP gateway also consumes this queue: tasks pinned to one external agent wait here, and
# whichever gateway takes one hands it to that agent only.
EAP_PINNED_QUEUE = "eap.pinned"
