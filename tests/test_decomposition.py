"""The analyzer, the templates and the critical path (docs/DECOMPOSITION.md): pure functions, no database."""

from itertools import pairwise

import pytest

from agents.capabilities import CAPABILITIES
from tasks.dag import DagError, validate_dag
from tasks.decomposition import (
    TEMPLATE_NAMES,
    analyze,
    critical_path,
    edges,
    nodes_from_specs,
    pert_hours,
    plan_session,
    topological_order,
)
from tasks.decomposition.templates import COMPLEXITY_SCALE, PESSIMISTIC_STRETCH, TEMPLATES

# Raises no concern that switches on an optional step, so every template shows its base shape.
NEUTRAL = "Do the work described in the ticket."


def specs_for(template: str, requirements: str = NEUTRAL) -> list[dict]:
    return plan_session(requirements=requirements, template=template).tasks


def dependents(specs: list[dict]) -> dict[str, set[str]]:
    downstream: dict[str, set[str]] = {spec["key"]: set() for spec in specs}
    for spec in specs:
        for dep in spec["depends_on"]:
            downstream[dep].add(spec["key"])
    return downstream


def shape(specs: list[dict]) -> dict:
    downstream = dependents(specs)
    return {
        "roots": {s["key"] for s in specs if not s["depends_on"]},
        "sinks": {key for key, downs in downstream.items() if not downs},
        "fan_out": {key: downs for key, downs in downstream.items() if len(downs) > 1},
        "fan_in": {s["key"]: set(s["depends_on"]) for s in specs if len(s["depends_on"]) > 1},
        "optional": {s["key"] for s in specs if not s["required"]},
    }


# Templates

EXPECTED_SHAPES = {
    "feature": {
        "roots": {"design"},
        "sinks": {"docs"},
        "fan_out": {"design": {"implement", "tests"}},
        "fan_in": {"verify": {"implement", "tests"}},
        "optional": {"docs"},
    },
    "bugfix": {
        "roots": {"reproduce"},
        "sinks": {"review", "release_note"},
        "fan_out": {"reproduce": {"root_cause", "regression_test"}, "fix": {"verify", "release_note"}},
        "fan_in": {"verify": {"fix", "regression_test"}},
        "optional": {"release_note"},
    },
    "refactor": {
        "roots": {"assess"},
        "sinks": {"docs"},
        "fan_out": {"assess": {"plan", "characterize"}},
        "fan_in": {"refactor": {"plan", "characterize"}},
        "optional": {"docs"},
    },
    "crud_api": {
        "roots": {"contract"},
        "sinks": {"review", "docs"},
        "fan_out": {"contract": {"model", "serializers", "tests"}, "endpoints": {"verify", "docs"}},
        "fan_in": {"endpoints": {"model", "serializers"}, "verify": {"endpoints", "tests"}},
        "optional": {"docs"},
    },
    "microservice": {
        "roots": {"architecture"},
        "sinks": {"docs"},
        "fan_out": {
            "architecture": {"scaffold", "configuration", "contract_tests"},
            "implement": {"deploy", "monitoring", "verify"},
        },
        "fan_in": {
            "deploy": {"implement", "configuration"},
            "verify": {"implement", "contract_tests"},
            "review": {"verify", "deploy", "monitoring"},
        },
        "optional": {"docs"},
    },
    "security_hardening": {
        "roots": {"threat_model"},
        "sinks": {"docs"},
        "fan_out": {"threat_model": {"audit", "configuration"}, "audit": {"remediate", "security_tests"}},
        "fan_in": {"verify": {"remediate", "security_tests", "configuration"}},
        "optional": {"docs"},
    },
    "documentation": {
        "roots": {"survey"},
        "sinks": {"review"},
        "fan_out": {"outline": {"reference", "guide", "examples"}},
        "fan_in": {"review": {"reference", "guide", "check_examples"}},
        "optional": set(),
    },
}


def test_the_seven_templates_of_the_design_exist():
    assert set(TEMPLATE_NAMES) == set(EXPECTED_SHAPES) == set(TEMPLATES)


