"""Make sure PostgreSQL and Redis answer, and the sandbox's tools work, before make starts anything.

Starts PostgreSQL and Redis if they are installed but stopped, creates the database named in
DATABASE_URL if it is missing, installs the sandbox's Debian packages (bubblewrap, socat) when
running as root with apt-get, and otherwise says exactly what to install. Exit code 1 means: not
ready.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import psycopg
import redis


def fail(message: str) -> None:
    print(f"ensure_services: {message}", file=sys.stderr)
    sys.exit(1)


def wait_for(check, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def ensure_redis(url: str) -> None:
    if redis_answers(url):
        return
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        fail(f"Redis at {url} does not answer; start it or fix REDIS_URL.")
    if not shutil.which("redis-server"):
        fail("Redis is not installed. Install it with: sudo apt-get install -y redis-server")
    print("ensure_services: starting redis-server", file=sys.stderr)
    Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
    Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
    port = str(urlparse(url).port or 6379)
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            port,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        ],
        check=False,
    )
    if not wait_for(lambda: redis_answers(url)):
        fail(f"redis-server was started but {url} still does not answer; see /var/log/redis/ci.log")


def postgres_answers(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
        return True
    except psycopg.OperationalError as exc:
        return "does not exist" in str(exc)  # the server answers; only the database is missing


def ensure_postgres(url: str) -> None:
    parsed = urlparse(url)
    admin_dsn = parsed._replace(path="/postgres").geturl()
    if not postgres_answers(admin_dsn):
        if parsed.hostname not in ("127.0.0.1", "localhost", "::1", None):
            fail(f"PostgreSQL at {parsed.hostname} does not answer; start it or fix DATABASE_URL.")
        clusters = Path("/etc/postgresql")
        if not shutil.which("pg_ctlcluster") or not clusters.is_dir():
            fail("PostgreSQL is not installed. Install it with: sudo apt-get install -y postgresql")
        print("ensure_services: starting PostgreSQL", file=sys.stderr)
        for version in sorted(p.name for p in clusters.iterdir()):
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=False)
        if not wait_for(lambda: postgres_answers(admin_dsn)):
            fail("PostgreSQL was started but does not accept connections; check its log in /var/log/postgresql")
    name = parsed.path.lstrip("/")
    if not re.fullmatch(r"[A-Za-z0-9_]{1,63}", name):
        fail(f"database name {name!r} in DATABASE_URL: use letters, digits and underscores")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            print(f"ensure_services: creating database {name}", file=sys.stderr)
            conn.execute(f'CREATE DATABASE "{name}"')


SANDBOX_TOOLS = {"bwrap": "bubblewrap", "socat": "socat", "prlimit": "util-linux", "setpriv": "util-linux"}


def ensure_sandbox() -> None:
    """SANDBOX=bwrap (the default) needs bubblewrap, socat and util-linux's prlimit and setpriv,
    and a kernel that lets bwrap make its namespaces."""
    if os.environ.get("SANDBOX", "bwrap") == "none":
        return
    missing = sorted({package for tool, package in SANDBOX_TOOLS.items() if not shutil.which(tool)})
    command = f"apt-get install -y {' '.join(missing)}"
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"ensure_services: installing the sandbox's packages: {command}", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "env": env}
        if subprocess.run(command.split(), check=False, **quiet).returncode != 0:
            subprocess.run(["apt-get", "update"], check=False, **quiet)
            subprocess.run(command.split(), check=False, **quiet)
        missing = sorted({package for tool, package in SANDBOX_TOOLS.items() if not shutil.which(tool)})
    if missing:
        fail(f"the sandbox (SANDBOX=bwrap) needs {', '.join(missing)}. Install with: sudo {command}")
    probe = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--unshare-pid", "--unshare-net", "true"]
    if os.geteuid() != 0:
        probe[1:1] = ["--unshare-user"]
    done = subprocess.run(probe, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        fail(
            f"bubblewrap cannot make its namespaces here: {done.stderr.strip()}. Run the workers as root, "
            "or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)."
        )


def main() -> None:
    ensure_sandbox()
    database_url = os.environ.get("DATABASE_URL", "")
    if database_url.startswith(("postgres://", "postgresql://")):
        ensure_postgres(database_url)
    ensure_redis(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    broker = os.environ.get("CELERY_BROKER_URL", "")
    if broker.startswith("redis://"):
        ensure_redis(broker)


if __name__ == "__main__":
    main()
