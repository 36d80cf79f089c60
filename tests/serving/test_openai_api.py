"""The OpenAI-compatible API of a real SGLang server serving the bundled model, driven by the
official `openai` client: chat, tool calls (named, required, auto), the tool result fed back,
streaming, and malformed requests."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from agentserve.demo import WEATHER_TOOL, run_conversation

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def client(plain_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=plain_server.url + "/v1", api_key="x", max_retries=0, timeout=300)


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="default", temperature=0, max_tokens=24,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    text = r.choices[0].message.content or ""
    assert "Paris" in text
    assert r.usage.completion_tokens > 0


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_call_round_trip(client: openai.OpenAI, tool_choice) -> None:
    messages = [{"role": "user", "content": "What's the weather in Berlin?"}]
    r = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER_TOOL],
                                       tool_choice=tool_choice, temperature=0, max_tokens=64)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    args = json.loads(calls[0].function.arguments)  # schema-constrained: valid JSON with a string city
    assert isinstance(args["city"], str) and args["city"]
    assert r.choices[0].finish_reason == "tool_calls"

    messages += [
        {"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps({"temperature_c": 3, "conditions": "snow"})},
    ]
    r2 = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER_TOOL],
                                        tool_choice="none", temperature=0, max_tokens=48)
    assert r2.choices[0].message.content
    assert not r2.choices[0].message.tool_calls


def test_tool_choice_auto_is_answered(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="default", tools=[WEATHER_TOOL], tool_choice="auto", temperature=0,
                                       max_tokens=32, messages=[{"role": "user", "content": "Say hello."}])
    msg = r.choices[0].message
    assert msg.content or msg.tool_calls


def test_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    kw = dict(model="default", temperature=0, max_tokens=40, messages=[{"role": "user", "content": "Write a haiku about the sea."}])
    full = client.chat.completions.create(**kw).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(parts) == full


def test_demo_conversation(plain_server) -> None:
    import io

    buf = io.StringIO()
    messages = run_conversation(plain_server.url, out=buf)
    roles = [m["role"] for m in messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert "tool call get_weather" in buf.getvalue()


@pytest.mark.parametrize(
    "body, needle",
    [
        ("{not json", None),
        (json.dumps({"model": "default"}), "messages"),
        (json.dumps({"model": "default", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}), "Tools cannot be empty"),
        (json.dumps({"model": "default", "messages": [{"role": "user", "content": "hi"}],
                     "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]}), "parameters"),
        (json.dumps({"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}), "max_new_tokens must be at least 0"),
    ],
)
def test_malformed_requests_get_4xx_and_server_stays_healthy(plain_server, body: str, needle: str | None) -> None:
    r = requests.post(plain_server.url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if needle:
        assert needle in r.text
    assert requests.get(plain_server.url + "/health", timeout=30).status_code == 200
