import os
import shlex
import signal
import subprocess
import tempfile
import time

from django.conf import settings

from agents.sandbox import Sandbox

from . import TaskAborted, TaskContext, TaskFailed


class ShellExecutor:
    """Runs the operator-configured command for the task's capability in the session workspace.

    The command comes only from settings.SHELL_EXECUTOR_COMMANDS, never from API input, but what
    it runs (a repository's tests) is the repository's: it runs in the task's sandbox
    (agents.sandbox), with a scrubbed environment, in its own process group (so a timeout kills
    its children too), and with its output captured to a file and capped.
    """

    kind = "shell"
    _KEPT_ENV = ("PATH", "LANG", "LC_ALL", "VIRTUAL_ENV")

    def __init__(self, commands: dict | None = None, output_limit: int | None = None) -> None:
        self.commands = commands if commands is not None else settings.SHELL_EXECUTOR_COMMANDS
        self.output_limit = output_limit or settings.SHELL_EXECUTOR_OUTPUT_LIMIT

    def execute(self, ctx: TaskContext) -> dict:
        command = self.commands.get(ctx.capability)
        if not command:
            raise TaskFailed(f"no shell command is configured for capability {ctx.capability!r}")
        ctx.workspace.mkdir(parents=True, exist_ok=True)
        env = {k: os.environ[k] for k in self._KEPT_ENV if k in os.environ}
        # No bytecode: what the command leaves in the workspace ends up in the session's diff.
        env.update(HOME=str(ctx.workspace), TMPDIR=tempfile.gettempdir(), CI="true", PYTHONDONTWRITEBYTECODE="1")
        with Sandbox(ctx.workspace) as sandbox, tempfile.TemporaryFile() as sink:
            proc = sandbox.popen(
                shlex.split(command), env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT
            )
            exit_code = self._wait(proc, command, ctx)
            output, truncated = self._read_capped(sink)
            report = sandbox.report()
            limit = sandbox.explain(exit_code)
        result = {
            "command": command,
            "exit_code": exit_code,
            "output": output,
            "output_truncated": truncated,
            "sandbox": report,
        }
        if limit:
            raise TaskFailed(f"{command!r} was stopped by the sandbox: it ran into {limit}", result=result)
        if exit_code != 0:
            refused = (
                f" (the sandbox refused: {', '.join(report['refused_hosts'])})" if report.get("refused_hosts") else ""
            )
            raise TaskFailed(f"{command!r} exited with {exit_code}{refused}: {output[-2000:]}", result=result)
        return result

    def _wait(self, proc: subprocess.Popen, command: str, ctx: TaskContext) -> int:
        """Wait for the command, killing its whole process group on timeout or abort."""
        deadline = time.monotonic() + ctx.timeout_s
        while True:
            try:
                return proc.wait(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if ctx.should_abort() or time.monotonic() >= deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    if ctx.should_abort():
                        raise TaskAborted(f"{command!r} aborted") from None
                    raise TaskFailed(f"{command!r} timed out after {ctx.timeout_s:g}s") from None

    def _read_capped(self, sink) -> tuple[str, bool]:
        size = sink.seek(0, os.SEEK_END)
        sink.seek(max(0, size - self.output_limit))
        # Keep the tail: the end of a test run or lint report is where the verdict is.
        return sink.read().decode("utf-8", errors="replace"), size > self.output_limit