@pytest.mark.parametrize("template", sorted(EXPECTED_SHAPES))
def test_each_template_has_its_fan_out_and_fan_in_shape(template):
    assert shape(specs_for(template)) == EXPECTED_SHAPES[template]


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
@pytest.mark.parametrize("requirements", [NEUTRAL, "Add a login page; make it faster, scale it out, GDPR compliant"])
def test_each_template_yields_a_valid_dag_in_the_create_endpoints_shape(template, requirements):
    specs = specs_for(template, requirements)

    validate_dag(specs)
    for spec in specs:
        assert set(spec) == {
            "key",
            "title",
            "capability",
            "depends_on",
            "required",
            "instructions",
            "params",
            "estimate",
        }
        assert spec["capability"] in CAPABILITIES
        estimate = spec["estimate"]
        assert 0 < estimate["optimistic"] <= estimate["likely"] <= estimate["pessimistic"]
        assert isinstance(spec["required"], bool)
        assert spec["title"] and len(spec["title"]) <= 200


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_every_template_verifies_and_reviews_its_work(template):
    capabilities = {spec["capability"] for spec in specs_for(template)}

    assert {"testing", "code_review"} <= capabilities


def test_template_capabilities_follow_the_kind_of_work():
    def capabilities(template: str) -> set[str]:
        return {spec["capability"] for spec in specs_for(template)}

    assert {"debugging", "root_cause_analysis", "bug_fixing"} <= capabilities("bugfix")
    assert "refactoring" in capabilities("refactor")
    assert {"architecture_planning", "deployment", "configuration", "monitoring"} <= capabilities("microservice")
    assert "security_audit" in capabilities("security_hardening")
    assert "documentation" in capabilities("documentation")
    assert "bug_fixing" not in capabilities("feature")


def test_instructions_quote_the_requirements_and_the_tasks_focus():
    requirements = "Add an export button to the invoices page.\nThe export must be tested with 10k rows."
    specs = {spec["key"]: spec for spec in specs_for("feature", requirements)}

    tests = specs["tests"]["instructions"]
    assert "> Add an export button to the invoices page." in tests
    assert "> The export must be tested with 10k rows." in tests
    assert "Your focus: Write tests" in tests
    assert "- The export must be tested with 10k rows." in tests  # the sentence about testing, picked out
    assert "- Add an export button" in specs["frontend"]["instructions"]  # the one about the page
    assert "Starts after design" in tests
    assert specs["design"]["instructions"] != specs["verify"]["instructions"]


def test_optional_steps_appear_only_when_the_requirements_raise_their_concern():
    plain = {spec["key"]: spec for spec in specs_for("feature", "Add an invoice export")}
    rich = {
        spec["key"]: spec
        for spec in specs_for("feature", "Add an export page behind OAuth login; keep the latency low")
    }

    assert {"frontend", "security_review", "performance"}.isdisjoint(plain)
    assert {"frontend", "security_review", "performance"} <= set(rich)
    assert rich["frontend"]["depends_on"] == ["design"]
    assert rich["verify"]["depends_on"] == ["implement", "frontend", "tests"]
    assert rich["security_review"]["capability"] == "security_audit"
    # Without the frontend, verify does not also get a redundant edge to design.
    assert plain["verify"]["depends_on"] == ["implement", "tests"]


def test_a_left_out_step_hands_its_upstreams_to_its_dependents():
    crud = {spec["key"]: spec for spec in specs_for("crud_api")}
    secured = {spec["key"]: spec for spec in specs_for("crud_api", "CRUD endpoints for invoices with permissions")}

    assert crud["review"]["depends_on"] == ["verify"]
    assert secured["review"]["depends_on"] == ["verify", "security_review"]
    assert secured["security_review"]["depends_on"] == ["endpoints"]


# The analyzer: whole words only


@pytest.mark.parametrize(
    ("requirements", "absent_keywords", "absent_concerns"),
    [
        ("Add a prefix to the cache keys", {"fix"}, {"bug"}),
        ("Strip the suffix from uploaded file names", {"fix"}, {"bug"}),
        ("Trim the préfix of every name", {"fix"}, {"bug"}),
        ("Speed up the build", {"ui"}, {"ui"}),
        ("Guild members can see the build log", {"ui"}, {"ui"}),
        ("Show the author of each post", {"auth"}, {"security"}),
        ("Email the authors a weekly summary", {"auth"}, {"security"}),
        ("Attach the debugger to the worker process", {"debug", "bug"}, {"bug", "investigation"}),
        ("Embed the documentary trailer in the newsletter", {"document", "documentation"}, {"documentation"}),
        ("Show the latest contest results and the attestation", {"test", "tests"}, {"testing"}),
        ("Add a sportsapi client", {"api"}, {"api"}),
    ],
)
def test_keywords_match_whole_words_only(requirements, absent_keywords, absent_concerns):
    analysis = analyze(requirements)

    assert absent_keywords.isdisjoint(analysis.keywords), analysis.keywords
    assert absent_concerns.isdisjoint(analysis.concerns), analysis.concerns


