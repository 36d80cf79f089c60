"""agentserve's own routes on SGLang's FastAPI app: the agent table and agent sessions.

- GET    /agentserve/v1/agents          per-agent and per-tier table (the console reads it)
- POST   /agentserve/v1/sessions        open a session {agent_id?, ttl_s?} -> 201 (sessions.py)
- GET    /agentserve/v1/sessions        how many are open (admin, when keys are configured)
- GET    /agentserve/v1/sessions/{id}   one session (its agent or the admin)
- DELETE /agentserve/v1/sessions/{id}   close it (its agent or the admin)
The middleware has already checked the API key (auth.py) and put the caller in the scope.
"""

from __future__ import annotations

import json
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sglang_ext.http.auth import Principal
from sglang_ext.http.errors import HttpError
from sglang_ext.http.identity import AGENT_ID_RE, ID_RULE
from sglang_ext.http.registry import AgentRegistry, registry

PRINCIPAL = "agentserve.principal"  # scope keys the middleware sets: the caller,
REGISTRY = "agentserve.registry"  # and the registry it checked them against
router = APIRouter()


class OpenSession(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    agent_id: Optional[str] = Field(default=None, pattern=AGENT_ID_RE.pattern)
    ttl_s: Optional[float] = Field(default=None, gt=0)


def _caller(request: Request) -> Optional[Principal]:
    return request.scope.get(PRINCIPAL)


def _registry(request: Request) -> AgentRegistry:
    reg = request.scope.get(REGISTRY)
    return reg if reg is not None else registry()


def _error(e: HttpError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers={k.decode(): v.decode() for k, v in e.headers()})


def _parse_open(raw: bytes) -> OpenSession:
    try:
        doc = json.loads(raw) if raw.strip() else {}
    except ValueError as e:
        raise HttpError(400, "body", f"body: invalid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise HttpError(400, "body", "body: expected a JSON object")
    if isinstance(doc.get("ttl_s"), int) and not isinstance(doc.get("ttl_s"), bool) and abs(doc["ttl_s"]) < 1 << 53:
        doc["ttl_s"] = float(doc["ttl_s"])  # JSON's 60 is a number of seconds too
    try:
        return OpenSession.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "body"
        if err["type"] == "extra_forbidden":
            raise HttpError(400, field, f"{field}: unknown field (allowed: agent_id, ttl_s)") from None
        if field == "agent_id":
            raise HttpError(400, field, f"agent_id: {ID_RULE}") from None
        raise HttpError(400, field, f"{field}: {err['msg'][0].lower() + err['msg'][1:]}") from None


@router.get("/agentserve/v1/agents")
async def agents(request: Request) -> JSONResponse:
    return JSONResponse(_registry(request).snapshot())


@router.post("/agentserve/v1/sessions")
async def open_session(request: Request) -> JSONResponse:
    store, who = _registry(request).sessions, _caller(request)
    try:
        body = _parse_open(await request.body())
        agent = body.agent_id or request.headers.get("x-agent-id") or "anonymous"
        if who is not None and who.agent is not None:
            if body.agent_id is not None and body.agent_id != who.agent:
                raise HttpError(403, "agent_id", f"agent_id: this API key belongs to agent '{who.agent}', "
                                "it may open sessions only for itself")
            agent = who.agent
        elif not AGENT_ID_RE.match(agent):
            raise HttpError(400, "x-agent-id", f"x-agent-id: an agent id {ID_RULE}")
        return JSONResponse(store.open(agent, body.ttl_s).view(), status_code=201)
    except HttpError as e:
        return _error(e)


@router.get("/agentserve/v1/sessions")
async def list_sessions(request: Request) -> JSONResponse:
    store = _registry(request).sessions
    return JSONResponse({"open": len(store), "ttl_s": store.ttl_s, "max_sessions": store.max_sessions})


def _owner(request: Request) -> Optional[str]:
    who = _caller(request)
    return who.agent if who is not None else None


@router.get("/agentserve/v1/sessions/{sid}")
async def get_session(sid: str, request: Request) -> JSONResponse:
    try:
        return JSONResponse(_registry(request).sessions.owned(sid, _owner(request)).view())
    except HttpError as e:
        return _error(e)


@router.delete("/agentserve/v1/sessions/{sid}")
async def close_session(sid: str, request: Request) -> JSONResponse:
    try:
        return JSONResponse({**_registry(request).sessions.close(sid, _owner(request)).view(), "closed": True})
    except HttpError as e:
        return _error(e)


