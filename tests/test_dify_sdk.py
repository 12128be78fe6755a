"""Dify's official Python SDK (`dify-client` from PyPI, unchanged) drives the simulator over
a real socket: what a real Dify client sends, the simulator must take.

PyPI's newest `dify-client` is 0.1.10; `stop_message` and `get_app_info` came later (0.1.12,
sdks/python-client in langgenius/dify, never published). Those two are sent through the
SDK's own `_send_request`, exactly as 0.1.12's methods send them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from dify_client import ChatClient

USER = "sdk-user"


@pytest.fixture
def client(sim: Any) -> ChatClient:
    sdk = ChatClient("sim-acme-dify-sdk")
    sdk.base_url = sim.url + "/sim/dify/v1"
    return sdk


def events(response: Any) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            yield json.loads(line.removeprefix("data: "))


def stop_message(client: ChatClient, task_id: str, user: str) -> Any:
    # 0.1.12: `self._send_request("POST", f"/chat-messages/{task_id}/stop", {"user": user})`
    return client._send_request("POST", f"/chat-messages/{task_id}/stop", {"user": user})


def get_app_info(client: ChatClient) -> Any:
    # 0.1.12: `self._send_request("GET", "/info")`
    return client._send_request("GET", "/info")


def test_it_streams_stops_and_reads_history_with_the_official_sdk(client, sim):
    query = f"SDK run {uuid.uuid4().hex[:8]} sim:duration=20 sim:chunks=4"
    response = client.create_chat_message(
        inputs={}, query=query, user=USER, response_mode="streaming"
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    stream = events(response)
    first = next(stream)
    assert first["event"] == "message"
    stopped = stop_message(client, first["task_id"], USER)
    assert (stopped.status_code, stopped.json()) == (200, {"result": "success"})
    rest = list(stream)
    assert [e["event"] for e in rest] == ["message_end"]

    # The SDK sends `files: null` when it has no files: the simulator takes it.
    (sent,) = [
        r
        for r in sim.requests("dify")
        if r["path"].endswith("/chat-messages")
        and isinstance(r["body"], dict)
        and r["body"].get("query") == query
    ]
    assert sent["body"] == {
        "inputs": {},
        "query": query,
        "user": USER,
        "response_mode": "streaming",
        "files": None,
    }

    history = client.get_conversation_messages(USER, conversation_id=first["conversation_id"])
    assert history.status_code == 200
    (message,) = history.json()["data"]
    assert message["id"] == first["message_id"]
    assert message["answer"] == first["answer"].strip()  # the partial text, once stopped
    assert message["parent_message_id"] == "00000000-0000-0000-0000-000000000000"


def test_it_answers_the_sdks_blocking_default(client):
    response = client.create_chat_message(
        inputs={}, query="SDK blocking sim:duration=0.1", user=USER
    )
    assert response.status_code == 200
    assert response.json()["answer"].startswith("### SDK blocking")
    follow_up = client.create_chat_message(
        inputs={},
        query="SDK again sim:duration=0.1",
        user=USER,
        conversation_id=response.json()["conversation_id"],
    )
    assert follow_up.json()["conversation_id"] == response.json()["conversation_id"]
    page = client.get_conversation_messages(
        USER, conversation_id=response.json()["conversation_id"], limit=1
    ).json()
    assert page["has_more"] is True
    assert [m["id"] for m in page["data"]] == [follow_up.json()["id"]]  # the newest


def test_it_describes_the_app_and_its_parameters_to_the_sdk(client, sim):
    info = get_app_info(client)
    assert (info.status_code, info.json()["mode"]) == (200, "chat")
    agent = ChatClient("sim-newagent-sdk")
    agent.base_url = client.base_url
    assert get_app_info(agent).json()["mode"] == "agent"
    parameters = client.get_application_parameters(USER)
    assert parameters.status_code == 200
    assert parameters.json()["user_input_form"] == []


def test_it_refuses_the_sdks_bad_key_in_difys_words(sim):
    outsider = ChatClient("app-not-a-sim-key")
    outsider.base_url = sim.url + "/sim/dify/v1"
    r = get_app_info(outsider)
    assert (r.status_code, r.json()["code"]) == (401, "unauthorized")
