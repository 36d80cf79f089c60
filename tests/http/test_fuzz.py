"""Fuzzing (hypothesis): request bodies and headers through the agent middleware in-process, in
front of generation routes that validate chat bodies with SGLang's own request model; and
profile files through parse_profile. Every input gets a 4xx naming the field, or a valid
answer; never a 5xx, a traceback or a server path; parse_profile raises only ProfileError."""

from __future__ import annotations

import asyncio
import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentserve.profile import ProfileError, parse_profile
from sglang_ext.http.registry import AgentRegistry

from test_agent_middleware import AUTH_PROFILE, KEYS, stand_in_app  # noqa: E402 (pytest puts tests/http on sys.path)

N_REQUESTS = int(os.environ.get("AGENTSERVE_FUZZ_EXAMPLES", "120"))
N_PROFILES = 3 * N_REQUESTS
SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 20, 10 ** 20), st.floats(allow_nan=True),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
roles = st.sampled_from(["user", "assistant", "system", "tool", "developer", "bogus", ""])
message = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=40), json_values)}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.text(max_size=10),
                           "tool_calls": st.lists(st.fixed_dictionaries({"id": st.text(max_size=6), "type": st.just("function"),
                                                                         "function": st.fixed_dictionaries({"name": st.text(max_size=8), "arguments": st.one_of(st.text(max_size=20), json_values)})}), max_size=2)}),
    json_values)
schema = st.recursive(st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "boolean", "null", "nope"])}),
                      lambda inner: st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3)})
                      | st.fixed_dictionaries({"type": st.just("array"), "items": inner}), max_leaves=6)
tool = st.one_of(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.text(max_size=10), "parameters": st.one_of(schema, json_values)})}), json_values)
tool_choice = st.one_of(st.sampled_from(["auto", "none", "required", "bogus"]), json_values,
                        st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.text(max_size=10)})}))
number = st.one_of(st.integers(-5, 10 ** 12), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.none(),
                   st.booleans())
body = st.fixed_dictionaries(
    {"model": st.one_of(st.just("default"), json_values)},
    optional={"messages": st.one_of(st.lists(message, max_size=4), json_values), "tools": st.one_of(st.lists(tool, max_size=3), json_values),
              "tool_choice": tool_choice, "temperature": number, "top_p": number, "max_tokens": number, "n": number,
              "stream": st.one_of(st.booleans(), json_values), "seed": number, "stop": json_values, "user": json_values,
              "custom_params": json_values, "sampling_params": json_values, "logprobs": number})
header_text = st.one_of(st.text(max_size=30), st.sampled_from(["alice", "bob", "carol", "interactive", "batch", "standard",
                                                               "sess_0", "Bearer " + KEYS["agents"]["alice"],
                                                               "Bearer " + KEYS["admin"]]))
header_bytes = st.one_of(header_text.map(lambda s: s.encode("utf-8")), st.binary(max_size=20))
headers = st.dictionaries(st.sampled_from([b"x-agent-id", b"x-agent-tier", b"x-session-id", b"authorization"]), header_bytes,
                          max_size=4)
paths = st.sampled_from(["/v1/chat/completions", "/v1/chat/completions", "/generate", "/agentserve/v1/sessions",
                         "/agentserve/v1/agents", "/agentserve/v1/sessions/sess_0"])
raw_bodies = st.one_of(body.map(lambda b: json.dumps(b).encode()), st.binary(max_size=40),
                       json_values.map(lambda v: json.dumps(v).encode()))


def asgi_call(app, method: str, path: str, raw: bytes, hdrs: dict[bytes, bytes]) -> tuple[int, bytes]:
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
             "root_path": "", "headers": [(k, v) for k, v in hdrs.items()] + [(b"content-length", str(len(raw)).encode())]}
    out: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(msg: dict) -> None:
        out.append(msg)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in out if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")


