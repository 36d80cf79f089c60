"""The agent middleware and routes on a FastAPI app whose generation routes stand in for
SGLang's (they parse chat bodies with SGLang's own request model): identity checks, tagging of
the body SGLang receives, sessions, admission errors, and API keys. The real server tests cover
the same paths end to end; these pin the edge cases cheaply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from sglang_ext.http.auth import AuthConfigError
from sglang_ext.http.middleware import AgentMiddleware
from sglang_ext.http.registry import AgentRegistry
from sglang_ext.http.routes import router

PROFILE = {"interactivity_tiers": [{"name": "gold", "target_tokens_per_s": 5.0, "priority": 0, "max_concurrency": 1,
                                    "on_overload": "reject"}],
           "default_tier": "gold", "agents": {"known": "gold"}, "require_known_agents": True,
           "sessions": {"ttl_s": 60, "max_sessions": 4}}


def stand_in_app(reg: AgentRegistry) -> tuple[FastAPI, list[dict]]:
    """SGLang's shape: chat bodies validated by SGLang's ChatCompletionRequest (400 on error),
    whole answers with a usage block."""
    from pydantic import ValidationError
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest

    app = FastAPI()
    bodies: list[dict] = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        raw = await request.body()
        assert request.headers["content-length"] == str(len(raw))
        try:
            doc = json.loads(raw)
            ChatCompletionRequest.model_validate(doc)
        except (ValueError, ValidationError) as e:
            return JSONResponse({"object": "error", "message": str(e)[:200], "code": 400}, status_code=400)
        bodies.append(doc)
        return JSONResponse({"usage": {"completion_tokens": 4}})

    @app.post("/generate")
    async def generate(request: Request) -> JSONResponse:
        try:
            doc = json.loads(await request.body())
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return JSONResponse({"object": "error", "message": "invalid request", "code": 400}, status_code=400)
        bodies.append(doc)
        return JSONResponse({"meta_info": {"completion_tokens": 4, "e2e_latency": 0.5, "first_token_latency": 0.1}})

    @app.get("/get_server_info")
    async def server_info() -> JSONResponse:
        return JSONResponse({"ok": True})

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({})

    app.include_router(router)
    app.add_middleware(AgentMiddleware, registry=reg)
    return app, bodies


@pytest.fixture()
def mw(serve_profile) -> tuple[TestClient, list[dict]]:
    serve_profile(PROFILE)
    app, bodies = stand_in_app(AgentRegistry(max_labels=2))
    return TestClient(app), bodies


def chat(c: TestClient, headers: dict | None = None, body: dict | None = None):
    return c.post("/v1/chat/completions", headers=headers or {},
                  json=body if body is not None else {"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def test_known_agent_is_tagged_for_the_scheduler(mw) -> None:
    c, bodies = mw
    r = chat(c, {"x-agent-id": "known"}, {"messages": [{"role": "user", "content": "hi"}], "custom_params": {"x": 1}})
    assert r.status_code == 200
    assert bodies[-1]["custom_params"] == {"x": 1, "__agentserve_agent": "known", "__agentserve_tier": "gold",
                                           "__agentserve_session": ""}
    r = c.post("/generate", headers={"x-agent-id": "known"}, json={"text": "hi"})
    assert r.status_code == 200 and bodies[-1]["sampling_params"]["custom_params"]["__agentserve_tier"] == "gold"


def test_unknown_agent_and_bad_user_field_are_refused_naming_the_field(mw) -> None:
    c, bodies = mw
    r = chat(c, {"x-agent-id": "stranger"})
    assert r.status_code == 403 and r.json()["param"] == "x-agent-id" and "stranger" in r.json()["message"]
    r = chat(c, body={"messages": [], "user": "bad user!"})
    assert r.status_code == 400 and r.json()["param"] == "user"
    r = chat(c, {"x-agent-id": "known", "x-agent-tier": "platinum"})
    assert r.status_code == 400 and r.json()["param"] == "x-agent-tier" and "platinum" in r.json()["message"]
    assert bodies == []  # SGLang saw none of them


def test_sessions_through_the_routes(mw) -> None:
    c, bodies = mw
    r = c.post("/agentserve/v1/sessions", json={"agent_id": "known"})
    assert r.status_code == 201
    sess = r.json()
    r = chat(c, {"x-agent-id": "known", "x-session-id": sess["id"]})
    assert r.status_code == 200 and bodies[-1]["custom_params"]["__agentserve_session"] == sess["id"]
    assert c.get(f"/agentserve/v1/sessions/{sess['id']}").json()["requests"] == 1
    r = c.post("/agentserve/v1/sessions", content=b"{not json")
    assert r.status_code == 400 and r.json()["param"] == "body"
    for body, field in [({"agent_id": "bad id!"}, "agent_id"), ({"ttl_s": -3}, "ttl_s"), ({"ttl_s": 10 ** 6}, "ttl_s"),
                        ({"ttl_s": "soon"}, "ttl_s"), ({"agent": "x"}, "agent")]:
        r = c.post("/agentserve/v1/sessions", json=body)
        assert r.status_code == 400 and r.json()["param"] == field and r.json()["message"].startswith(field + ":"), r.text
    assert c.delete(f"/agentserve/v1/sessions/{sess['id']}").json()["closed"] is True
    r = chat(c, {"x-agent-id": "known", "x-session-id": sess["id"]})
    assert r.status_code == 404 and r.json()["param"] == "x-session-id"
    snap = c.get("/agentserve/v1/agents").json()
    assert snap["sessions"]["open"] == 0 and snap["tiers"][0]["admitted"] == 1
    # the next generation request tells the scheduler the session ended (its draft index goes), once
    assert chat(c, {"x-agent-id": "known"}).status_code == 200
    assert bodies[-1]["custom_params"]["__agentserve_ended"] == sess["id"]
    assert chat(c, {"x-agent-id": "known"}).status_code == 200 and "__agentserve_ended" not in bodies[-1]["custom_params"]


def test_a_client_cannot_speak_for_the_agent_layer_in_custom_params(mw) -> None:
    c, bodies = mw
    forged = {"__agentserve_agent": "root", "__agentserve_tier": "top", "__agentserve_ended": "someone-elses", "x": 2}
    r = chat(c, {"x-agent-id": "known"}, {"messages": [{"role": "user", "content": "hi"}], "custom_params": forged})
    assert r.status_code == 200
    assert bodies[-1]["custom_params"] == {"x": 2, "__agentserve_agent": "known", "__agentserve_tier": "gold",
                                           "__agentserve_session": ""}


def test_a_body_that_is_not_a_json_object_is_400_naming_the_body(mw) -> None:
    c, bodies = mw
    for raw in (b"{oops", b"null", b"[1]", b"\xff\xfe"):
        r = c.post("/v1/chat/completions", headers={"x-agent-id": "known"}, content=raw)
        assert r.status_code == 400 and r.json()["param"] == "body", r.text
    assert bodies == []
    r = c.post("/v1/chat/completions", headers={"x-agent-id": "known"}, content=b"[" * 100_000)
    assert r.status_code == 400 and r.json()["param"] == "body"


def test_a_chat_body_sglang_would_refuse_is_our_400_naming_the_field(mw) -> None:
    """SGLang's own 400 for these quotes its traceback and file paths; ours names the field."""
    c, bodies = mw
    for body, field in [({"model": "m", "messages": "x"}, "messages"),
                        ({"model": "m", "messages": [{"role": "bogus", "content": "hi"}]}, "messages.0.role"),
                        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature")]:
        r = chat(c, {"x-agent-id": "known"}, body)
        assert r.status_code == 400 and r.json()["param"] == field, r.text
        assert r.json()["message"].startswith(field + ":") and "site-packages" not in r.text
    assert bodies == []
    r = chat(c, {"x-agent-id": "known"}, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and len(bodies) == 1


KEYS = {"admin": "admin-secret-0123456789", "agents": {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789"}}
AUTH_PROFILE = {"interactivity_tiers": [{"name": "interactive", "target_tokens_per_s": 20, "priority": 0},
                                        {"name": "standard", "target_tokens_per_s": 10, "priority": 1},
                                        {"name": "batch", "priority": 2}],
                "default_tier": "standard",
                "agents": {"alice": {"tier": "interactive"}, "bob": "standard",
                           "carol": {"tier": "batch", "tiers": ["batch"], "key_env": "CAROL_KEY"}}}


@pytest.fixture()
def authed(serve_profile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[TestClient, list[dict]]:
    keys = tmp_path / "keys.yaml"
    keys.write_text(json.dumps(KEYS))
    monkeypatch.setenv("CAROL_KEY", "carol-key-0123456789")
    serve_profile({**AUTH_PROFILE, "auth": {"keys_file": str(keys)}})
    app, bodies = stand_in_app(AgentRegistry())
    return TestClient(app), bodies


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_api_keys_decide_who_calls_and_what_they_reach(authed) -> None:
    c, bodies = authed
    alice, bob, carol, admin = (bearer(KEYS["agents"]["alice"]), bearer(KEYS["agents"]["bob"]),
                                bearer("carol-key-0123456789"), bearer(KEYS["admin"]))
    # no key, a wrong key: 401 naming the header, with WWW-Authenticate
    for h in ({}, bearer("wrong"), {"authorization": "Basic abc"}):
        r = chat(c, h)
        assert r.status_code == 401 and r.json()["param"] == "authorization" and r.headers["www-authenticate"] == "Bearer"
    # the key says who calls: alice at her own tier; claiming bob with her key is refused
    r = chat(c, alice)
    assert r.status_code == 200 and bodies[-1]["custom_params"]["__agentserve_agent"] == "alice"
    assert bodies[-1]["custom_params"]["__agentserve_tier"] == "interactive"
    r = chat(c, {**alice, "x-agent-id": "bob"})
    assert r.status_code == 403 and r.json()["param"] == "x-agent-id" and "'alice'" in r.json()["message"]
    assert chat(c, {**alice, "x-agent-id": "alice"}).status_code == 200
    # the user field names no one when keys are on: bob is bob
    r = chat(c, bob, {"messages": [{"role": "user", "content": "hi"}], "user": "alice"})
    assert r.status_code == 200 and bodies[-1]["custom_params"]["__agentserve_agent"] == "bob"
    # tiers: bob may go down, not up; carol only batch; 403 names the tier
    assert chat(c, {**bob, "x-agent-tier": "batch"}).status_code == 200
    r = chat(c, {**bob, "x-agent-tier": "interactive"})
    assert r.status_code == 403 and r.json()["param"] == "x-agent-tier" and "'interactive'" in r.json()["message"]
    r = chat(c, {**carol, "x-agent-tier": "standard"})
    assert r.status_code == 403 and "'standard'" in r.json()["message"]
    assert chat(c, carol).status_code == 200 and bodies[-1]["custom_params"]["__agentserve_agent"] == "carol"
    # admin-only routes
    for method, path in [("GET", "/agentserve/v1/agents"), ("GET", "/agentserve/v1/sessions"), ("GET", "/get_server_info"),
                         ("GET", "/metrics")]:
        r = c.request(method, path, headers=alice)
        assert r.status_code == 403 and r.json()["param"] == "authorization", (path, r.text)
        assert c.request(method, path).status_code == 401
    assert c.get("/agentserve/v1/agents", headers=admin).status_code == 200
    assert c.get("/agentserve/v1/sessions", headers=admin).json()["open"] == 0
    assert c.get("/health").status_code == 200  # probes need no key
    # the admin may generate as any agent, at any tier
    r = chat(c, {**admin, "x-agent-id": "bob", "x-agent-tier": "interactive"})
    assert r.status_code == 200 and bodies[-1]["custom_params"]["__agentserve_tier"] == "interactive"


def test_sessions_belong_to_the_keys_agent(authed) -> None:
    c, _ = authed
    alice, bob, admin = bearer(KEYS["agents"]["alice"]), bearer(KEYS["agents"]["bob"]), bearer(KEYS["admin"])
    r = c.post("/agentserve/v1/sessions", headers=alice, json={})
    assert r.status_code == 201 and r.json()["agent_id"] == "alice"
    sid = r.json()["id"]
    r = c.post("/agentserve/v1/sessions", headers=alice, json={"agent_id": "bob"})
    assert r.status_code == 403 and r.json()["param"] == "agent_id"
    assert c.post("/agentserve/v1/sessions", json={}).status_code == 401
    # bob can neither use, read nor close alice's session; the answer does not say whose it is
    r = chat(c, {**bob, "x-session-id": sid})
    assert r.status_code == 403 and r.json()["param"] == "x-session-id" and "alice" not in r.json()["message"]
    assert c.get(f"/agentserve/v1/sessions/{sid}", headers=bob).status_code == 403
    assert c.delete(f"/agentserve/v1/sessions/{sid}", headers=bob).status_code == 403
    assert chat(c, {**alice, "x-session-id": sid}).status_code == 200
    assert c.get(f"/agentserve/v1/sessions/{sid}", headers=admin).json()["requests"] == 1
    assert c.delete(f"/agentserve/v1/sessions/{sid}", headers=alice).json()["closed"] is True


def test_unreadable_keys_stop_the_server_and_no_keys_means_open(serve_profile, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    serve_profile({**AUTH_PROFILE, "auth": {"keys_file": str(tmp_path / "missing.yaml")}})
    with pytest.raises(AuthConfigError) as e:
        AgentRegistry()
    assert "auth.keys_file" in str(e.value) and str(tmp_path) not in str(e.value)
    serve_profile(AUTH_PROFILE)  # carol's key_env names an unset variable
    with pytest.raises(AuthConfigError, match="agents.carol.key_env: environment variable CAROL_KEY"):
        AgentRegistry()
    serve_profile({k: v for k, v in AUTH_PROFILE.items() if k != "agents"})
    with caplog.at_level("WARNING"):
        reg = AgentRegistry()
    assert not reg.keys.enabled and "OPEN" in caplog.text
    c = TestClient(stand_in_app(reg)[0])
    assert chat(c, {"x-agent-id": "anyone", "x-agent-tier": "interactive"}).status_code == 200
    assert c.get("/agentserve/v1/agents").status_code == 200


def test_a_streamed_answer_is_measured_in_tokens_not_chunks(mw) -> None:
    """Streamed chat asks SGLang for the running usage on each chunk; the watch then counts the
    tokens a speculative step sent together in one chunk."""
    import json as _json

    from sglang_ext.http.metrics import ResponseWatch

    c, bodies = mw
    chat(c, {"x-agent-id": "known"}, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert bodies[-1]["stream_options"] == {"continuous_usage_stats": True}
    chat(c, {"x-agent-id": "known"}, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                                      "stream_options": {"include_usage": True, "continuous_usage_stats": False}})
    assert bodies[-1]["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}  # the client's choice
    chat(c, {"x-agent-id": "known"}, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert "stream_options" not in bodies[-1]

    clock = iter([0.0, 1.0, 2.1])  # start, first chunk, end of the answer
    import sglang_ext.http.metrics as metrics

    real = metrics.time.perf_counter
    metrics.time.perf_counter = lambda: next(clock)
    try:
        w = ResponseWatch()
        w.see({"type": "http.response.start", "status": 200})
        for n in (3, 7, 12):  # three chunks, twelve tokens
            chunk = {"choices": [{"delta": {"content": "x"}}], "usage": {"completion_tokens": n, "prompt_tokens": 5}}
            w.see({"type": "http.response.body", "body": f"data: {_json.dumps(chunk)}\n\n".encode(), "more_body": True})
        w.see({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        m = w.measure()
    finally:
        metrics.time.perf_counter = real
    assert m is not None and m.ttft_s == pytest.approx(1.0)
    assert m.tokens_per_s == pytest.approx(11 / 1.1)  # a chunk count would say 3 / 1.1

    # SGLang's /generate streams meta_info, not usage: its completion_tokens count too (a chunk
    # count made a 52 tok/s answer look like 12 and the tier gate see misses that were not)
    clock = iter([0.0, 1.0, 2.1])
    metrics.time.perf_counter = lambda: next(clock)
    try:
        w = ResponseWatch()
        w.see({"type": "http.response.start", "status": 200})
        for n in (3, 7, 12):
            chunk = {"text": "x" * n, "output_ids": list(range(n)), "meta_info": {"completion_tokens": n, "prompt_tokens": 5}}
            w.see({"type": "http.response.body", "body": f"data: {_json.dumps(chunk)}\n\n".encode(), "more_body": True})
        w.see({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        m = w.measure()
    finally:
        metrics.time.perf_counter = real
    assert m is not None and m.tokens_per_s == pytest.approx(11 / 1.1)
