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
    assert {t["name"] for t in table["tiers"]} == {"standard", "solo", "single-file"}
    assert next(t for t in table["tiers"] if t["name"] == "standard")["admitted"] >= 3

    text = requests.get(plain_server.url + "/metrics", timeout=30).text
    assert 'agentserve:agent_requests_total{agent="planner-7",tier="standard"} 3.0' in text


def test_a_whole_answer_is_timed_by_its_decode_like_a_streamed_one(plain_server) -> None:
    """A non-streamed answer's tok/s (what tier attainment and the admission gate judge) leaves
    out the wait for its first token, as SGLang's meta_info times it: a request held in a queue
    is not a slow stream."""
    r = requests.post(plain_server.url + "/generate", headers={"x-agent-id": "whole-answer-1"}, timeout=600,
                      json={"text": "List three colours:", "sampling_params": {"temperature": 0, "max_new_tokens": 24,
                                                                               "ignore_eos": True}})
    r.raise_for_status()
    m = r.json()["meta_info"]
    want = (m["completion_tokens"] - 1) / (m["e2e_latency"] - m["first_token_latency"])
    for _ in range(50):  # the handler records the request just after the answer reaches the client
        rows = requests.get(plain_server.url + "/agentserve/v1/agents", timeout=30).json()["agents"]
        row = next((a for a in rows if a["agent_id"] == "whole-answer-1"), None)
        if row is not None and row["running"] == 0 and row["tokens_per_s"] is not None:
            break
        time.sleep(0.1)
    assert row["tokens_per_s"] == pytest.approx(want, rel=1e-9)
    assert row["ttft_p50_s"] == pytest.approx(m["first_token_latency"], rel=1e-9)
    assert row["tokens_per_s"] > m["completion_tokens"] / m["e2e_latency"]  # the first token's wait left out


@pytest.mark.parametrize("headers, field", [({"x-agent-tier": "gold"}, "x-agent-tier"), ({"x-agent-id": "bad id!"}, "x-agent-id")])
def test_bad_agent_headers_are_400(plain_server, headers: dict, field: str) -> None:
    r = requests.post(plain_server.url + "/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 400 and field in r.json()["message"]
    assert requests.get(plain_server.url + "/health", timeout=30).status_code == 200


def _stream_in_thread(url: str, tier: str, max_tokens: int, out: dict) -> "threading.Thread":
    import threading

    def run() -> None:
        c = client(url, f"{tier}-runner", tier)
        stream = c.chat.completions.create(model="default", messages=[{"role": "user", "content": "Write a long story about a robot."}],
                                           temperature=0, max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True})
        for ch in stream:
            out.setdefault("first", time.monotonic())
        out["end"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    for _ in range(600):
        if "first" in out:
            break
        time.sleep(0.05)
    assert "first" in out, "the first request never started streaming"
    return t


def _wait_tier_idle(url: str, tier: str) -> None:
    for _ in range(100):
        tiers = {x["name"]: x for x in requests.get(url + "/agentserve/v1/agents", timeout=30).json()["tiers"]}
        if tiers[tier]["running"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"tier {tier} still has running requests")


def test_tier_at_max_concurrency_rejects_with_429_naming_the_tier(plain_server) -> None:
    out: dict = {}
    t = _stream_in_thread(plain_server.url, "solo", 160, out)
    r = requests.post(plain_server.url + "/v1/chat/completions", headers={"x-agent-tier": "solo"}, timeout=60,
                      json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert "end" not in out, "the first request finished too early for this test"
    assert r.status_code == 429 and r.headers.get("retry-after")
    body = r.json()
    assert body["param"] == "x-agent-tier" and "max_concurrency 1" in body["message"] and "solo" in body["message"]
    t.join(300)
    _wait_tier_idle(plain_server.url, "solo")  # the handler releases just after its last chunk
    ok = requests.post(plain_server.url + "/v1/chat/completions", headers={"x-agent-tier": "solo"}, timeout=120,
                       json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert ok.status_code == 200
    tiers = {x["name"]: x for x in requests.get(plain_server.url + "/agentserve/v1/agents", timeout=30).json()["tiers"]}
    assert tiers["solo"]["rejected"] == 1 and tiers["solo"]["admitted"] == 2 and tiers["solo"]["running"] == 0
    metrics = requests.get(plain_server.url + "/metrics", timeout=30).text
    assert 'agentserve:tier_admission_total{outcome="rejected",tier="solo"} 1.0' in metrics


def test_tier_at_max_concurrency_queues_until_capacity(plain_server) -> None:
    out: dict = {}
    t = _stream_in_thread(plain_server.url, "single-file", 120, out)
    r = requests.post(plain_server.url + "/v1/chat/completions", headers={"x-agent-tier": "single-file"}, timeout=300,
                      json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    done = time.monotonic()
    t.join(300)
    assert r.status_code == 200
    assert done >= out["end"] - 0.5, "the queued request ran beside the first one"
    tiers = {x["name"]: x for x in requests.get(plain_server.url + "/agentserve/v1/agents", timeout=30).json()["tiers"]}
    assert tiers["single-file"]["queued"] == 1 and tiers["single-file"]["timed_out"] == 0


def test_sessions_keep_the_conversation_and_expire_with_clear_errors(plain_server) -> None:
    url = plain_server.url
    opened = requests.post(url + "/agentserve/v1/sessions", json={"agent_id": "coder-1"}, timeout=30)
    assert opened.status_code == 201
    sess = opened.json()
    assert sess["agent_id"] == "coder-1" and sess["ttl_s"] == 120 and sess["expires_at"] > sess["created_at"]
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600,
                      default_headers={"x-agent-id": "coder-1", "x-session-id": sess["id"]})
    msgs = [{"role": "system", "content": "You are a coding agent. Read files before editing them. " * 6},
            {"role": "user", "content": "Show me a Python function that adds two numbers."}]
    r1 = c.chat.completions.create(model="default", messages=msgs, temperature=0, max_tokens=24)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "Now make it multiply."}]
    r2 = c.chat.completions.create(model="default", messages=msgs, temperature=0, max_tokens=8)
    # turn 2 prefills only its new tokens: the first turn's prompt (and answer) come from the cache
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 1
    info = requests.get(url + f"/agentserve/v1/sessions/{sess['id']}", timeout=30).json()
    assert info["requests"] == 2 and info["expires_at"] > sess["expires_at"]

    # another agent may not use it
    other = requests.post(url + "/v1/chat/completions", headers={"x-agent-id": "intruder", "x-session-id": sess["id"]},
                          json={"model": "default", "messages": msgs, "max_tokens": 2}, timeout=60)
    assert other.status_code == 403 and other.json()["param"] == "x-session-id"
    # closed: the id is unknown from now on, with a message that says what to do
    assert requests.delete(url + f"/agentserve/v1/sessions/{sess['id']}", timeout=30).json()["closed"] is True
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="default", messages=msgs, max_tokens=2)
    assert "x-session-id" in str(e.value) and "POST /agentserve/v1/sessions" in str(e.value)

    short = requests.post(url + "/agentserve/v1/sessions", json={"agent_id": "coder-1", "ttl_s": 1}, timeout=30).json()
    time.sleep(1.5)
    late = requests.post(url + "/v1/chat/completions", headers={"x-agent-id": "coder-1", "x-session-id": short["id"]},
                         json={"model": "default", "messages": msgs, "max_tokens": 2}, timeout=60)
    assert late.status_code == 404 and "expired" in late.json()["message"]


