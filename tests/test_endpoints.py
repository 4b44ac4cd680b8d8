"""Push endpoints cannot reach inside (agents/endpoints.py, docs/SECURITY.md): refused at
registration (400, nothing stored) and again at every push, which goes to the address checked."""

import http.server
import json
import threading

import pytest

from agents.executors import TaskFailed
from agents.executors.eap import EapExecutor
from agents.models import Agent, EapDelivery
from tests.conftest import error_of, member_client
from tests.test_eap import REGISTER, context_for, register, running_task

PUSH = {"name": "ext-push", "capabilities": ["documentation"], "mode": "push"}


@pytest.fixture
def operator(transactional_db):  # the gateway reads the delivery on connections of its own
    return member_client("acme", "olga", role="operator")


@pytest.fixture
def production(settings):
    """What DEBUG=false means for endpoints: https only, and no network trusted beyond the public one."""
    settings.EAP_ENDPOINT_ALLOW_HTTP = False
    settings.EAP_ENDPOINT_ALLOW_NETWORKS = []


@pytest.mark.parametrize(
    ("url", "resolves_to", "why"),
    [
        ("https://10.0.0.5:9200/x", None, "private"),
        ("https://169.254.169.254/latest/meta-data", None, "metadata"),
        ("https://[::1]/x", None, "loopback"),
        ("https://[fd00::1]/x", None, "unique-local"),
        ("https://[::ffff:127.0.0.1]/x", None, "loopback"),
        ("https://100.64.0.1/x", None, "private"),
        ("https://224.0.0.1/x", None, "multicast"),
        ("https://0.0.0.0/x", None, "loopback"),
        ("https://localhost/x", None, "loopback"),
        ("https://inside.example/x", "127.0.0.1", "loopback"),
        ("https://inside.example/x", "192.168.1.20", "private"),
        ("https://nowhere.invalid/x", None, "does not resolve"),
        ("http://agents.example.com/x", "93.184.216.34", "must use https"),
        ("https://user:pw@agents.example.com/x", "93.184.216.34", "credentials"),
        ("https://agents.example.com/x?next=http://10.0.0.5/", "93.184.216.34", "query"),
        ("ftp://agents.example.com/x", "93.184.216.34", "Enter a valid URL"),
    ],
)
def test_an_endpoint_that_could_reach_inside_is_refused_and_nothing_is_stored(
    operator, production, dns, url, resolves_to, why
):
    if resolves_to:
        dns[url.split("//")[1].split("/")[0].split("@")[-1]] = resolves_to

    response = operator.post(REGISTER, {**PUSH, "endpoint_url": url}, format="json")

    error = error_of(response, 400)
    assert "endpoint_url" in error["details"]
    if why not in ("loopback", "private", "metadata", "unique-local", "multicast"):
        assert why in error["message"]
    assert resolves_to is None or resolves_to not in response.content.decode()  # no address leaks
    assert not Agent.objects.filter(name="ext-push").exists()


def test_loopback_is_refused_unless_the_operator_trusts_it(operator, settings):
    settings.EAP_ENDPOINT_ALLOW_NETWORKS = []
    refused = operator.post(REGISTER, {**PUSH, "endpoint_url": "http://127.0.0.1:9/"}, format="json")
    settings.EAP_ENDPOINT_ALLOW_NETWORKS = ["127.0.0.0/8"]
    accepted = operator.post(REGISTER, {**PUSH, "endpoint_url": "http://127.0.0.1:9/"}, format="json")

    assert refused.status_code == 400 and accepted.status_code == 201


def test_metadata_is_refused_even_in_a_trusted_network(operator, settings):
    settings.EAP_ENDPOINT_ALLOW_NETWORKS = ["169.254.0.0/16"]

    response = operator.post(REGISTER, {**PUSH, "endpoint_url": "http://169.254.169.254/"}, format="json")

    assert response.status_code == 400


class _Recorder(http.server.BaseHTTPRequestHandler):
    replies: list = []
    seen: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append({"host": self.headers["Host"], "body": json.loads(body), "headers": dict(self.headers)})
        status, content = self.replies.pop(0)
        self.send_response(status)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.replies, _Recorder.seen = [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], _Recorder
    server.shutdown()


def push_once(operator, dns, port: int):
    dns["agent.test"] = "127.0.0.1"
    register(operator, **{**PUSH, "endpoint_url": f"http://agent.test:{port}/eap"})
    task = running_task()
    return task, EapExecutor().execute


def test_a_push_goes_to_the_checked_address_with_the_host_name_and_a_signed_delivery_id(operator, dns, endpoint):
    port, recorder = endpoint
    recorder.replies = [(200, b'{"status": "completed", "output": "done"}')]
    task, execute = push_once(operator, dns, port)

    result = execute(context_for(task))

    [seen] = recorder.seen
    assert seen["host"] == f"agent.test:{port}"  # the name, though the connection went to 127.0.0.1
    delivery = EapDelivery.objects.get(task=task)
    assert seen["body"]["delivery_id"] == delivery.pk  # inside the signed body
    assert result["output"] == "done"


def test_a_push_is_refused_when_the_name_resolves_inside_by_then(operator, dns, endpoint, settings):
    port, recorder = endpoint
    task, execute = push_once(operator, dns, port)
    settings.EAP_ENDPOINT_ALLOW_NETWORKS = []  # as if agent.test had moved from a public address to 127.0.0.1

    with pytest.raises(TaskFailed, match="its endpoint is refused: the host resolves to a loopback"):
        execute(context_for(task))
    assert recorder.seen == []


def test_a_non_2xx_answer_s_body_never_reaches_the_task(operator, dns, endpoint):
    port, recorder = endpoint
    recorder.replies = [(404, b'{"cluster_name": "es-prod", "secret": "internal-data"}')]
    task, execute = push_once(operator, dns, port)

    with pytest.raises(TaskFailed) as failed:
        execute(context_for(task))

    assert "HTTP 404" in str(failed.value) and "internal-data" not in str(failed.value)
    assert "internal-data" not in EapDelivery.objects.get(task=task).error
