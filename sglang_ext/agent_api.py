"""Agent identity and per-agent metrics on SGLang's HTTP server.

An ASGI middleware (added by the plugin in the HTTP process) reads the agent identity of
each generation request — header `x-agent-id` (default "anonymous") and optional
`x-agent-tier` — checks them against the profile (unknown tier: 400 naming the header),
times the response (TTFT from the first streamed chunk, per-user tok/s from the token count)
and keeps per-agent statistics. `GET /agentserve/v1/agents` returns the per-agent table the
console shows; Prometheus gets per-agent histograms with bounded label cardinality (the first
`max_agents` agents seen keep their own label, later ones share "other").
"""

from __future__ import annotations

import collections
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/generate")
AGENT_ID_RE = re.compile(r"^[A-Za-z0-9_.:@/-]{1,128}$")
MAX_AGENTS = int(os.environ.get("AGENTSERVE_MAX_AGENT_LABELS", "32"))
WINDOW = 256  # recent requests kept per agent for percentiles


def _profile() -> dict[str, Any]:
    try:
        return json.loads(os.environ.get("AGENTSERVE_PROFILE_JSON", "{}"))
    except ValueError:
        return {}


@dataclass
class AgentStats:
    agent_id: str
    tier: str | None = None
    requests: int = 0
    running: int = 0
    ttft: collections.deque = field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    itl: collections.deque = field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    tps: collections.deque = field(default_factory=lambda: collections.deque(maxlen=WINDOW))

    def row(self) -> dict[str, Any]:
        def pct(xs: collections.deque, q: float) -> float | None:
            if not xs:
                return None
            s = sorted(xs)
            return s[min(len(s) - 1, int(q * len(s)))]

        return {"agent_id": self.agent_id, "tier": self.tier, "requests": self.requests, "running": self.running,
                "ttft_p50_s": pct(self.ttft, 0.5), "ttft_p95_s": pct(self.ttft, 0.95),
                "itl_p50_s": pct(self.itl, 0.5), "itl_p95_s": pct(self.itl, 0.95),
                "tokens_per_s": (sum(self.tps) / len(self.tps)) if self.tps else None,
                "accept_length": None, "copy_share": None}


class AgentRegistry:
    def __init__(self, max_labels: int = MAX_AGENTS):
        self.max_labels = max_labels
        self.agents: dict[str, AgentStats] = {}
        self.labelled: set[str] = set()
        self.lock = threading.Lock()
        self._metrics: dict[str, Any] | None = None
        prof = _profile()
        self.tiers = {t["name"]: t for t in prof.get("interactivity_tiers", [])}
        self.agent_tiers: dict[str, str] = prof.get("agents", {}) or {}
        self.default_tier: str | None = prof.get("default_tier")

    def label(self, agent: str) -> str:
        with self.lock:
            if agent in self.labelled or len(self.labelled) < self.max_labels:
                self.labelled.add(agent)
                return agent
        return "other"

    def metrics(self) -> dict[str, Any]:
        if self._metrics is None:
            from prometheus_client import Counter, Histogram

            lat = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
            self._metrics = {
                "requests": Counter("agentserve:agent_requests_total", "Generation requests per agent", ["agent", "tier"]),
                "ttft": Histogram("agentserve:agent_time_to_first_token_seconds", "Time to first token per agent", ["agent", "tier"], buckets=lat),
                "itl": Histogram("agentserve:agent_inter_token_latency_seconds", "Mean inter-token latency per request, per agent", ["agent", "tier"], buckets=lat),
                "tps": Histogram("agentserve:agent_user_tokens_per_second", "Decode tokens/s seen by one request, per agent",
                                 ["agent", "tier"], buckets=[1, 2, 5, 10, 15, 20, 30, 50, 80, 120, 200, 400]),
            }
        return self._metrics

    def resolve_tier(self, agent: str, requested: str | None) -> tuple[str | None, str | None]:
        """(tier, error) — an explicit unknown tier is an error, as in the profile's tier lookup."""
        if requested:
            if self.tiers and requested not in self.tiers:
                return None, f"x-agent-tier: unknown tier '{requested}' (known: {sorted(self.tiers)})"
            return requested, None
        return self.agent_tiers.get(agent) or self.default_tier, None

    def get(self, agent: str, tier: str | None) -> AgentStats:
        with self.lock:
            st = self.agents.get(agent)
            if st is None:
                st = self.agents[agent] = AgentStats(agent, tier)
            st.tier = tier
            return st

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            rows = [a.row() for a in self.agents.values()]
        tiers = []
        for name, t in self.tiers.items():
            members = [r for r in rows if r["tier"] == name and r["tokens_per_s"] is not None]
            target = t.get("target_tokens_per_s")
            att = None
            if target and members:
                att = sum(1 for r in members if r["tokens_per_s"] >= target) / len(members)
            tiers.append({"name": name, "target_tokens_per_s": target, "attainment": att,
                          "admitted": sum(r["requests"] for r in rows if r["tier"] == name), "queued": 0, "refused": 0})
        return {"agents": rows, "tiers": tiers}