@pytest.mark.parametrize("body, field", [({"agent_id": "bad id!"}, "agent_id"), ({"ttl_s": -3}, "ttl_s"),
                                         ({"ttl_s": 10 ** 6}, "ttl_s"), ({"agent": "x"}, "agent")])
def test_bad_session_requests_name_the_field(plain_server, body: dict, field: str) -> None:
    r = requests.post(plain_server.url + "/agentserve/v1/sessions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["param"] == field and r.json()["message"].startswith(field + ":")


@pytest.mark.parametrize("payload, needle", [
    ({"messages": [{"role": "user", "content": "hi " * 9000}]}, "context length"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": "nope"}}]}, "parameters"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "function", "function": {"name": "missing"}},
      "tools": [WEATHER_TOOL]}, "missing"),
    ({"messages": "not a list"}, "messages"),
])
def test_bad_requests_are_4xx_naming_the_problem_and_the_server_stays_up(plain_server, payload: dict, needle: str) -> None:
    r = requests.post(plain_server.url + "/v1/chat/completions", json={"model": "default", "max_tokens": 4, **payload}, timeout=120)
    assert 400 <= r.status_code < 500 and needle in r.text, r.text[:300]
    assert requests.get(plain_server.url + "/health", timeout=30).status_code == 200


def test_agent_id_from_the_openai_user_field_and_profile_mapping(plain_server) -> None:
    c = openai.OpenAI(base_url=plain_server.url + "/v1", api_key="x", max_retries=0, timeout=600)
    c.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2, user="vip-agent")
    table = requests.get(plain_server.url + "/agentserve/v1/agents", timeout=30).json()
    row = next(a for a in table["agents"] if a["agent_id"] == "vip-agent")
    assert row["tier"] == "standard" and row["requests"] == 1