def check(status: int, payload: bytes) -> None:
    assert status < 500, payload[:300]
    text = payload.decode(errors="replace")
    assert "Traceback" not in text and "/work/" not in text and "site-packages" not in text, text[:300]
    if status >= 400:
        doc = json.loads(payload)
        msg = doc.get("message") or json.dumps(doc.get("detail"))
        assert msg, doc
        if "param" in doc:  # ours: the message starts with the field it names
            assert msg.startswith(doc["param"] + ":"), doc


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """Two apps: open (no keys) and with keys, each with its own registry."""
    import os

    from sglang_ext import config

    tmp = tmp_path_factory.mktemp("fuzz")
    keys = tmp / "keys.yaml"
    keys.write_text(json.dumps(KEYS))
    out = []
    old = os.environ.get(config.ENV)
    os.environ["CAROL_KEY"] = "carol-key-0123456789"
    try:
        for auth in (None, {"keys_file": str(keys)}):
            path = tmp / f"profile-{len(out)}.json"
            path.write_text(json.dumps({"name": "fuzz", "model": {"path": "/nonexistent"}, **AUTH_PROFILE,
                                        **({"auth": auth} if auth else {"agents": {"alice": "interactive"}})}))
            os.environ[config.ENV] = str(path)
            config.reset()
            out.append(stand_in_app(AgentRegistry())[0])
    finally:
        os.environ.pop("CAROL_KEY", None)
        if old is None:
            os.environ.pop(config.ENV, None)
        else:
            os.environ[config.ENV] = old
        config.reset()
    return out


@settings(max_examples=N_REQUESTS, deadline=None, suppress_health_check=SUPPRESS)
@given(which=st.integers(0, 1), method=st.sampled_from(["POST", "POST", "GET", "DELETE"]), path=paths, raw=raw_bodies,
       hdrs=headers)
def test_fuzzed_requests_get_a_4xx_naming_the_field_or_an_answer(apps, which: int, method: str, path: str, raw: bytes,
                                                                  hdrs: dict[bytes, bytes]) -> None:
    status, payload = asgi_call(apps[which], method, path, raw, hdrs)
    check(status, payload)


@settings(max_examples=N_REQUESTS // 2, deadline=None, suppress_health_check=SUPPRESS)
@given(doc=body)
def test_fuzzed_chat_bodies_of_a_keyed_agent_reach_sglang_tagged_or_are_refused_by_it(apps, doc: dict) -> None:
    hdr = {b"authorization": f"Bearer {KEYS['agents']['bob']}".encode()}
    status, payload = asgi_call(apps[1], "POST", "/v1/chat/completions", json.dumps(doc).encode(), hdr)
    check(status, payload)
    assert status in (200, 400), payload[:200]  # SGLang's model accepted or refused it; the middleware let it by


profile_fields = st.fixed_dictionaries({}, optional={
    "name": json_values, "model": st.one_of(st.fixed_dictionaries({"path": st.one_of(st.text(max_size=8), json_values)}), json_values),
    "interactivity_tiers": st.one_of(st.lists(st.fixed_dictionaries({"name": st.one_of(st.text(max_size=6), json_values)}, optional={
        "target_tokens_per_s": number, "target_ttft_s": number, "priority": number, "max_concurrency": number,
        "on_overload": st.one_of(st.sampled_from(["queue", "reject"]), json_values), "queue_timeout_s": number,
        "min_share": number, "bogus": json_values}), max_size=3), json_values),
    "default_tier": json_values,
    "agents": st.one_of(st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), json_values, st.fixed_dictionaries(
        {}, optional={"tier": json_values, "tiers": json_values, "key_env": json_values})), max_size=3), json_values),
    "auth": st.one_of(st.fixed_dictionaries({}, optional={"keys_file": json_values, "admin_key_env": json_values}), json_values),
    "sessions": json_values, "server": json_values, "drafter": json_values, "admission_margin": number,
    "admission_live": json_values, "unknown_field": json_values})


@settings(max_examples=N_PROFILES, deadline=None, suppress_health_check=SUPPRESS)
@given(data=st.one_of(profile_fields, json_values))
def test_fuzzed_profiles_raise_only_profile_errors_that_name_fields(data: object) -> None:
    try:
        prof = parse_profile(data)
    except ProfileError as e:
        assert e.problems
        for p in e.problems:
            field, sep, what = p.partition(":")
            assert sep and field.strip() and what.strip(), p
        return
    assert prof.name and all(not math.isnan(t.priority) for t in prof.interactivity_tiers)