REGISTRY = AgentRegistry()

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _json_response(status: int, payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps(payload).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, {"type": "http.response.body", "body": body}


class AgentMiddleware:
    def __init__(self, app: Callable[..., Awaitable[None]], registry: AgentRegistry = REGISTRY):
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path == "/agentserve/v1/agents" and scope.get("method") == "GET":
            start, body = _json_response(200, self.registry.snapshot())
            await send(start)
            await send(body)
            return
        if path not in GENERATION_PATHS or scope.get("method") != "POST":
            return await self.app(scope, receive, send)

        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        agent = headers.get("x-agent-id", "anonymous").strip()
        if not AGENT_ID_RE.match(agent):
            start, body = _json_response(400, {"object": "error", "type": "BadRequestError", "code": 400, "param": "x-agent-id",
                                               "message": "x-agent-id: must be 1-128 characters of letters, digits and _.:@/-"})
            await send(start)
            await send(body)
            return
        tier, err = self.registry.resolve_tier(agent, headers.get("x-agent-tier"))
        if err:
            start, body = _json_response(400, {"object": "error", "type": "BadRequestError", "code": 400,
                                               "param": "x-agent-tier", "message": err})
            await send(start)
            await send(body)
            return

        st = self.registry.get(agent, tier)
        label = self.registry.label(agent)
        t0 = time.perf_counter()
        first: list[float] = []
        chunks = [0]
        status = [200]
        body_parts: list[bytes] = []

        async def timed_send(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                status[0] = int(msg.get("status", 200))
            elif msg["type"] == "http.response.body" and msg.get("body"):
                if not first:
                    first.append(time.perf_counter())
                chunks[0] += 1
                if len(body_parts) < 64:  # enough to read a non-streamed usage block
                    body_parts.append(msg["body"])
            await send(msg)

        with self.registry.lock:
            st.requests += 1
            st.running += 1
        try:
            await self.app(scope, receive, timed_send)
        finally:
            with self.registry.lock:
                st.running -= 1
            self._record(st, label, tier, t0, first, chunks[0], status[0], b"".join(body_parts))

    def _record(self, st: AgentStats, label: str, tier: str | None, t0: float, first: list[float], chunks: int,
                status: int, body: bytes) -> None:
        if status >= 400:
            return
        t_end = time.perf_counter()
        streamed = chunks > 1
        tokens = None
        if not streamed:
            try:
                data = json.loads(body)
                tokens = (data.get("usage") or {}).get("completion_tokens") or (data.get("meta_info") or {}).get("completion_tokens")
            except ValueError:
                pass
        ttft = (first[0] - t0) if (streamed and first) else None
        n = chunks if streamed else tokens
        if streamed and first and chunks > 2:
            itl = (t_end - first[0]) / (chunks - 1)
            tps = (chunks - 1) / (t_end - first[0])
        elif n:
            itl = (t_end - t0) / n
            tps = n / (t_end - t0)
        else:
            itl = tps = None
        with self.registry.lock:
            if ttft is not None:
                st.ttft.append(ttft)
            if itl is not None:
                st.itl.append(itl)
                st.tps.append(tps)
        try:
            m = self.registry.metrics()
            lab = {"agent": label, "tier": tier or "none"}
            m["requests"].labels(**lab).inc()
            if ttft is not None:
                m["ttft"].labels(**lab).observe(ttft)
            if itl is not None:
                m["itl"].labels(**lab).observe(itl)
                m["tps"].labels(**lab).observe(tps)
        except Exception:
            pass


def install(app: Any) -> None:
    """Add the middleware to SGLang's FastAPI app (once)."""
    if not getattr(app.state, "agentserve_agents", False):
        app.add_middleware(AgentMiddleware)
        app.state.agentserve_agents = True
