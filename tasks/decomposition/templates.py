"""Decomposition templates: each is a DAG of steps with PERT estimates, turned into task specs for
a particular set of requirements.

A step marked `when=<concern>` is included only if the requirements raise that concern (a security
review when they mention authentication, a frontend task when they mention a page). When a step is
left out, its dependents inherit its upstreams, so the DAG stays connected.

Estimates are hours at medium complexity; `build_task_specs` scales them by the analysed
complexity. The shapes (fan-out after the design, fan-in before the verification) are documented
in docs/DECOMPOSITION.md.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from .analyzer import HIGH, LOW, MEDIUM, Analysis

# How much longer work of each complexity takes than a medium one, and how much more uncertain
# it is: the pessimistic estimate of complex work stretches further than the others.
COMPLEXITY_SCALE = {LOW: 0.6, MEDIUM: 1.0, HIGH: 1.75}
PESSIMISTIC_STRETCH = {LOW: 1.0, MEDIUM: 1.0, HIGH: 1.3}
QUOTED_POINTS = 5


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    capability: str
    hours: tuple[float, float, float]  # PERT optimistic, most likely, pessimistic, at medium complexity
    focus: str
    depends_on: tuple[str, ...] = ()
    required: bool = True
    concerns: tuple[str, ...] = ()  # requirement sentences on these concerns are quoted to the agent
    when: str | None = None  # include only if the requirements raise this concern


DOCS_FOCUS = (
    "Update the user-facing and developer documentation for what changed; optional, the work stands without it."
)

FEATURE = (
    Step("design", "Design the change", "system_design", (1, 2, 4),
         "Turn the requirements into a design: the components touched, interfaces, data changes and the "
         "acceptance criteria the other tasks work to.", concerns=("feature", "architecture", "data")),
    Step("implement", "Implement the backend", "code_generation", (3, 6, 12),
         "Implement the server-side change following the design.", ("design",), concerns=("feature", "api", "data")),
    Step("frontend", "Implement the user interface", "code_generation", (2, 4, 8),
         "Implement the user-interface part following the design.", ("design",), concerns=("ui",), when="ui"),
    Step("tests", "Write the tests", "test_generation", (1.5, 3, 6),
         "Write tests from the acceptance criteria: the main path, edge cases and failures.", ("design",),
         concerns=("testing",)),
    Step("verify", "Run the test suite", "testing", (0.5, 1, 2),
         "Run the whole test suite against the implementation and report every failure.",
         ("implement", "frontend", "tests")),
    Step("review", "Review the change", "code_review", (0.5, 1, 2),
         "Review the change for correctness, clarity and fit with the design.", ("verify",)),
    Step("security_review", "Review the security of the change", "security_audit", (1, 2, 4),
         "Check authentication, authorization, input handling and limits in the change.", ("verify",),
         concerns=("security", "compliance"), when="security"),
    Step("performance", "Measure the performance", "performance_analysis", (1, 2, 4),
         "Measure the change under realistic load and report regressions.", ("verify",),
         concerns=("performance", "scaling"), when="performance"),
    Step("docs", "Document the change", "documentation", (0.5, 1, 2), DOCS_FOCUS, ("review",), required=False,
         concerns=("documentation",)),
)  # fmt: skip

BUGFIX = (
    Step("reproduce", "Reproduce the failure", "debugging", (0.5, 1, 3),
         "Reproduce the reported failure reliably and record the exact steps and evidence.",
         concerns=("bug", "investigation")),
    Step("root_cause", "Find the root cause", "root_cause_analysis", (1, 2, 6),
         "Find why it fails, not only where; name the faulty assumption.", ("reproduce",),
         concerns=("bug", "investigation")),
    Step("regression_test", "Write a failing regression test", "test_generation", (0.5, 1, 2),
         "Write a test that fails now because of this bug and will pass once it is fixed.", ("reproduce",),
         concerns=("testing", "bug")),
    Step("fix", "Fix the bug", "bug_fixing", (1, 2, 5),
         "Fix the root cause with the smallest change that is clearly right.", ("root_cause",), concerns=("bug",)),
    Step("verify", "Run the test suite", "testing", (0.5, 1, 2),
         "Run the regression test and the whole suite against the fix.", ("fix", "regression_test")),
    Step("review", "Review the fix", "code_review", (0.5, 1, 2),
         "Review the fix and the test; look for the same mistake elsewhere.", ("verify",)),
    Step("release_note", "Write the release note", "documentation", (0.25, 0.5, 1),
         "Describe the bug, who was affected and the fix, for the changelog.", ("fix",), required=False),
)  # fmt: skip

REFACTOR = (
    Step("assess", "Map the code to change", "code_review", (1, 2, 4),
         "Map the code in scope, its callers and the smells to remove.", concerns=("refactoring",)),
    Step("plan", "Plan the refactoring", "architecture_planning", (1, 2, 4),
         "Plan the target structure and a sequence of small, behaviour-preserving steps.", ("assess",),
         concerns=("refactoring", "architecture")),
    Step("characterize", "Pin the current behaviour with tests", "test_generation", (1, 2, 4),
         "Write characterization tests that pin today's behaviour before anything moves.", ("assess",),
         concerns=("testing",)),
    Step("refactor", "Refactor", "refactoring", (3, 6, 12),
         "Carry out the plan; behaviour must not change.", ("plan", "characterize"),
         concerns=("refactoring", "performance")),
    Step("verify", "Run the test suite", "testing", (0.5, 1, 2),
         "Run the characterization tests and the whole suite; any difference is a bug.", ("refactor",)),
    Step("performance", "Compare performance before and after", "performance_analysis", (1, 2, 4),
         "Measure before and after; report any regression.", ("refactor",), concerns=("performance",),
         when="performance"),
    Step("review", "Review the refactoring", "code_review", (0.5, 1, 2),
         "Review that the structure matches the plan and behaviour is unchanged.", ("verify", "performance")),
    Step("docs", "Update the developer docs", "documentation", (0.5, 1, 2), DOCS_FOCUS, ("review",),
         required=False),
)  # fmt: skip

CRUD_API = (
    Step("contract", "Design the resource and its API contract", "system_design", (1, 2, 4),
         "Define the resource's fields, validation rules, URLs, status codes and errors.",
         concerns=("api", "data")),
    Step("model", "Add the data model and migration", "code_generation", (1, 2, 3),
         "Add the model, its constraints and indexes, and the migration.", ("contract",), concerns=("data",)),
    Step("serializers", "Write validation and serialization", "code_generation", (1, 2, 4),
         "Write the input validation and output representation from the contract.", ("contract",),
         concerns=("api",)),
    Step("tests", "Write the API tests", "test_generation", (1.5, 3, 6),
         "Write tests for create, list, retrieve, update and delete, including bad input and permissions.",
         ("contract",), concerns=("testing", "api")),
    Step("endpoints", "Implement the endpoints", "code_generation", (2, 4, 8),
         "Implement list, create, retrieve, update and delete with pagination and permissions.",
         ("model", "serializers"), concerns=("api",)),
    Step("verify", "Run the test suite", "testing", (0.5, 1, 2),
         "Run the API tests and the whole suite.", ("endpoints", "tests")),
    Step("security_review", "Review access control", "security_audit", (0.5, 1, 2),
         "Check authentication, object-level permissions and input limits on every endpoint.", ("endpoints",),
         concerns=("security",), when="security"),
    Step("review", "Review the API", "code_review", (0.5, 1, 2),
         "Review the API against the contract.", ("verify", "security_review")),
    Step("docs", "Document the API", "documentation", (0.5, 1, 2),
         "Document every endpoint with examples (OpenAPI descriptions and a short guide).", ("endpoints",),
         required=False, concerns=("documentation",)),
)  # fmt: skip

MICROSERVICE = (
    Step("architecture", "Define the service boundary", "architecture_planning", (2, 4, 8),
         "Define what the service owns, its API, its data and how it talks to the others.",
         concerns=("architecture", "api", "data")),
    Step("scaffold", "Scaffold the service", "code_generation", (1, 2, 4),
         "Create the service skeleton: project layout, health endpoint, build.", ("architecture",)),
    Step("configuration", "Configure the service", "configuration", (0.5, 1, 2),
         "Define configuration and secrets per environment.", ("architecture",), concerns=("deployment",)),
    Step("contract_tests", "Write contract tests", "test_generation", (1, 2, 4),
         "Write tests of the service's API contract and its calls to other services.", ("architecture",),
         concerns=("testing",)),
    Step("implement", "Implement the service", "code_generation", (4, 8, 16),
         "Implement the service's behaviour.", ("scaffold",), concerns=("feature", "api", "data")),
    Step("deploy", "Package and deploy", "deployment", (1, 2, 4),
         "Build the container image and the deployment manifests; deploy to a test environment.",
         ("implement", "configuration"), concerns=("deployment",)),
    Step("monitoring", "Add monitoring", "monitoring", (0.5, 1, 2),
         "Add metrics, health checks and alerts for the service.", ("implement",), concerns=("monitoring",)),
    Step("verify", "Run the test suite", "testing", (0.5, 1, 2),
         "Run the contract tests and the service's suite.", ("implement", "contract_tests")),
    Step("scaling", "Plan scaling", "scaling", (0.5, 1, 3),
         "Set resource limits, replicas and autoscaling from measured load.", ("deploy",),
         concerns=("scaling", "performance"), when="scaling"),
    Step("review", "Review the service", "code_review", (1, 2, 3),
         "Review the code, the deployment and the monitoring together.", ("verify", "deploy", "monitoring", "scaling")),
    Step("docs", "Write the runbook", "documentation", (0.5, 1, 2),
         "Write the service's README and runbook.", ("review",), required=False),
)  # fmt: skip

SECURITY_HARDENING = (
    Step("threat_model", "Model the threats", "security_audit", (1, 2, 4),
         "List the assets, entry points and attackers; rank the threats.", concerns=("security",)),
    Step("audit", "Audit the code", "security_audit", (2, 3, 6),
         "Audit the code for the ranked threats and list findings with severity.", ("threat_model",),
         concerns=("security",)),
    Step("configuration", "Harden the configuration", "configuration", (0.5, 1, 2),
         "Harden settings, headers, secrets handling and dependencies.", ("threat_model",),
         concerns=("security", "deployment")),
    Step("compliance", "Check compliance", "compliance_check", (1, 2, 4),
         "Check the requirements' compliance obligations and record the evidence.", ("threat_model",),
         concerns=("compliance",), when="compliance"),
    Step("remediate", "Fix the findings", "bug_fixing", (2, 4, 8),
         "Fix every finding of high or medium severity.", ("audit",), concerns=("security", "bug")),
    Step("security_tests", "Write security tests", "test_generation", (1, 2, 4),
         "Write a test per finding that proves the attack no longer works.", ("audit",),
         concerns=("testing", "security")),
    Step("verify", "Run the test suite", "testing", (0.5, 1, 2),
         "Run the security tests and the whole suite.", ("remediate", "security_tests", "configuration")),
    Step("review", "Review the hardening", "code_review", (0.5, 1, 2),
         "Review the fixes and confirm every finding is closed.", ("verify", "compliance")),
    Step("docs", "Write the security notes", "documentation", (0.5, 1, 2),
         "Record the threat model, the findings and what was done.", ("review",), required=False),
)  # fmt: skip

DOCUMENTATION = (
    Step("survey", "Survey what exists", "requirements_analysis", (0.5, 1, 2),
         "Survey the existing docs and code, and who reads them.", concerns=("documentation",)),
    Step("outline", "Outline the documents", "task_decomposition", (0.5, 1, 2),
         "Outline every document and section to write.", ("survey",), concerns=("documentation",)),
    Step("reference", "Write the reference", "documentation", (1, 3, 6),
         "Write the reference part: every option, endpoint or command, exactly.", ("outline",),
         concerns=("documentation", "api")),
    Step("guide", "Write the guides", "documentation", (1, 3, 6),
         "Write task-oriented guides for the common jobs.", ("outline",), concerns=("documentation",)),
    Step("examples", "Write runnable examples", "code_generation", (1, 2, 4),
         "Write small, runnable examples for the guides.", ("outline",)),
    Step("check_examples", "Run the examples", "testing", (0.25, 0.5, 1),
         "Run every example and fix what does not work as written.", ("examples",)),
    Step("review", "Review for accuracy", "code_review", (0.5, 1, 2),
         "Check every statement against the code.", ("reference", "guide", "check_examples")),
)  # fmt: skip

TEMPLATES: dict[str, tuple[Step, ...]] = {
    "feature": FEATURE,
    "bugfix": BUGFIX,
    "refactor": REFACTOR,
    "crud_api": CRUD_API,
    "microservice": MICROSERVICE,
    "security_hardening": SECURITY_HARDENING,
    "documentation": DOCUMENTATION,
}
TEMPLATE_NAMES = tuple(sorted(TEMPLATES))


def build_task_specs(template: str, analysis: Analysis) -> list[dict]:
    """The template's tasks for these requirements, as create-endpoint task specs plus `estimate`."""
    steps = [step for step in TEMPLATES[template] if step.when is None or step.when in analysis.concerns]
    depends_on = _resolve_dependencies(TEMPLATES[template], {step.key for step in steps})
    quoted = "\n".join(f"> {line}" if line.strip() else ">" for line in analysis.requirements.strip().splitlines())
    return [
        {
            "key": step.key,
            "title": step.title,
            "capability": step.capability,
            "depends_on": depends_on[step.key],
            "required": step.required,
            "instructions": instructions_for(step, template, analysis, quoted, depends_on[step.key]),
            "params": {},
            "estimate": scaled_estimate(step.hours, analysis.complexity),
        }
        for step in steps
    ]


