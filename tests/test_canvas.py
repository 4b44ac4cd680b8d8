from celery.canvas import _chain, chord, group

from sessions.models import Session
from tasks.canvas import build_canvas
from tasks.models import Task
from tenants.models import Tenant


def make_session(edges: dict[str, list[str]], priority: int = 5) -> Session:
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    session = Session.objects.create(tenant=tenant, title="t", requirements="r", priority=priority)
    tasks = {
        key: Task.objects.create(session=session, key=key, title=key, capability="code_generation", position=i)
        for i, key in enumerate(edges)
    }
    for key, deps in edges.items():
        tasks[key].depends_on.set([tasks[d] for d in deps])
    return session


def flatten(signature) -> list:
    """The canvas as a list of steps, each a list of (task name, args, queue)."""
    if isinstance(signature, _chain):
        return [step for task in signature.tasks for step in flatten(task)]
    if isinstance(signature, chord):
        return flatten(group(list(signature.tasks))) + flatten(signature.body)
    if isinstance(signature, group):
        return [[(s.task, s.args, s.options["queue"]) for s in signature.tasks]]
    return [[(signature.task, signature.args, signature.options["queue"])]]


def test_a_diamond_compiles_to_a_chain_with_a_chord_and_finalize(db):
    session = make_session({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]})
    ids = {t.key: str(t.pk) for t in session.tasks.all()}

    steps = flatten(build_canvas(session))

    assert steps == [
        [("tasks.run_task", (ids["a"],), "cap.code_generation")],
        [
            ("tasks.run_task", (ids["b"],), "cap.code_generation"),
            ("tasks.run_task", (ids["c"],), "cap.code_generation"),
        ],
        [("tasks.run_task", (ids["d"],), "cap.code_generation")],
        [("tasks.finalize_session", (str(session.pk),), "orchestrator")],
    ]


def test_nodes_carry_the_session_priority_inverted_for_redis(db):
    session = make_session({"a": []}, priority=9)

    canvas = build_canvas(session)

    assert {s.options["priority"] for s in canvas.tasks} == {0}


def test_finished_tasks_are_left_out_of_a_resumed_canvas(db):
    session = make_session({"a": [], "b": ["a"], "c": ["b"]})
    session.tasks.filter(key="a").update(status=Task.Status.COMPLETED)
    ids = {t.key: str(t.pk) for t in session.tasks.all()}

    steps = flatten(build_canvas(session))

    assert [step[0][1] for step in steps[:-1]] == [(ids["b"],), (ids["c"],)]


def test_nothing_left_to_run_compiles_to_nothing(db):
    session = make_session({"a": []})
    session.tasks.update(status=Task.Status.COMPLETED)

    assert build_canvas(session) is None
