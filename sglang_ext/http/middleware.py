"""Agent identity, sessions, tier admission and per-agent metrics on SGLang's HTTP server.

An ASGI middleware (added by the plugin in the HTTP process) handles each generation request
(`/v1/chat/completions`, `/v1/completions`, `/generate`):
1. identity — header `x-agent-id`, else the OpenAI `user` field, else "anonymous"; tier —
   header `x-agent-tier`, else the profile's agent mapping, else its default tier; session —
   header `x-session-id` (opened with POST /agentserve/v1/sessions, see sessions.py).
   Bad values answer 4xx naming the header; SGLang never sees the request.
2. admission — the tier gate (admission.py) starts, queues or refuses the request;
3. tagging — agent label, tier and session go to the scheduler in SGLang's own
   `custom_params` transport (keys `__agentserve_*`), where the speculative worker uses them
   (tier weights, per-session draft index, per-agent acceptance metrics);
4. timing — TTFT from the first streamed chunk, per-user tok/s, kept per agent.
`GET /agentserve/v1/agents` returns the per-agent and per-tier table the console shows
(τ and copy share per agent come from the worker's Prometheus counters). Label cardinality
is bounded: the first `max_agents` agents keep their own label, later ones share "other".
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from sglang_ext.tiers.admission import Overloaded, TierGate
from sglang_ext.tiers.load_report import CapacityModel
from sglang_ext import config
from sglang_ext.http.sessions import SessionError, SessionStore

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/generate")
AGENT_ID_RE = re.compile(r"^[A-Za-z0-9_.:@/-]{1,128}$")
log = logging.getLogger(__name__)
MAX_AGENTS = int(os.environ.get("AGENTSERVE_MAX_AGENT_LABELS", "32"))
WINDOW = 256  # recent requests kept per agent for percentiles
TPS_BUCKETS = [1, 2, 4, 6, 8, 10, 12, 15, 20, 30, 50, 80, 120, 200, 400]


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
        prof = config.served()
        self.tiers = {t.name: t for t in prof.interactivity_tiers}
        self.agent_tiers: dict[str, str] = dict(prof.agents)
        self.default_tier: str | None = prof.default_tier
        self.require_known = prof.require_known_agents
        self.sessions = SessionStore(ttl_s=prof.sessions.ttl_s, max_sessions=prof.sessions.max_sessions)
        self.gate = TierGate(prof.interactivity_tiers, enabled=prof.admission_control,
                             capacity=CapacityModel.for_port(prof.server.port) if prof.admission_predict else None,
                             margin=prof.admission_margin, live=prof.admission_live,
                             plan=prof.admission_plan, return_s=prof.admission_return_s)

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
                                 ["agent", "tier"], buckets=TPS_BUCKETS),
                "tier_tps": Histogram("agentserve:tier_user_tokens_per_second", "Decode tokens/s seen by one request, per tier",
                                      ["tier"], buckets=TPS_BUCKETS),
                "tier_met": Counter("agentserve:tier_target_met_total", "Finished requests that met their tier's target speed",
                                    ["tier"]),
                "tier_finished": Counter("agentserve:tier_finished_total", "Finished requests of a tier with a target speed",
                                         ["tier"]),
                "admission": Counter("agentserve:tier_admission_total",
                                     "Admission decisions per tier (admitted, queued, rejected, timed_out)", ["tier", "outcome"]),
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
        spec = worker_agent_stats()
        for r in rows:
            sp = spec.get(self.label_of(r["agent_id"]))
            if sp:
                r.update(sp)
        tiers = self.gate.snapshot()
        for t in tiers:  # the console's names for the gate's counters
            t["refused"] = t["rejected"] + t["timed_out"]
            t["queued"] = t["queued"]
        return {"agents": rows, "tiers": tiers, "sessions": {"open": len(self.sessions), "ttl_s": self.sessions.ttl_s,
                                                              "max_sessions": self.sessions.max_sessions,
                                                              "expired": self.sessions.expired_total}}

    def label_of(self, agent: str) -> str:
        with self.lock:
            return agent if agent in self.labelled else "other"



def worker_agent_stats() -> dict[str, dict[str, float | None]]:
    """Per agent label: τ (tokens per verify step) and the copy share of accepted drafts, from
    the speculative worker's counters (scheduler process) via SGLang's multiprocess directory."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return {}
    try:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=path)
        steps: dict[str, float] = collections.defaultdict(float)
        toks: dict[str, float] = collections.defaultdict(float)
        acc: dict[tuple[str, str], float] = collections.defaultdict(float)
        for fam in reg.collect():
            for s in fam.samples:
                if s.name == "agentserve:agent_spec_steps_total":
                    steps[s.labels["agent"]] += s.value
                elif s.name == "agentserve:agent_spec_tokens_total":
                    toks[s.labels["agent"]] += s.value
                elif s.name == "agentserve:agent_spec_accepted_drafts_total":
                    acc[(s.labels["agent"], s.labels["source"])] += s.value
    except Exception:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for agent, n in steps.items():
        # copied drafts from either source: the session index ("copy") or the radix tree ("radix")
        a_copy = acc.get((agent, "copy"), 0.0) + acc.get((agent, "radix"), 0.0)
        a_model = acc.get((agent, "model"), 0.0)
        out[agent] = {"accept_length": toks[agent] / n if n else None,
                      "copy_share": a_copy / (a_copy + a_model) if a_copy + a_model else None}
    return out