def scaled_estimate(hours: tuple[float, float, float], complexity: str) -> dict[str, float]:
    scale = COMPLEXITY_SCALE[complexity]
    optimistic, likely, pessimistic = (round(h * scale, 2) for h in hours)
    pessimistic = round(pessimistic * PESSIMISTIC_STRETCH[complexity], 2)
    return {"optimistic": optimistic, "likely": likely, "pessimistic": pessimistic}


def instructions_for(step: Step, template: str, analysis: Analysis, quoted: str, upstream: list[str]) -> str:
    """`quoted`: the requirements as a quote block, the same for every step."""
    parts = [
        f"{step.title} (task {step.key!r} of a {template} plan, capability {step.capability}).",
        f"Requirements:\n{quoted}",
        f"Your focus: {step.focus}",
    ]
    points = analysis.sentences_about(step.concerns, limit=QUOTED_POINTS)
    # Picking out every sentence would only repeat the quote above.
    if points and len(points) < analysis.sentence_count:
        parts.append("Points of the requirements that concern this task:\n" + "\n".join(f"- {p}" for p in points))
    if upstream:
        whose = "its" if len(upstream) == 1 else "their"
        parts.append(f"Starts after {', '.join(upstream)}; build on {whose} results.")
    return "\n\n".join(parts)


def _resolve_dependencies(steps: Iterable[Step], included: set[str]) -> dict[str, list[str]]:
    """Each included step's upstreams, with left-out steps replaced by their own upstreams and
    upstreams that another upstream already implies dropped (no redundant edges)."""
    declared = {step.key: step.depends_on for step in steps}

    def included_upstreams(key: str) -> list[str]:
        found: list[str] = []
        for dep in declared[key]:
            found += [dep] if dep in included else included_upstreams(dep)
        return list(dict.fromkeys(found))

    direct = {key: included_upstreams(key) for key in declared if key in included}
    ancestors: dict[str, set[str]] = {}

    def ancestors_of(key: str) -> set[str]:
        if key not in ancestors:
            ancestors[key] = {a for dep in direct[key] for a in (dep, *ancestors_of(dep))}
        return ancestors[key]

    return {
        key: [dep for dep in deps if not any(dep in ancestors_of(other) for other in deps if other != dep)]
        for key, deps in direct.items()
    }
