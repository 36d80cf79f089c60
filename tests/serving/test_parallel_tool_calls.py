"""Parallel tool calls as model output, through the official openai client: one assistant turn
that calls a tool twice, parsed by SGLang's hermes parser, streamed and not, on the plain server
and on our speculative worker (whose steps emit several tokens at once)."""

from __future__ import annotations

import collections
import json

import openai
import pytest
import requests

from agentserve.demo import WEATHER_TOOL

pytestmark = pytest.mark.server

# One earlier turn in which the agent asked for two cities at once and got both answers: the
# small bundled model follows that shape under tool_choice=required (a JSON array of calls).
SHOT = [
    {"role": "user", "content": "Weather in Rome and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Rome"})}},
        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": json.dumps({"temperature_c": 20})},
    {"role": "tool", "tool_call_id": "call_b", "content": json.dumps({"temperature_c": 5})},
    {"role": "assistant", "content": "Rome has 20 C and Oslo 5 C."},
    {"role": "user", "content": "Weather in Paris and London?"},
]
KW = dict(model="default", messages=SHOT, tools=[WEATHER_TOOL], tool_choice="required", temperature=0, max_tokens=80)


def _client(url: str, agent: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=900,
                         default_headers={"x-agent-id": agent})


def _whole(c: openai.OpenAI) -> list[tuple[str, dict]]:
    r = c.chat.completions.create(**KW)
    calls = r.choices[0].message.tool_calls or []
    assert len({x.id for x in calls}) == len(calls), "tool call ids must be distinct"
    return [(x.function.name, json.loads(x.function.arguments)) for x in calls]


def _streamed(c: openai.OpenAI) -> list[tuple[str, dict]]:
    names: dict[int, str] = {}
    args: dict[int, str] = collections.defaultdict(str)
    ids: dict[int, str] = {}
    content = ""
    for ch in c.chat.completions.create(**KW, stream=True):
        if not ch.choices:
            continue
        content += ch.choices[0].delta.content or ""
        for tc in ch.choices[0].delta.tool_calls or []:
            if tc.id:
                ids[tc.index] = tc.id
            if tc.function and tc.function.name:
                names[tc.index] = tc.function.name
            if tc.function and tc.function.arguments:
                args[tc.index] += tc.function.arguments
    assert sorted(names) == sorted(args) == sorted(ids), (names, args, ids)
    assert "tool_call" not in content, content  # no markup leaks when a chunk splits a marker
    return [(names[i], json.loads(args[i])) for i in sorted(names)]


def test_two_calls_in_one_turn_streamed_and_not(plain_server) -> None:
    c = _client(plain_server.url, "parallel-plain")
    whole = _whole(c)
    assert whole == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "London"})], whole
    assert _streamed(c) == whole


def test_two_calls_under_speculation_equal_plain(plain_server, agentspark_server) -> None:
    """Greedy: the speculative worker's parallel calls are the plain server's, streamed too
    (each chunk may carry several tokens)."""
    expected = _whole(_client(plain_server.url, "parallel-plain"))
    c = _client(agentspark_server.url, "parallel-spark")
    assert _whole(c) == expected
    assert _streamed(c) == expected
    # the steps really emitted several tokens at once (the second call copies the first's shape)
    text = requests.get(agentspark_server.url + "/metrics", timeout=60).text
    val = {n: float(line.split()[-1]) for line in text.splitlines() for n in ("steps", "tokens")
           if line.startswith(f'agentserve:agent_spec_{n}_total{{agent="parallel-spark"}}')}
    assert val["tokens"] / val["steps"] > 1.2, val
