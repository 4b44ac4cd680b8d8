import random
import time

from . import TaskAborted, TaskContext, TaskFailed, TransientError


class ScriptedExecutor:
    """A simulator for demos, tests and benchmarks. Its results always say they are simulated.

    Task params override the agent's defaults: duration_s (seconds to sleep), fail_rate (0..1,
    the chance of a business failure) and output (the text to return). transient_failures: N
    makes the first N attempts raise a transient error, to exercise retries with backoff.
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
        output = settings["output"] or f"simulated {ctx.capability} for {ctx.title!r}"
        return {"output": output, "simulated": True, "duration_s": duration}