def test_tricky_words_do_not_change_the_template():
    assert analyze("Add a prefix and a suffix to the debugger output").template == "feature"
    assert analyze("Embed the documentary in the author's page").template == "feature"


@pytest.mark.parametrize(
    ("requirements", "keyword", "concern"),
    [
        ("Fix the login bug", "fix", "bug"),
        ("The checkout crashed twice; it was fixed-ish", "fixed", "bug"),
        ("Build the UI for settings", "ui", "ui"),
        ("Use OAuth authentication for the author page", "authentication", "security"),
        ("Document the endpoints", "document", "documentation"),
        ("Debugging the worker takes too long", "debugging", "investigation"),
        ("auth_token must rotate", "auth", "security"),
    ],
)
def test_keywords_match_as_whole_words_and_inflections(requirements, keyword, concern):
    analysis = analyze(requirements)

    assert keyword in analysis.keywords
    assert concern in analysis.concerns


def test_a_phrase_wins_over_the_words_inside_it():
    analysis = analyze("Add regression tests for the parser")

    assert "regression tests" in analysis.keywords
    assert "regression" not in analysis.keywords
    assert analysis.template == "feature"


@pytest.mark.parametrize(
    ("requirements", "template"),
    [
        ("Add per-client rate limiting to the payments API, with tests and docs.", "feature"),
        ("Add dark mode to the settings page", "feature"),
        ("Implement CSV export of invoices", "feature"),
        ("Add a login page with OAuth authentication", "feature"),
        ("Fix the bug where checkout crashes on empty carts", "bugfix"),
        ("The nightly report fails with a traceback since Monday", "bugfix"),
        ("The build is broken", "bugfix"),
        ("Refactor the billing module to remove duplicated code", "refactor"),
        ("Clean up the legacy payment code and pay down technical debt", "refactor"),
        ("Create a REST API with CRUD endpoints for invoices", "crud_api"),
        ("Endpoints to create, read, update and delete customers", "crud_api"),
        ("Extract notifications into a new microservice deployed on Kubernetes", "microservice"),
        ("Harden authentication: fix the XSS vulnerability and add CSRF protection", "security_hardening"),
        ("Make the upload service GDPR compliant", "security_hardening"),
        ("Write documentation for the deployment process in the README", "documentation"),
        ("Add docs for the CLI", "documentation"),
        ("Fix the typos in the README", "documentation"),
        ("Something vague", "feature"),
    ],
)
def test_template_is_inferred_from_typical_requirements(requirements, template):
    assert analyze(requirements).template == template


def test_capabilities_are_inferred_from_the_concerns_in_catalogue_order():
    analysis = analyze("Add rate limiting with tests, a Grafana dashboard, and deploy it with Docker")

    assert set(analysis.capabilities) >= {"security_audit", "test_generation", "testing", "monitoring", "deployment"}
    assert list(analysis.capabilities) == [c for c in CAPABILITIES if c in analysis.capabilities]


# Complexity

SIMPLE = "Add a small health endpoint"
COMPLEX = """Add multi-tenant billing across all regions with zero-downtime migration of the legacy data.
- Each tenant gets a separate invoice numbering with concurrent-safe transactions
- Payments go through the new payment API with OAuth authentication and rate limiting
- Performance must hold at 2,000 requests per second with caching
- Deploy it on Kubernetes with Prometheus monitoring and alerts
- Document the runbook and write integration tests for every failure mode
"""


def test_complexity_reads_length_concerns_and_size_words():
    assert analyze(SIMPLE).complexity == "low"
    assert analyze("Add per-client rate limiting to the payments API, with tests and docs.").complexity == "medium"
    assert analyze(COMPLEX).complexity == "high"


def test_complexity_scales_every_estimate():
    low = {spec["key"]: spec["estimate"] for spec in specs_for("feature", SIMPLE)}
    high = {spec["key"]: spec["estimate"] for spec in specs_for("feature", COMPLEX)}

    for key, small in low.items():
        big = high[key]
        ratio = COMPLEXITY_SCALE["high"] / COMPLEXITY_SCALE["low"]
        assert big["likely"] == pytest.approx(small["likely"] * ratio, rel=0.02)
        assert big["optimistic"] == pytest.approx(small["optimistic"] * ratio, rel=0.02)
        # Complex work is also more uncertain: its pessimistic end stretches further.
        assert big["pessimistic"] == pytest.approx(small["pessimistic"] * ratio * PESSIMISTIC_STRETCH["high"], rel=0.02)