REGISTRY = AgentRegistry()

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
CUSTOM_KEYS = ("__agentserve_agent", "__agentserve_tier", "__agentserve_session")


def _json_response(status: int, payload: dict[str, Any], extra_headers: list[tuple[bytes, bytes]] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps(payload).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
             + (extra_headers or [])}
    return start, {"type": "http.response.body", "body": body}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _error(status: int, param: str, message: str) -> dict[str, Any]:
    kind = {400: "BadRequestError", 403: "PermissionDeniedError", 404: "NotFoundError", 429: "RateLimitError",
            503: "ServiceUnavailableError"}.get(status, "Error")
    return {"object": "error", "type": kind, "code": status, "param": param, "message": message}


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return b"".join(parts)


def tag_request(path: str, doc: dict[str, Any], tags: dict[str, str]) -> None:
    """Put our tags into SGLang's custom_params (the scheduler receives them on each Req)."""
    def merge(holder: dict[str, Any]) -> None:
        cp = holder.get("custom_params")
        holder["custom_params"] = {**(cp if isinstance(cp, dict) else {}), **tags}

    if path == "/generate":
        sp = doc.get("sampling_params")
        if sp is None:
            doc["sampling_params"] = sp = {}
        for holder in (sp if isinstance(sp, list) else [sp]):
            if isinstance(holder, dict):
                merge(holder)
    else:
        merge(doc)


