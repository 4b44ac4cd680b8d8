import random
import time

from orchestrator_project.redis_client import redis_client

from . import TaskAborted, TaskContext, TaskFailed, TransientError


class ScriptedExecutor:
    """A simulator for demos, tests and benchmarks. Its results always say they are simulated.

    Task params override the agent's defaults: duration_s (seconds to sleep), fail_rate (0..1,
    the chance of a business failure) and output (the text to return). transient_failures: N
    makes the first N attempts raise a transient error, to exercise retries with backoff.
    count_side_effect: true makes a completed run add 1 to its task's counter in Redis
    (side_effects_of), the observable effect the reliability tests count: exactly one per task.
    """

    kind = "scripted"

    def __init__(self, duration_s: float = 0.0, fail_rate: float = 0.0, output: str = "") -> None:
        self.defaults = {"duration_s": duration_s, "fail_rate": fail_rate, "output": output}

    def execute(self, ctx: TaskContext) -> dict:
        if ctx.attempt <= int(ctx.params.get("transient_failures", 0)):
            raise TransientError(f"simulated transient error on attempt {ctx.attempt}")
        settings = {**self.defaults, **{k: v for k, v in ctx.params.items() if k in self.defaults}}
        duration = float(settings["duration_s"])
        deadline = time.monotonic() + duration
        while (left := deadline - time.monotonic()) > 0:
            if ctx.should_abort():
                raise TaskAborted(f"{ctx.key} aborted after {duration - left:.1f}s")
            time.sleep(min(left, 0.2))
        if random.random() < float(settings["fail_rate"]):
            raise TaskFailed(f"simulated failure of {ctx.key} (fail_rate={settings['fail_rate']})")
        if ctx.params.get("count_side_effect"):
            key = side_effects_key(ctx.session_id)
            redis_client().pipeline().hincrby(key, ctx.key, 1).expire(key, 24 * 3600).execute()
        output = settings["output"] or f"simulated {ctx.capability} for {ctx.title!r}"
        return {"output": output, "simulated": True, "duration_s": duration}


def side_effects_key(session_id) -> str:
    return f"scripted:side-effects:{session_id}"


def side_effects_of(session_id) -> dict[str, int]:
    """How many times each task of the session completed a run that counts its side effect."""
    counts = redis_client().hgetall(side_effects_key(session_id))
    return {key.decode(): int(n) for key, n in counts.items()}