def test_complexity_scales_the_makespan():
    def makespan(requirements: str) -> float:
        return critical_path(nodes_from_specs(specs_for("bugfix", requirements))).hours

    medium = "Fix the crash in the importer when a row has an empty date; add a regression test and document it"

    assert analyze(medium).complexity == "medium"
    assert makespan(SIMPLE) < makespan(medium) < makespan(COMPLEX)


# Critical path, order, makespan


def spec(key: str, hours: tuple[float, float, float], *depends_on: str) -> dict:
    return {
        "key": key,
        "depends_on": list(depends_on),
        "estimate": dict(zip(("optimistic", "likely", "pessimistic"), hours, strict=True)),
    }


def test_expected_duration_is_the_pert_mean():
    assert pert_hours(1, 2, 9) == pytest.approx(3.0)
    assert nodes_from_specs([spec("a", (1, 2, 9))])[0].hours == pytest.approx(3.0)


def test_critical_path_follows_expected_duration_not_hop_count():
    # b -> c -> d has the most hops; a -> d takes the longest.
    specs = [
        spec("a", (8, 10, 12)),
        spec("b", (1, 1, 1)),
        spec("c", (1, 1, 1), "b"),
        spec("d", (1, 1, 1), "a", "c"),
    ]

    path = critical_path(nodes_from_specs(specs))

    assert path.keys == ["a", "d"]
    assert path.hours == pytest.approx(11.0)


def test_critical_path_weighs_pessimistic_estimates():
    # Same most-likely hours; x's long tail makes it the slower branch.
    specs = [
        spec(
            "x",
            (1, 2, 15),
        ),
        spec("y", (2, 2, 3)),
        spec("z", (1, 1, 1), "x", "y"),
    ]

    path = critical_path(nodes_from_specs(specs))

    assert path.keys == ["x", "z"]
    assert path.hours == pytest.approx((1 + 8 + 15) / 6 + 1)


def test_tasks_without_an_estimate_count_one_hour():
    path = critical_path(nodes_from_specs([{"key": "a"}, {"key": "b", "depends_on": ["a"]}]))

    assert (path.keys, path.hours) == (["a", "b"], 2.0)


def test_an_empty_dag_has_an_empty_critical_path():
    assert critical_path([]).keys == []
    assert critical_path([]).hours == 0.0


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_topological_order_puts_every_task_after_its_upstreams(template):
    specs = specs_for(template)
    nodes = nodes_from_specs(specs)

    order = topological_order(nodes)

    assert sorted(order) == sorted(s["key"] for s in specs)
    for upstream, downstream in edges(nodes):
        assert order.index(upstream) < order.index(downstream)


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_critical_path_is_a_chain_of_the_dag_from_a_root(template):
    specs = specs_for(template)
    by_key = {s["key"]: s for s in specs}
    nodes = nodes_from_specs(specs)

    path = critical_path(nodes)

    assert by_key[path.keys[0]]["depends_on"] == []
    for upstream, downstream in pairwise(path.keys):
        assert upstream in by_key[downstream]["depends_on"]
    assert path.hours == pytest.approx(sum(n.hours for n in nodes if n.key in path.keys))
    assert path.hours < sum(n.hours for n in nodes)  # the fan-outs run in parallel


def test_topological_order_of_a_cycle_names_it():
    with pytest.raises(DagError):
        topological_order(nodes_from_specs([spec("a", (1, 1, 1), "b"), spec("b", (1, 1, 1), "a")]))


def test_plan_session_rejects_an_unknown_template_listing_the_known_ones():
    with pytest.raises(DagError) as raised:
        plan_session(requirements="x", template="waterfall")

    assert raised.value.path == "template"
    assert all(name in raised.value.message for name in TEMPLATE_NAMES)


def test_plan_session_keeps_an_explicit_dag_without_a_template():
    tasks = [{"key": "a", "title": "A", "capability": "testing", "depends_on": []}]

    plan = plan_session(requirements="Fix the crash", tasks=tasks)

    assert plan.template == ""
    assert plan.tasks == tasks
    assert plan.analysis.template == "bugfix"


def test_plan_session_refuses_a_template_larger_than_the_task_limit():
    with pytest.raises(DagError) as raised:
        plan_session(requirements="Fix the crash", max_tasks=3)

    assert raised.value.path == "template"
    assert "maximum of 3" in raised.value.message