class AgentMiddleware:
    def __init__(self, app: Callable[..., Awaitable[None]], registry: AgentRegistry = REGISTRY):
        self.app = app
        self.registry = registry

    async def _reply(self, send: Send, status: int, payload: dict[str, Any], retry_after: int | None = None) -> None:
        extra = [(b"retry-after", str(retry_after).encode())] if retry_after else None
        start, body = _json_response(status, payload, extra)
        await send(start)
        await send(body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method")
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        if path == "/agentserve/v1/agents" and method == "GET":
            return await self._reply(send, 200, self.registry.snapshot())
        if path.startswith("/agentserve/v1/sessions"):
            return await self._sessions(path, method, headers, receive, send)
        if path not in GENERATION_PATHS or method != "POST":
            return await self.app(scope, receive, send)

        raw = await _read_body(receive)
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = None  # SGLang answers invalid JSON itself
        if not isinstance(doc, dict):
            doc = None
        user = doc.get("user") if doc is not None else None
        agent = (headers.get("x-agent-id") or (user if isinstance(user, str) and user else "anonymous")).strip()
        if not AGENT_ID_RE.match(agent):
            param = "x-agent-id" if "x-agent-id" in headers else "user"
            return await self._reply(send, 400, _error(400, param, f"{param}: an agent id must be 1-128 characters of "
                                                       "letters, digits and _.:@/-"))
        if self.registry.require_known and agent not in self.registry.agent_tiers:
            return await self._reply(send, 403, _error(403, "x-agent-id", f"x-agent-id: unknown agent '{agent}' (this "
                                                       "server only serves the agents listed in its profile)"))
        tier, err = self.registry.resolve_tier(agent, headers.get("x-agent-tier"))
        if err:
            return await self._reply(send, 400, _error(400, "x-agent-tier", err))
        sid = headers.get("x-session-id")
        if sid is not None:
            try:
                self.registry.sessions.use(sid, agent)
            except SessionError as e:
                return await self._reply(send, e.status, _error(e.status, e.param, e.message))

        st = self.registry.get(agent, tier)
        label = self.registry.label(agent)
        if doc is not None:
            tags = {"__agentserve_agent": label, "__agentserve_tier": tier or "", "__agentserve_session": sid or ""}
            tag_request(path, doc, tags)
            raw = json.dumps(doc).encode()
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"] + [
                (b"content-length", str(len(raw)).encode())]

        try:
            if await self.registry.gate.admit(tier):
                self._count_admission(tier, "queued")
        except Overloaded as e:
            self._count_admission(tier, "rejected" if e.status == 429 else "timed_out")
            return await self._reply(send, e.status, _error(e.status, "x-agent-tier", e.message), e.retry_after)
        self._count_admission(tier, "admitted")

        sent = [False]

        async def replay() -> dict[str, Any]:
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        t0 = time.perf_counter()
        first: list[float] = []
        chunks = [0]
        status = [200]
        body_parts: list[bytes] = []
        tail: collections.deque = collections.deque(maxlen=3)

        async def timed_send(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                status[0] = int(msg.get("status", 200))
            elif msg["type"] == "http.response.body" and msg.get("body"):
                if not first:
                    first.append(time.perf_counter())
                chunks[0] += 1
                if len(body_parts) < 64:  # enough to read a non-streamed usage block
                    body_parts.append(msg["body"])
                tail.append(msg["body"])
            await send(msg)

        with self.registry.lock:
            st.requests += 1
            st.running += 1
        tps: float | None = None
        try:
            await self.app(scope, replay, timed_send)
        finally:
            with self.registry.lock:
                st.running -= 1
            try:
                tps = self._record(st, label, tier, t0, first, chunks[0], status[0], b"".join(body_parts),
                                   b"".join(tail))
            except Exception as e:  # bookkeeping must never leak an admission slot
                log.warning("agent metrics for a request failed: %s", e)
            await self.registry.gate.release(tier, tps)

    def _count_admission(self, tier: str | None, outcome: str) -> None:
        if tier is None:
            return
        try:
            self.registry.metrics()["admission"].labels(tier=tier, outcome=outcome).inc()
        except Exception:
            pass

    async def _sessions(self, path: str, method: str | None, headers: dict[str, str], receive: Receive,
                        send: Send) -> None:
        store = self.registry.sessions
        rest = path[len("/agentserve/v1/sessions"):].strip("/")
        try:
            if not rest and method == "POST":
                raw = await _read_body(receive)
                try:
                    doc = json.loads(raw) if raw.strip() else {}
                except ValueError as e:
                    raise SessionError(400, "body", f"body: invalid JSON ({e})") from None
                if not isinstance(doc, dict):
                    raise SessionError(400, "body", "body: expected a JSON object")
                unknown = sorted(set(doc) - {"agent_id", "ttl_s"})
                if unknown:
                    raise SessionError(400, unknown[0], f"{unknown[0]}: unknown field (allowed: agent_id, ttl_s)")
                agent = doc.get("agent_id", headers.get("x-agent-id", "anonymous"))
                if not isinstance(agent, str) or not AGENT_ID_RE.match(agent):
                    raise SessionError(400, "agent_id", "agent_id: must be 1-128 characters of letters, digits and _.:@/-")
                return await self._reply(send, 201, store.open(agent, doc.get("ttl_s")).view())
            if rest and "/" not in rest and method == "GET":
                return await self._reply(send, 200, store.get(rest).view())
            if rest and "/" not in rest and method == "DELETE":
                return await self._reply(send, 200, {**store.close(rest).view(), "closed": True})
            if not rest and method == "GET":
                return await self._reply(send, 200, {"open": len(store), "ttl_s": store.ttl_s,
                                                     "max_sessions": store.max_sessions})
            raise SessionError(405 if not rest or "/" not in rest else 404, "path", f"path: {method} {path} is not a sessions route")
        except SessionError as e:
            return await self._reply(send, e.status, _error(e.status, e.param, e.message))

    def _record(self, st: AgentStats, label: str, tier: str | None, t0: float, first: list[float], chunks: int,
                status: int, body: bytes, tail: bytes = b"") -> float | None:
        if status >= 400:
            return None
        t_end = time.perf_counter()
        streamed = chunks > 1
        tokens = None
        meta: dict[str, Any] = {}
        if not streamed:
            try:
                data = json.loads(body)
                if isinstance(data, dict):  # a batch /generate answers a list: no one user's speed
                    meta = data.get("meta_info") or {}
                    tokens = (data.get("usage") or {}).get("completion_tokens") or meta.get("completion_tokens")
            except (ValueError, AttributeError):
                pass
        else:  # a speculative step may stream several tokens in one chunk: prefer the usage block
            tokens = _streamed_usage(tail)
        ttft = (first[0] - t0) if (streamed and first) else None
        n = (tokens or chunks) if streamed else tokens
        decode_s = None  # seconds from the first token to the last, where known
        if streamed and first:
            decode_s = t_end - first[0]
        elif _is_number(meta.get("e2e_latency")) and _is_number(meta.get("first_token_latency")):
            # a whole answer at once: SGLang's own first-token time splits the wait (queue,
            # prefill) from the decode, so a tier's speed means the same streamed or not
            ttft = float(meta["first_token_latency"])
            decode_s = float(meta["e2e_latency"]) - ttft
        if decode_s is not None and decode_s > 0 and n and n > 2:
            itl = decode_s / (n - 1)
            tps = (n - 1) / decode_s
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
                if tier:
                    m["tier_tps"].labels(tier=tier).observe(tps)
                    target = t.target_tokens_per_s if (t := self.registry.tiers.get(tier)) else None
                    if target:
                        m["tier_finished"].labels(tier=tier).inc()
                        if tps >= target:
                            m["tier_met"].labels(tier=tier).inc()
        except Exception:
            pass
        return tps


def _streamed_usage(tail: bytes) -> int | None:
    """completion_tokens from the last SSE chunks (present when stream_options.include_usage)."""
    for line in reversed(tail.decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("data:") and '"usage"' in line:
            try:
                usage = json.loads(line[5:]).get("usage") or {}
            except ValueError:
                continue
            if usage.get("completion_tokens"):
                return int(usage["completion_tokens"])
    return None


def install(app: Any) -> None:
    """Add the middleware to SGLang's FastAPI app (once)."""
    if not getattr(app.state, "agentserve_agents", False):
        app.add_middleware(AgentMiddleware)
        app.state.agentserve_agents = True