def test_parallel_tool_calls_in_history_render_and_are_answered(plain_server) -> None:
    # An agent that called two tools at once sends both calls and both results back.
    c = client(plain_server.url, "parallel-agent")
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
             for i, city in enumerate(["Oslo", "Paris"])]
    msgs = [{"role": "user", "content": "Weather in Oslo and Paris?"},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "call_0", "content": json.dumps({"city": "Oslo", "temperature_c": -2})},
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"city": "Paris", "temperature_c": 11})}]
    r = c.chat.completions.create(model="default", messages=msgs, tools=[WEATHER_TOOL], temperature=0, max_tokens=24)
    assert r.choices[0].message.content and r.usage.prompt_tokens > 100


AUTH_KEYS = {"admin": "admin-4f1c9a7e2b", "agents": {"alice": "alice-9d2e7b1c4a", "bob": "bob-3a8f6c2d1e"}}


@pytest.fixture(scope="module")
def auth_server(start_server, tmp_path_factory):
    """The plain server with API keys: alice (tier standard and below), bob (solo only), an admin."""
    import yaml

    from agentserve.profile import AgentSpec, AuthSpec

    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump(AUTH_KEYS))
    keys.chmod(0o600)
    return start_server("plain-fp32.yaml", name="test-auth", auth=AuthSpec(keys_file=str(keys)),
                        agents={"alice": AgentSpec(tier="standard"), "bob": AgentSpec(tier="solo", tiers=["solo"])})


def keyed(url: str, key: str | None, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key or "", max_retries=0, timeout=600, default_headers=headers)


def test_api_keys_on_a_real_server_the_auth_matrix(auth_server) -> None:
    url = auth_server.url
    ask = dict(model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
    # the server started: SGLang's own warmup got through with the process's internal key
    assert "API keys required" in auth_server.log_path.read_text(errors="replace")
    with pytest.raises(openai.AuthenticationError) as e:  # no key (the client sends "Bearer ")
        keyed(url, None).chat.completions.create(**ask)
    assert "authorization" in str(e.value)
    with pytest.raises(openai.AuthenticationError):
        keyed(url, "not-a-key").chat.completions.create(**ask)
    alice = AUTH_KEYS["agents"]["alice"]
    assert keyed(url, alice).chat.completions.create(**ask).choices[0].message.content is not None
    with pytest.raises(openai.PermissionDeniedError) as e:  # alice's key claiming bob
        keyed(url, alice, **{"x-agent-id": "bob"}).chat.completions.create(**ask)
    assert "belongs to agent 'alice'" in str(e.value)
    with pytest.raises(openai.PermissionDeniedError) as e:  # bob above his allowance
        keyed(url, AUTH_KEYS["agents"]["bob"], **{"x-agent-tier": "standard"}).chat.completions.create(**ask)
    assert "may not use tier 'standard'" in str(e.value)
    assert keyed(url, AUTH_KEYS["agents"]["bob"]).chat.completions.create(**ask).usage.completion_tokens > 0
    # admin-only endpoints: 401 without a key, 403 with an agent's, 200 with the admin's
    h = {"Authorization": f"Bearer {alice}"}
    admin = {"Authorization": f"Bearer {AUTH_KEYS['admin']}"}
    for path in ("/metrics", "/agentserve/v1/agents", "/agentserve/v1/sessions", "/get_server_info"):
        assert requests.get(url + path, timeout=30).status_code == 401, path
        assert requests.get(url + path, headers=h, timeout=30).status_code == 403, path
        assert requests.get(url + path, headers=admin, timeout=30).status_code == 200, path
    assert requests.get(url + "/health", timeout=30).status_code == 200
    table = requests.get(url + "/agentserve/v1/agents", headers=admin, timeout=30).json()
    rows = {a["agent_id"]: a["tier"] for a in table["agents"]}  # and "anonymous": SGLang's warmup, admin-keyed
    assert rows["alice"] == "standard" and rows["bob"] == "solo"
    # sessions are the key's agent's: bob cannot use, read or close alice's
    sess = requests.post(url + "/agentserve/v1/sessions", headers=h, json={}, timeout=30).json()
    assert sess["agent_id"] == "alice"
    with pytest.raises(openai.PermissionDeniedError):
        keyed(url, AUTH_KEYS["agents"]["bob"], **{"x-session-id": sess["id"]}).chat.completions.create(**ask)
    bob_h = {"Authorization": f"Bearer {AUTH_KEYS['agents']['bob']}"}
    assert requests.delete(url + f"/agentserve/v1/sessions/{sess['id']}", headers=bob_h, timeout=30).status_code == 403
    r = keyed(url, alice, **{"x-session-id": sess["id"]}).chat.completions.create(**ask)
    assert r.usage.completion_tokens > 0
    # error bodies carry no server paths or tracebacks
    bad = requests.post(url + "/v1/chat/completions", headers=h, json={"model": "default", "messages": "x"}, timeout=60)
    assert 400 <= bad.status_code < 500 and "Traceback" not in bad.text and "site-packages" not in bad.text
