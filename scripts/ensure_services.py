"""Make sure PostgreSQL, Redis and (for an amqp:// broker) RabbitMQ answer, and the sandbox's tools
work, before make starts anything.

Starts PostgreSQL, Redis and RabbitMQ if they are installed but stopped, creates the database named
in DATABASE_URL and the RabbitMQ vhost if they are missing, installs the Debian packages it needs
(bubblewrap, socat, rabbitmq-server, prometheus, chromium) when running as root with apt-get, and
otherwise says exactly what to install. Exit code 1 means: not ready.
"""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import amqp
import psycopg
import redis

# A service at one of these is ours to start (and install); anywhere else, only to wait for.
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


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
    if urlparse(url).hostname not in LOCAL_HOSTS:
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
        if parsed.hostname not in (*LOCAL_HOSTS, None):  # None: the local socket
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


def install_packages(packages: list[str], why: str) -> None:
    """apt-get install `packages` when running as root with apt-get (updating the package lists
    once if the first try fails); otherwise fail, saying the command to run."""
    command = f"apt-get install -y {' '.join(packages)}"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        fail(f"{why} needs {', '.join(packages)}. Install with: sudo {command}")
    # Not what they recommend: prometheus would bring the node exporter, a service of its own.
    command = f"apt-get install -y --no-install-recommends {' '.join(packages)}"
    print(f"ensure_services: installing {why}'s packages: {command}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "env": env}
    if subprocess.run(command.split(), check=False, **quiet).returncode != 0:
        subprocess.run(["apt-get", "update"], check=False, **quiet)
        if subprocess.run(command.split(), check=False, **quiet).returncode != 0:
            fail(f"{command} failed; install {', '.join(packages)} for {why}")


def ensure_tools(tools: dict[str, str], why: str) -> None:
    """Every command of `tools` (command -> the Debian package that has it) is on the PATH,
    installing the packages of those that are not."""
    missing = sorted({package for tool, package in tools.items() if not shutil.which(tool)})
    if missing:
        install_packages(missing, why)


SANDBOX_TOOLS = {"bwrap": "bubblewrap", "socat": "socat", "prlimit": "util-linux", "setpriv": "util-linux"}


def ensure_sandbox() -> None:
    """SANDBOX=bwrap (the default) needs bubblewrap, socat and util-linux's prlimit and setpriv,
    and a kernel that lets bwrap make its namespaces."""
    if os.environ.get("SANDBOX", "bwrap") == "none":
        return
    ensure_tools(SANDBOX_TOOLS, "the sandbox (SANDBOX=bwrap)")
    probe = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--unshare-pid", "--unshare-net", "true"]
    if os.geteuid() != 0:
        probe[1:1] = ["--unshare-user"]
    done = subprocess.run(probe, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        fail(
            f"bubblewrap cannot make its namespaces here: {done.stderr.strip()}. Run the workers as root, "
            "or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)."
        )


def rabbitmq_answers(url: str) -> bool:
    """Whether the RabbitMQ of `url` accepts a connection (to its default vhost: ours may not
    exist yet)."""
    parts = urlparse(url)
    connection = amqp.Connection(
        host=f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}",
        userid=unquote(parts.username or "guest"),
        password=unquote(parts.password or "guest"),
        connect_timeout=2,
    )
    try:
        connection.connect()
        return True
    except (OSError, amqp.exceptions.AMQPError):
        return False
    finally:
        with contextlib.suppress(Exception):
            connection.close()


def start_rabbitmq() -> None:
    init_script = Path("/etc/init.d/rabbitmq-server")
    command = [str(init_script), "start"] if init_script.exists() else ["rabbitmq-server", "-detached"]
    subprocess.run(command, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def vhost_of(url: str) -> str:
    path = unquote(urlparse(url).path)
    return path[1:] if len(path) > 1 else "/"


def ensure_rabbitmq(url: str) -> None:
    """RabbitMQ answers at `url` and has its vhost: started if installed and stopped, installed
    when root with apt-get (a local broker only)."""
    if not rabbitmq_answers(url):
        if urlparse(url).hostname not in LOCAL_HOSTS:
            fail(f"RabbitMQ at {urlparse(url).hostname} does not answer; start it or fix CELERY_BROKER_URL.")
        if not shutil.which("rabbitmq-server"):
            install_packages(["rabbitmq-server"], "RabbitMQ (an amqp:// broker)")
        print("ensure_services: starting RabbitMQ", file=sys.stderr)
        start_rabbitmq()
        if not wait_for(lambda: rabbitmq_answers(url), seconds=90):
            fail("RabbitMQ was started but does not accept connections; see /var/log/rabbitmq")
    vhost = vhost_of(url)
    if vhost != "/" and shutil.which("rabbitmqctl"):
        listed = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, check=False)
        if vhost not in listed.stdout.split():
            reset_vhost(url)


def reset_vhost(url: str) -> None:
    """Delete the vhost of `url` with every queue and message in it, and make it again, empty,
    for the URL's user (the tests' clean slate on RabbitMQ, as FLUSHDB is on Redis)."""
    vhost, user = vhost_of(url), unquote(urlparse(url).username or "guest")
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "delete_vhost", vhost], capture_output=True, check=False)
    subprocess.run([*ctl, "add_vhost", vhost], capture_output=True, check=True)
    subprocess.run([*ctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*"], capture_output=True, check=True)


# What the test suite needs besides the services: network namespaces and veths (the partition
# test's hosts), socat to forward the services to them, and Prometheus with promtool (the alert
# rules' tests, and the real Prometheus that scrapes a stack; Debian's package starts no server
# where no init system runs, and the tests start their own), and rabbitmqctl (the tests empty their
# vhost with it before each test, and restart the broker with it: a RabbitMQ that answers is not
# enough).
TEST_TOOLS = {
    "ip": "iproute2",
    "socat": "socat",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "rabbitmqctl": "rabbitmq-server",
}
# The browser tests: Playwright drives Debian's Chromium (never a browser build of its own, which
# would be a download outside the package registries). Its fonts come with it: fontconfig depends
# on fonts-dejavu-core.
BROWSER_TOOLS = {"chromium": "chromium"}


def main(argv: list[str]) -> None:
    """`--tests`: also what `make test` needs, the test hosts' tools, the browser tests' Chromium
    and the RabbitMQ of TEST_AMQP_URL that the broker-dependent tests run on a second time."""
    for_tests = "--tests" in argv
    ensure_sandbox()
    if for_tests:
        ensure_tools(TEST_TOOLS, "the tests' hosts")
        ensure_tools(BROWSER_TOOLS, "the browser tests")
    database_url = os.environ.get("DATABASE_URL", "")
    if database_url.startswith(("postgres://", "postgresql://")):
        ensure_postgres(database_url)
    ensure_redis(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    brokers = [os.environ.get("CELERY_BROKER_URL", "")]
    if for_tests:
        brokers.append(os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/orchestrator_test"))
    for broker in brokers:
        if broker.startswith(("redis://", "rediss://")):
            ensure_redis(broker)
        elif broker.startswith(("amqp://", "amqps://", "pyamqp://")):
            ensure_rabbitmq(broker)


if __name__ == "__main__":
    main(sys.argv[1:])
