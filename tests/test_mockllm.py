"""The mock LLM on its own: what opencode will see from it (tests/test_opencode.py drives the real
opencode against it)."""

import json
import socket
import subprocess
import sys

import httpx
import pytest

from mockllm import MockLLM, load_script
from tests.conftest import ROOT, wait_until

TOOLS = [{"type": "function", "function": {"name": "write", "parameters": {}}}]
SYSTEM = {"role": "system", "content": "<env>\n  Working directory: /work/project\n</env>"}


@pytest.fixture
def mock():
    llm = MockLLM().start()
    yield llm
    llm.stop()


def chunks(response: httpx.Response) -> list:
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def chat(mock: MockLLM, messages: list[dict], *, tools=TOOLS, stream=True) -> httpx.Response:
    body = {"model": "mock-model", "messages": messages, "stream": stream}
    if tools:
        body["tools"] = tools
    return httpx.post(f"{mock.base_url}/chat/completions", json=body, timeout=10)


def test_a_write_step_streams_a_write_tool_call_then_done_and_then_the_next_text(mock):
    mock.set_script([{"when": "WRITE", "write": {"path": "hello.txt", "content": "hi\n"}, "then": "All done."}])
    user = {"role": "user", "content": [{"type": "text", "text": "Please WRITE it"}]}

    first = chunks(chat(mock, [SYSTEM, user]))

    assert first[-1] == "[DONE]"
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in first[:-1]
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert [c["function"]["name"] for c in calls] == ["write"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"filePath": "/work/project/hello.txt", "content": "hi\n"}
    assert [c["choices"][0]["finish_reason"] for c in first[:-1] if c["choices"]][-1] == "tool_calls"
    assert next(c["usage"] for c in first[:-1] if not c["choices"])["prompt_tokens"] > 0

    tool_result = {"role": "tool", "tool_call_id": calls[0]["id"], "content": "Wrote file successfully."}
    second = chunks(chat(mock, [SYSTEM, user, {"role": "assistant", "tool_calls": calls}, tool_result]))

    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in second[:-1] if c["choices"])
    assert text == "All done."
    assert [r.step["when"] for r in mock.tool_requests()] == ["WRITE", "WRITE"]


def test_the_stream_ends_by_closing_the_connection(mock):
    mock.set_script([{"text": "hello"}])
    body = json.dumps({"model": "m", "stream": True, "tools": TOOLS, "messages": [{"role": "user", "content": "x"}]})
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    with socket.create_connection(("127.0.0.1", mock.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):  # only EOF ends this loop; a kept-alive socket would time out
            received += chunk
    assert received.rstrip().endswith(b"data: [DONE]")


def test_a_request_without_tools_is_a_title_request(mock):
    mock.set_script([{"when": "x", "fail": 500}])

    response = chat(mock, [{"role": "user", "content": "x"}], tools=None, stream=False)

    assert response.json()["choices"][0]["message"]["content"] == "Mock session"
    assert mock.tool_requests() == []


def test_a_fail_step_answers_with_the_status_and_an_openai_error_body(mock):
    mock.set_script([{"when": "FAIL", "fail": {"status": 400, "message": "model mock-model does not exist"}}])

    response = chat(mock, [{"role": "user", "content": "FAIL now"}])

    assert response.status_code == 400
    assert response.json()["error"]["message"] == "model mock-model does not exist"


def test_unnamed_steps_are_consumed_in_order_then_the_default_text(mock):
    mock.set_script([{"text": "first"}, {"text": "second"}])
    texts = []
    for _ in range(3):
        reply = chat(mock, [{"role": "user", "content": "anything"}], stream=False).json()
        texts.append(reply["choices"][0]["message"]["content"])
    assert texts == ["first", "second", "OK."]


def test_a_tool_step_and_non_streaming_tool_calls(mock):
    mock.set_script([{"when": "RUN", "tool": "bash", "args": {"command": "ls"}}])

    reply = chat(mock, [{"role": "user", "content": "RUN ls"}], stream=False).json()["choices"][0]

    assert reply["finish_reason"] == "tool_calls"
    assert reply["message"]["tool_calls"][0]["function"] == {"name": "bash", "arguments": '{"command": "ls"}'}


def test_a_forever_stream_keeps_streaming_until_the_server_stops(mock):
    mock.set_script([{"text": "tick", "forever": True}])
    received = []
    with httpx.stream(
        "POST",
        f"{mock.base_url}/chat/completions",
        json={"stream": True, "tools": TOOLS, "messages": [{"role": "user", "content": "go"}]},
        timeout=10,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                received.append(line)
            if len(received) == 50:
                break
    assert len(received) == 50  # far more chunks than the one word of text


def test_models_are_listed(mock):
    assert httpx.get(f"{mock.base_url}/models").json()["data"][0]["id"] == "mock-model"


def test_a_step_needs_exactly_one_action(tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        MockLLM([{"when": "x", "text": "a", "fail": 400}])
    path = tmp_path / "steps.json"
    path.write_text(json.dumps([{"when": "HI", "text": "hello"}]))
    assert load_script(path) == [{"when": "HI", "text": "hello"}]


def test_the_command_line_serves_a_script_and_prints_the_opencode_config(tmp_path):
    path = tmp_path / "steps.json"
    path.write_text(json.dumps([{"when": "HI", "text": "hello from the script"}]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mockllm", "--port", "0", "--script", str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().split()[-1]
        config = json.loads(proc.stdout.readline().split("=", 1)[1].strip("'\n"))
        assert config["provider"]["mock"]["options"]["baseURL"] == url
        reply = wait_until(
            lambda: httpx.post(
                f"{url}/chat/completions", json={"tools": TOOLS, "messages": [{"role": "user", "content": "HI"}]}
            ).json()
        )
        assert reply["choices"][0]["message"]["content"] == "hello from the script"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
