"""Timing of each generation request and the per-agent, per-tier numbers it feeds.

A request's response is watched as it streams (`ResponseWatch`); when it ends, `measure` turns
what was seen into time to first token, inter-token latency and per-user decode tok/s:
- streamed: TTFT from the first chunk, decode speed from the first chunk to the last (a
  speculative step may stream several tokens in one chunk: the usage block counts them);
- whole answers: SGLang's own meta_info first_token_latency splits the wait (queue, prefill)
  from the decode, so a tier's speed means the same streamed or not. Without it (a whole chat
  completion) the answer's end bounds its first token.
`AgentTable` keeps the last WINDOW requests per agent for the console and writes the Prometheus
series. Label cardinality is bounded: the first `max_labels` agents keep their own label, later
ones share "other".
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from agentserve.profile import Tier

WINDOW = 256  # recent requests kept per agent for percentiles
TPS_BUCKETS = [1, 2, 4, 6, 8, 10, 12, 15, 20, 30, 50, 80, 120, 200, 400]
LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


@dataclass
class Measured:
    ttft_s: Optional[float]  # from when SGLang got the request (the admission wait is added by the caller)
    itl_s: Optional[float]
    tokens_per_s: Optional[float]


class ResponseWatch:
    """What a response sent: status, first-chunk time, chunk count, head and tail of the body."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first: Optional[float] = None
        self.chunks = 0
        self.status = 200
        self.head: list[bytes] = []
        self.tail: collections.deque = collections.deque(maxlen=3)

    def see(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            self.status = int(msg.get("status", 200))
        elif msg["type"] == "http.response.body" and msg.get("body"):
            if self.first is None:
                self.first = time.perf_counter()
            self.chunks += 1
            if len(self.head) < 64:  # enough to read a non-streamed usage block
                self.head.append(msg["body"])
            self.tail.append(msg["body"])

    def measure(self) -> Optional[Measured]:
        if self.status >= 400:
            return None
        t_end = time.perf_counter()
        streamed = self.chunks > 1
        tokens: Optional[int] = None
        meta: dict[str, Any] = {}
        if not streamed:
            try:
                data = json.loads(b"".join(self.head))
                if isinstance(data, dict):  # a batch /generate answers a list: no one user's speed
                    meta = data.get("meta_info") if isinstance(data.get("meta_info"), dict) else {}
                    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
                    tokens = usage.get("completion_tokens") or meta.get("completion_tokens")
            except ValueError:
                pass
        else:
            tokens = streamed_usage(b"".join(self.tail))
        if not _is_number(tokens):
            tokens = None
        ttft = (self.first - self.t0) if (streamed and self.first is not None) else None
        n = (tokens or self.chunks) if streamed else tokens
        decode_s = None  # seconds from the first token to the last, where known
        if streamed and self.first is not None:
            decode_s = t_end - self.first
        elif _is_number(meta.get("e2e_latency")) and _is_number(meta.get("first_token_latency")):
            ttft = float(meta["first_token_latency"])
            decode_s = float(meta["e2e_latency"]) - ttft
        if n and decode_s is not None and decode_s > 0 and n > 2:
            itl, tps = decode_s / (n - 1), (n - 1) / decode_s
        elif n:
            itl, tps = (t_end - self.t0) / n, n / (t_end - self.t0)
        else:
            itl = tps = None
        if ttft is None and n:
            ttft = t_end - self.t0  # a whole answer without meta_info: its end bounds its first token
        return Measured(ttft, itl, tps)


def streamed_usage(tail: bytes) -> Optional[int]:
    """completion_tokens from the last SSE chunks: OpenAI's `usage` (present when
    stream_options.include_usage) or SGLang /generate's `meta_info`. Without it the caller
    counts chunks, and a speculative step streams several tokens in one chunk: a /generate
    answer at 52 tok/s counted as ~12 (τ ≈ 4.2), so the tier gate saw misses that were not."""
    for line in reversed(tail.decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("data:") and ('"usage"' in line or '"meta_info"' in line):
            try:
                data = json.loads(line[5:])
                usage = (data.get("usage") or data.get("meta_info") or {}) if isinstance(data, dict) else {}
            except (ValueError, AttributeError):
                continue
            if isinstance(usage, dict) and _is_number(usage.get("completion_tokens")) and usage["completion_tokens"]:
                return int(usage["completion_tokens"])
    return None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_PROM: Optional[dict[str, Any]] = None


def prom() -> dict[str, Any]:
    """The process's Prometheus series (one set, however many tables: prometheus_client's registry is global)."""
    global _PROM
    if _PROM is None:
        from prometheus_client import Counter, Histogram

        lab = ["agent", "tier"]
        _PROM = {
            "requests": Counter("agentserve:agent_requests_total", "Generation requests per agent", lab),
            "ttft": Histogram("agentserve:agent_time_to_first_token_seconds",
                              "Time to first token per agent, admission wait included", lab, buckets=LATENCY_BUCKETS),
            "itl": Histogram("agentserve:agent_inter_token_latency_seconds",
                             "Mean inter-token latency per request, per agent", lab, buckets=LATENCY_BUCKETS),
            "tps": Histogram("agentserve:agent_user_tokens_per_second", "Decode tokens/s seen by one request, per agent",
                             lab, buckets=TPS_BUCKETS),
            "tier_tps": Histogram("agentserve:tier_user_tokens_per_second", "Decode tokens/s seen by one request, per tier",
                                  ["tier"], buckets=TPS_BUCKETS),
            "tier_met": Counter("agentserve:tier_target_met_total", "Finished requests that kept every promise of their "
                                "tier (decode speed and time to first token, admission wait included)", ["tier"]),
            "tier_finished": Counter("agentserve:tier_finished_total", "Finished requests of a tier with a promise",
                                     ["tier"]),
            "admission": Counter("agentserve:tier_admission_total",
                                 "Admission decisions per tier (admitted, queued, rejected, timed_out)", ["tier", "outcome"]),
        }
    return _PROM


@dataclass
class AgentStats:
    agent_id: str
    tier: Optional[str] = None
    requests: int = 0
    running: int = 0
    ttft: collections.deque = field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    itl: collections.deque = field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    tps: collections.deque = field(default_factory=lambda: collections.deque(maxlen=WINDOW))

    def row(self) -> dict[str, Any]:
        def pct(xs: collections.deque, q: float) -> Optional[float]:
            if not xs:
                return None
            s = sorted(xs)
            return s[min(len(s) - 1, int(q * len(s)))]

        return {"agent_id": self.agent_id, "tier": self.tier, "requests": self.requests, "running": self.running,
                "ttft_p50_s": pct(self.ttft, 0.5), "ttft_p95_s": pct(self.ttft, 0.95),
                "itl_p50_s": pct(self.itl, 0.5), "itl_p95_s": pct(self.itl, 0.95),
                "tokens_per_s": (sum(self.tps) / len(self.tps)) if self.tps else None,
                "accept_length": None, "copy_share": None}


class AgentTable:
    def __init__(self, max_labels: int) -> None:
        self.max_labels = max_labels
        self.agents: dict[str, AgentStats] = {}
        self.labelled: set[str] = set()
        self.lock = threading.Lock()

    def label(self, agent: str) -> str:
        with self.lock:
            if agent in self.labelled or len(self.labelled) < self.max_labels:
                self.labelled.add(agent)
                return agent
        return "other"

    def label_of(self, agent: str) -> str:
        with self.lock:
            return agent if agent in self.labelled else "other"

    def get(self, agent: str, tier: Optional[str]) -> AgentStats:
        with self.lock:
            st = self.agents.get(agent)
            if st is None:
                st = self.agents[agent] = AgentStats(agent, tier)
            st.tier = tier
            return st

    def rows(self) -> list[dict[str, Any]]:
        with self.lock:
            return [a.row() for a in self.agents.values()]

    def started(self, st: AgentStats) -> None:
        with self.lock:
            st.requests += 1
            st.running += 1

    def finished(self, st: AgentStats) -> None:
        with self.lock:
            st.running -= 1

    def prom(self) -> dict[str, Any]:
        return prom()

    def count_admission(self, tier: Optional[Tier], outcome: str) -> None:
        if tier is not None:
            self.prom()["admission"].labels(tier=tier.name, outcome=outcome).inc()

    def record(self, st: AgentStats, label: str, tier: Optional[Tier], m: Measured) -> None:
        """Keep one finished request's numbers (ttft_s from its arrival) and count its tier's promise."""
        with self.lock:
            if m.ttft_s is not None:
                st.ttft.append(m.ttft_s)
            if m.itl_s is not None:
                st.itl.append(m.itl_s)
                st.tps.append(m.tokens_per_s)
        p = self.prom()
        lab = {"agent": label, "tier": tier.name if tier else "none"}
        p["requests"].labels(**lab).inc()
        if m.ttft_s is not None:
            p["ttft"].labels(**lab).observe(m.ttft_s)
        if m.itl_s is not None:
            p["itl"].labels(**lab).observe(m.itl_s)
            p["tps"].labels(**lab).observe(m.tokens_per_s)
            if tier is not None:
                p["tier_tps"].labels(tier=tier.name).observe(m.tokens_per_s)
        if tier is not None:
            met = tier.met(m.tokens_per_s, m.ttft_s)
            if met is not None:
                p["tier_finished"].labels(tier=tier.name).inc()
                if met:
                    p["tier_met"].labels(tier=tier.name).inc()
