"""The agent middleware in front of a stand-in ASGI app: identity checks, tagging of the body
SGLang receives, session and admission errors (the real server tests cover the same paths
end to end; these pin the edge cases cheaply)."""

from __future__ import annotations

import asyncio
import json

import pytest

from sglang_ext.http.middleware import AgentMiddleware, AgentRegistry

PROFILE = {"interactivity_tiers": [{"name": "gold", "target_tokens_per_s": 5.0, "priority": 0, "max_concurrency": 1,
                                    "on_overload": "reject"}],
           "default_tier": "gold", "agents": {"known": "gold"}, "require_known_agents": True,
           "sessions": {"ttl_s": 60, "max_sessions": 4}}


class Backend:
    """Records what SGLang would receive; answers like a non-streamed chat completion."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        msg = await receive()
        self.bodies.append(json.loads(msg["body"]))
        assert dict(scope["headers"])[b"content-length"] == str(len(msg["body"])).encode()
        body = json.dumps({"usage": {"completion_tokens": 4}}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def call(mw: AgentMiddleware, method: str, path: str, body: dict | bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()] + [(b"content-length", str(len(raw)).encode())]}
    out: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(msg: dict) -> None:
        out.append(msg)

    asyncio.run(mw(scope, receive, send))
    status = next(m["status"] for m in out if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")
    return status, json.loads(payload) if payload else {}


@pytest.fixture()
def mw(serve_profile) -> tuple[AgentMiddleware, Backend]:
    serve_profile(PROFILE)
    backend = Backend()
    return AgentMiddleware(backend, AgentRegistry(max_labels=2)), backend


def test_known_agent_is_tagged_for_the_scheduler(mw) -> None:
    m, backend = mw
    status, _ = call(m, "POST", "/v1/chat/completions", {"messages": [], "custom_params": {"x": 1}}, {"x-agent-id": "known"})
    assert status == 200
    assert backend.bodies[-1]["custom_params"] == {"x": 1, "__agentserve_agent": "known", "__agentserve_tier": "gold",
                                                   "__agentserve_session": ""}
    status, _ = call(m, "POST", "/generate", {"text": "hi"}, {"x-agent-id": "known"})
    assert status == 200 and backend.bodies[-1]["sampling_params"]["custom_params"]["__agentserve_tier"] == "gold"


def test_unknown_agent_and_bad_user_field_are_refused_naming_the_field(mw) -> None:
    m, backend = mw
    status, body = call(m, "POST", "/v1/chat/completions", {"messages": []}, {"x-agent-id": "stranger"})
    assert status == 403 and body["param"] == "x-agent-id" and "stranger" in body["message"]
    status, body = call(m, "POST", "/v1/chat/completions", {"messages": [], "user": "bad user!"})
    assert status == 400 and body["param"] == "user"
    assert backend.bodies == []  # SGLang saw none of them


def test_sessions_through_the_middleware(mw) -> None:
    m, backend = mw
    status, sess = call(m, "POST", "/agentserve/v1/sessions", {"agent_id": "known"})
    assert status == 201
    status, _ = call(m, "POST", "/v1/chat/completions", {"messages": []}, {"x-agent-id": "known", "x-session-id": sess["id"]})
    assert status == 200 and backend.bodies[-1]["custom_params"]["__agentserve_session"] == sess["id"]
    assert call(m, "GET", f"/agentserve/v1/sessions/{sess['id']}")[1]["requests"] == 1
    status, body = call(m, "POST", "/agentserve/v1/sessions", b"{not json")
    assert status == 400 and body["param"] == "body"
    assert call(m, "DELETE", f"/agentserve/v1/sessions/{sess['id']}")[1]["closed"] is True
    status, body = call(m, "POST", "/v1/chat/completions", {"messages": []}, {"x-agent-id": "known", "x-session-id": sess["id"]})
    assert status == 404 and body["param"] == "x-session-id"
    snap = call(m, "GET", "/agentserve/v1/agents")[1]
    assert snap["sessions"]["open"] == 0 and snap["tiers"][0]["admitted"] == 1


def test_invalid_json_passes_through_untouched(mw) -> None:
    m, backend = mw
    with pytest.raises(json.JSONDecodeError):  # the stand-in backend cannot parse it either; SGLang answers 400
        call(m, "POST", "/v1/chat/completions", b"{oops", {"x-agent-id": "known"})
