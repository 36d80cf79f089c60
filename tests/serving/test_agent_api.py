"""Agent identity, per-agent statistics, multi-turn KV reuse and bad agent headers on the real
server, through the official openai client."""

from __future__ import annotations

import json
import time

import openai
import pytest
import requests

from agentserve.demo import WEATHER_TOOL

pytestmark = pytest.mark.server


def client(url: str, agent: str, tier: str | None = None) -> openai.OpenAI:
    headers = {"x-agent-id": agent} | ({"x-agent-tier": tier} if tier else {})
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600, default_headers=headers)


def test_multi_turn_reuses_cached_prefix_and_is_tracked_per_agent(plain_server) -> None:
    c = client(plain_server.url, "planner-7")
    msgs = [{"role": "system", "content": "You are a careful planning agent. " * 8},
            {"role": "user", "content": "What's the weather in Oslo?"}]
    r1 = c.chat.completions.create(model="default", messages=msgs, tools=[WEATHER_TOOL], tool_choice="required",
                                   temperature=0, max_tokens=48)
    call = r1.choices[0].message.tool_calls[0]
    msgs += [{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": -2})}]
    # tool_choice stays "auto" as in an agent loop: SGLang drops `tools` from the template for
    # "none", which changes the system turn and so the cached prefix.
    r2 = c.chat.completions.create(model="default", messages=msgs, tools=[WEATHER_TOOL], tool_choice="auto",
                                   temperature=0, max_tokens=24)
    # Turn 2 prefills only what is new: the whole first prompt comes from the radix cache.
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens - 1, (cached, r1.usage.prompt_tokens)

    # a streamed request gives the agent a time to first token
    stream = c.chat.completions.create(model="default", messages=[{"role": "user", "content": "Count to five."}],
                                       temperature=0, max_tokens=16, stream=True)
    assert "".join((ch.choices[0].delta.content or "") for ch in stream if ch.choices)

    # The streamed request's handler finishes just after its last chunk reaches the client.
    for _ in range(50):
        table = requests.get(plain_server.url + "/agentserve/v1/agents", timeout=30).json()
        row = next(a for a in table["agents"] if a["agent_id"] == "planner-7")
        if row["running"] == 0:
            break
        time.sleep(0.1)
    assert row["requests"] == 3 and row["running"] == 0
    assert row["tier"] == "standard"  # the profile's default tier
    assert row["tokens_per_s"] > 0 and row["ttft_p50_s"] is not None
    assert {t["name"] for t in table["tiers"]} == {"standard"}

    text = requests.get(plain_server.url + "/metrics", timeout=30).text
    assert 'agentserve:agent_requests_total{agent="planner-7",tier="standard"} 3.0' in text


@pytest.mark.parametrize("headers, field", [({"x-agent-tier": "gold"}, "x-agent-tier"), ({"x-agent-id": "bad id!"}, "x-agent-id")])
def test_bad_agent_headers_are_400(plain_server, headers: dict, field: str) -> None:
    r = requests.post(plain_server.url + "/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 400 and field in r.json()["message"]
    assert requests.get(plain_server.url + "/health", timeout=30).status_code == 200
