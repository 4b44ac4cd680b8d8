"""Hostile repository content: what an agent's command tries against the platform (tests/test_sandbox.py).

`python sandbox_probe.py '<json>'` (or `@file.json`) runs every probe in a child process of its own and prints one
line per probe, `<name>: ALLOWED <detail>` or `<name>: REFUSED <detail>`. The JSON names the
targets: secret (a value to look for in /proc/*/environ), ports, allowed_url, denied_url,
canaries (files or glob patterns to read), outside (a file to write), pid (a platform process), processes,
memory_mb, file_mb; and optionally probes, the names of the probes to run.

Standard library only: it runs inside the sandbox, with whatever Python is there.
"""

import ctypes
import glob
import json
import multiprocessing
import os
import signal
import socket
import sys
import time
import urllib.request


def environ(t):
    for path in glob.glob("/proc/*/environ"):
        try:
            with open(path, "rb") as f:
                if t["secret"].encode() in f.read():
                    return True, f"found in {path}"
        except OSError:
            pass
    return False, f"not in any of {len(glob.glob('/proc/*/environ'))} readable environ files"


def connect(t):
    reached = []
    for port in t["ports"]:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            reached.append(port)
        except OSError as exc:
            last = exc
    return (True, f"connected to {reached}") if reached else (False, f"{last}")


def read_canary(t):
    for path in [found for pattern in t["canaries"] for found in glob.glob(pattern) or [pattern]]:
        try:
            with open(path) as f:
                return True, f"read {path}: {f.read(20)!r}"
        except OSError as exc:
            last = exc
    return False, f"{last.strerror}"


def write_outside(t):
    try:
        with open(t["outside"], "w") as f:
            f.write("written by the probe")
        return True, f"wrote {t['outside']}"
    except OSError as exc:
        return False, exc.strerror


def signal_agent(t):
    try:
        os.kill(t["pid"], 0)
        return True, f"may signal pid {t['pid']}"
    except OSError as exc:
        return False, exc.strerror


def ptrace_agent(t):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, t["pid"], None, None) == 0:  # PTRACE_ATTACH
        time.sleep(0.1)
        libc.ptrace(17, t["pid"], None, None)  # PTRACE_DETACH
        return True, f"attached to pid {t['pid']}"
    return False, os.strerror(ctypes.get_errno())


def fork_bomb(t):
    children = []
    try:
        for _ in range(t["processes"]):
            pid = os.fork()
            if pid == 0:
                time.sleep(1)
                os._exit(0)
            children.append(pid)
        return True, f"forked {len(children)} processes"
    except OSError as exc:
        return False, f"fork {len(children) + 1} failed: {exc.strerror}"
    finally:
        for pid in children:
            os.waitpid(pid, 0)


def memory(t):
    try:
        block = bytearray(t["memory_mb"] * 1024 * 1024)
        return True, f"allocated {len(block) >> 20} MB"
    except MemoryError:
        return False, f"MemoryError allocating {t['memory_mb']} MB"


def disk(t):
    path = "probe-fill.bin"
    try:
        with open(path, "wb") as f:
            for _ in range(t["file_mb"]):
                f.write(b"\0" * (1024 * 1024))
        return True, f"wrote {t['file_mb']} MB"
    except OSError as exc:
        return False, exc.strerror
    finally:
        if os.path.exists(path):
            os.remove(path)


def _get(url, proxy):
    handlers = [urllib.request.ProxyHandler({"http": proxy} if proxy else {})]
    with urllib.request.build_opener(*handlers).open(url, timeout=5) as reply:
        return reply.status


def host_direct(t):
    try:
        return True, f"GET {t['denied_url']} without the proxy: {_get(t['denied_url'], None)}"
    except OSError as exc:
        return False, str(getattr(exc, "reason", exc))


def host_via_proxy(t):
    proxy = os.environ.get("HTTP_PROXY")
    if not proxy:
        return host_direct(t)  # no proxy at all: the direct way is the only way
    try:
        return True, f"GET {t['denied_url']} through the proxy: {_get(t['denied_url'], proxy)}"
    except OSError as exc:
        return False, str(getattr(exc, "reason", exc))


def allowed_host(t):
    """Not an attack: the allowed host must stay reachable, or the refusals above prove nothing."""
    try:
        return True, f"GET {t['allowed_url']}: {_get(t['allowed_url'], os.environ.get('HTTP_PROXY'))}"
    except OSError as exc:
        return False, str(getattr(exc, "reason", exc))


PROBES = {
    f.__name__: f
    for f in (environ, connect, read_canary, write_outside, signal_agent, ptrace_agent, fork_bomb, memory, disk,
              host_direct, host_via_proxy, allowed_host)
}  # fmt: skip


def _child(name, targets, out):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file size limit shows as EFBIG, not a kill
    allowed, detail = PROBES[name](targets)
    out.send((allowed, detail))


def main():
    argument = sys.argv[1]
    if argument.startswith("@"):  # the targets in a file of the repository
        with open(argument[1:]) as f:
            argument = f.read()
    targets = json.loads(argument)
    for name in targets.get("probes") or PROBES:
        receive, send = multiprocessing.Pipe(duplex=False)
        child = multiprocessing.Process(target=_child, args=(name, targets, send))
        child.start()
        child.join(60)
        if receive.poll():
            allowed, detail = receive.recv()
        else:
            child.kill()
            allowed, detail = False, f"the probe died (exit {child.exitcode})"
        print(f"{name}: {'ALLOWED' if allowed else 'REFUSED'} {detail[:100]}", flush=True)


if __name__ == "__main__":
    main()
