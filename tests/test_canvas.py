import json

import pytest
from celery import chain
from celery.canvas import Signature, _chain, chord, group
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agents.models import Agent
from sessions.models import Session
from tasks.canvas import build_canvas, in_series, plan_dag
from tasks.messages import task_of_message
from tasks.models import Task
from tenants.models import Tenant


@pytest.mark.parametrize(
    ("edges", "canvas", "released"),
    [
        ({"a": [], "b": ["a"], "c": ["b"]}, ("chain", ["a", "b", "c"]), set()),
        ({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}, ("chain", ["a", ("group", ["b", "c"]), "d"]), set()),
        # Complete bipartite {a, b} -> {c, d} is series-parallel without any single shared node.
        (
            {"a": [], "b": [], "c": ["a", "b"], "d": ["a", "b"]},
            ("chain", [("group", ["a", "b"]), ("group", ["c", "d"])]),
            set(),
        ),
        # Two independent streams joined at the end: a chord whose header is a group of chains.
        (
            {"a": [], "b": [], "c": ["a"], "d": ["b"], "e": ["c", "d"]},
            ("chain", [("group", [("chain", ["a", "c"]), ("chain", ["b", "d"])]), "e"]),
            set(),
        ),
        # The "N" shape (A->C, A->D, B->D) is not series-parallel: the database releases it all.
        ({"A": [], "B": [], "C": ["A"], "D": ["A", "B"]}, None, {"A", "B", "C", "D"}),
        # Canvas up to the non-SP part; it and everything after it are released.
        (
            {"x": [], "A": ["x"], "B": ["x"], "C": ["A"], "D": ["A", "B"], "E": ["C", "D"]},
            "x",
            {"A", "B", "C", "D", "E"},
        ),
        # An independent branch keeps its canvas next to a released non-SP part.
        (
            {"A": [], "B": [], "C": ["A"], "D": ["A", "B"], "p": [], "q": ["p"]},
            ("chain", ["p", "q"]),
            {"A", "B", "C", "D"},
        ),
    ],
    ids=["chain", "diamond", "bipartite", "two-streams", "n-shape", "sp-then-n", "n-beside-chain"],
)
def test_plan_compiles_series_parallel_exactly_and_releases_the_rest(edges, canvas, released):
    plan = plan_dag(edges)

    assert plan.canvas == canvas
    assert plan.released == released


def test_tasks_waiting_on_a_running_task_outside_the_plan_are_released():
    plan = plan_dag({"b": ["running-upstream"], "c": ["b"], "d": []}, blocked={"b"})

    assert plan.canvas == "d" and plan.released == {"b", "c"}


def test_a_long_chain_plans_without_recursion_limits():
    keys = [f"t{i}" for i in range(1500)]

    plan = plan_dag({key: keys[i - 1 : i] for i, key in enumerate(keys)})

    assert plan.canvas == ("chain", keys) and not plan.released


def steps(pattern: str) -> list[Signature]:
    """Signatures in series: "t" a task, "g" a group of two tasks, "G" a group of two chains of
    two, "H" a group of two chains that have a group inside (t, g, t)."""
    made = iter(Signature(f"t{n}", args=(n,)) for n in range(1000))
    step = {
        "t": lambda: next(made),
        "g": lambda: group([next(made), next(made)]),
        "G": lambda: group([chain(next(made), next(made)), chain(next(made), next(made))]),
        "H": lambda: group([chain(next(made), step["g"](), next(made)) for _ in range(2)]),
    }
    return [step[kind]() for kind in pattern]


@pytest.mark.parametrize(
    "pattern",
    ["tt", "tttttt", "tgtt", "ggt", "Gtt", "tgtgtt", "gtgt", "tg", "gGgt", "tGtgt", "tggt", "gtg", "tgg", "ggg",
     "tgtg", "Htt", "tHgHt", "gg"],
)  # fmt: skip
def test_in_series_builds_exactly_what_celerys_chain_builds(pattern):
    parts = steps(pattern)

    assert json.dumps(in_series(list(parts))) == json.dumps(chain(*parts))


@pytest.fixture(autouse=True)
def wide_fleet(db):
    """Room in every tenant's fair share for the widest canvas here (tasks.fairshare): with no
    live agent, a share is a slot or two and a wide canvas is released by the database."""
    Agent.objects.create(
        name="wide", capabilities=["code_generation"], concurrency=100, status=Agent.Status.ONLINE,
        last_heartbeat=timezone.now(),
    )  # fmt: skip


def make_session(edges: dict[str, list[str]], priority: int = 5, slug: str = "acme") -> Session:
    tenant = Tenant.objects.create(slug=slug, name=slug)
    session = Session.objects.create(tenant=tenant, title="t", requirements="r", priority=priority)
    tasks = {
        key: Task.objects.create(session=session, key=key, title=key, capability="code_generation", position=i)
        for i, key in enumerate(edges)
    }
    for key, deps in edges.items():
        tasks[key].depends_on.set([tasks[d] for d in deps])
    return session


def names(signature) -> tuple:
    """What a node is about: a run_task node's task (named in its message id; it has no
    arguments), another node's arguments."""
    if signature.task != "tasks.run_task":
        return signature.args
    assert signature.args == ()
    return (str(task_of_message(signature.id)),)


def flatten(signature) -> list:
    """The canvas as a list of steps, each a list of (task name, the task's id or args, queue)."""
    if isinstance(signature, _chain):
        return [step for task in signature.tasks for step in flatten(task)]
    if isinstance(signature, chord):
        return flatten(group(list(signature.tasks))) + flatten(signature.body)
    if isinstance(signature, group):
        return [[(s.task, names(s), s.options["queue"]) for s in signature.tasks]]
    return [[(signature.task, names(signature), signature.options["queue"])]]


def nodes_with_options(signature) -> list:
    """(task id, options) of every run_task node of a canvas."""
    if isinstance(signature, chord):
        return nodes_with_options(group(list(signature.tasks))) + nodes_with_options(signature.body)
    if isinstance(signature, _chain | group):
        return [node for task in signature.tasks for node in nodes_with_options(task)]
    return [(names(signature), signature.options)] if signature.task == "tasks.run_task" else []


def test_a_diamond_compiles_to_a_chain_with_a_chord_and_finalize(db):
    session = make_session({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]})
    ids = {t.key: str(t.pk) for t in session.tasks.all()}

    canvas, released = build_canvas(session)

    assert released == []
    assert flatten(canvas) == [
        [("tasks.run_task", (ids["a"],), "cap.code_generation")],
        [
            ("tasks.run_task", (ids["b"],), "cap.code_generation"),
            ("tasks.run_task", (ids["c"],), "cap.code_generation"),
        ],
        [("tasks.run_task", (ids["d"],), "cap.code_generation")],
        [("tasks.finalize_session", (str(session.pk),), "orchestrator")],
    ]
    stored = dict(session.tasks.values_list("key", "message_id"))
    assert all(stored.values()) and len(set(stored.values())) == 4


def test_only_chord_members_keep_their_celery_result(db):
    session = make_session({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]})

    keys = {str(t.pk): t.key for t in session.tasks.all()}

    canvas, _ = build_canvas(session)

    # run_task ignores its result unless told otherwise; the chord's header members are.
    kept = {keys[args[0]]: options.get("ignore_result") for args, options in nodes_with_options(canvas)}
    assert kept == {"a": None, "b": False, "c": False, "d": None}


def test_nodes_carry_one_broker_priority_whatever_the_session_priority_and_pinned_queues(db):
    # On queues that tenants share, a session priority would let one tenant's flood overtake
    # another's work (tasks.fairshare); the session's priority orders only its tenant's releases.
    urgent, calm = make_session({"a": []}, priority=9), make_session({"a": []}, priority=0, slug="calm")
    urgent.tasks.update(pinned_agent="gpu-box")

    first, other = build_canvas(urgent)[0].tasks[0], build_canvas(calm)[0].tasks[0]

    assert first.options["priority"] == other.options["priority"] == settings.CELERY_TASK_DEFAULT_PRIORITY
    assert first.options["queue"] == "agent.gpu-box"


def test_a_per_task_deadline_becomes_the_messages_time_limits(db):
    session = make_session({"a": []})
    session.tasks.update(timeout_seconds=30)

    canvas, _ = build_canvas(session)

    assert canvas.tasks[0].options["soft_time_limit"] == 30 and canvas.tasks[0].options["time_limit"] == 90


def test_released_tasks_are_marked_and_get_no_canvas_node(db):
    session = make_session({"A": [], "B": [], "C": ["A"], "D": ["A", "B"]})

    canvas, released = build_canvas(session)

    assert canvas is None
    assert sorted(t.key for t in released) == ["A", "B", "C", "D"]
    assert not session.tasks.filter(via_canvas=True).exists()


def test_finished_tasks_are_left_out_of_a_resumed_canvas(db):
    session = make_session({"a": [], "b": ["a"], "c": ["b"]})
    session.tasks.filter(key="a").update(status=Task.Status.COMPLETED)
    ids = {t.key: str(t.pk) for t in session.tasks.all()}

    canvas, _ = build_canvas(session)

    assert [step[0][1] for step in flatten(canvas)[:-1]] == [(ids["b"],), (ids["c"],)]


def test_nothing_left_to_run_compiles_to_nothing(db):
    session = make_session({"a": []})
    session.tasks.update(status=Task.Status.COMPLETED)

    assert build_canvas(session) == (None, [])


def test_compiling_costs_the_same_queries_for_any_number_of_tasks(db):
    def queries_to_compile(session: Session) -> int:
        with CaptureQueriesContext(connection) as captured:
            canvas, _ = build_canvas(session)
        assert canvas is not None
        return len(captured)

    small = queries_to_compile(make_session({"a": [], "b": ["a"]}))
    wide = {"root": [], **{f"m{n}": ["root"] for n in range(12)}, "sink": [f"m{n}" for n in range(12)]}
    large = queries_to_compile(make_session(wide, slug="wide"))

    assert large == small
