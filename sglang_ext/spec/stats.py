"""Prometheus metrics of our speculative workers, in SGLang's naming style.

They are created in the scheduler process; SGLang's /metrics (multiprocess collector) exports
them with its own. Creation and updates never raise: metrics must not break serving.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

log = logging.getLogger(__name__)
# Where an accepted copied draft came from: this session's suffix index, the cross-session index
# of its agent/tier (copy/shared_index.py) or SGLang's radix tree. Label values of `source`.
COPY_SOURCES = ("session", "shared", "radix")
ORIGIN_SOURCE = {"index": "session", "shared": "shared", "radix": "radix"}  # HybridDecision.origin -> source


@dataclass
class StepStats:
    """What the last decode step did, for metrics, the console and the step trace."""

    batch_size: int = 0
    verify_width: int = 1
    verify_tokens: int = 0  # batch tokens of the forward (ragged: sum of 1 + l_r; plain: batch size)
    verify_lens: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    schedule_s: float = 0.0
    verify_s: float = 0.0
    fallback: bool = False
    plain: bool = False  # nothing verified beyond the anchor: plain decoding's DECODE step
    sources: list[str] = field(default_factory=list)  # a COPY_SOURCES entry, "model" or "none" per request
    agents: list[str] = field(default_factory=list)  # agent label per request ("" untagged)
    tiers: list[str] = field(default_factory=list)  # tier per request ("" untagged)
    emitted: list[int] = field(default_factory=list)  # tokens committed per request
    expected: list[float] = field(default_factory=list)  # expected accepted drafts per request, before sampling
    # What the step's continuing requests waited for since the previous decode step: the gap
    # from its end to this step's start, and the prefill forwards run in that gap (a prefill
    # stall: every running stream stops while a new request is prefilled).
    gap_s: float = 0.0
    prefill_s: float = 0.0
    waited: list[bool] = field(default_factory=list)  # per request: was in the previous decode step
    rids: list[str] = field(default_factory=list)  # trace only
    proposed: list[int] = field(default_factory=list)  # trace only: drafts proposed per request (l_r <= this)
    t: float = 0.0  # wall-clock end of the step (trace only)
_m: dict[str, Any] | None = None
_trace_path = os.environ.get("AGENTSERVE_STEP_TRACE") or None


def _metrics() -> dict[str, Any] | None:
    global _m
    if _m is not None:
        return _m or None
    try:
        from prometheus_client import Counter, Gauge, Histogram

        width_buckets = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 24, 32, 64]
        _m = {
            "fallback": Counter("agentserve:drafter_fallback_total", "Steps decoded plainly because the drafter was missing or failed", ["reason"]),
            "width": Histogram("agentserve:verify_width", "Verify positions per request in a step (1 + max verify length)", buckets=width_buckets),
            "budget": Histogram("agentserve:verify_budget_tokens", "Draft tokens verified in a step, all requests", buckets=[0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256]),
            "req_len": Histogram("agentserve:verify_len_per_request", "Draft tokens verified per request per step", buckets=width_buckets),
            "tokens": Histogram("agentserve:verify_batch_tokens", "Batch tokens of a verify forward (ragged: sum of each request's 1 + verify length)",
                                buckets=[1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256]),
            "ragged": Counter("agentserve:verify_ragged_steps_total", "Verify steps whose requests ran different widths (each only its own block)"),
            "batch": Histogram("agentserve:spec_batch_size", "Requests per speculative step", buckets=width_buckets),
            "phase": Histogram("agentserve:spec_step_seconds", "Time per speculative step phase", ["phase"],
                               buckets=[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5]),
            "proposed": Counter("agentserve:spec_verified_drafts_total", "Drafts verified, by position in the block", ["position"]),
            "accepted": Counter("agentserve:spec_accepted_drafts_total", "Drafts accepted, by position in the block", ["position"]),
            # reached: verified with every earlier draft of the block accepted; accepted/reached
            # is the conditional acceptance per position (paper Figure 2)
            "reached": Counter("agentserve:spec_reached_drafts_total", "Drafts verified after all earlier drafts of the block were accepted", ["position"]),
            "src_verified": Counter("agentserve:spec_source_verified_drafts_total", "Drafts verified, by source (session: this session's suffix index; shared: the agent/tier cross-session index; radix: radix tree continuation; model: DSpark drafter)", ["source"]),
            "src_accepted": Counter("agentserve:spec_source_accepted_drafts_total", "Drafts accepted, by source (session: this session's suffix index; shared: the agent/tier cross-session index; radix: radix tree continuation; model: DSpark drafter)", ["source"]),
            # per agent (labels bounded by the HTTP middleware: top-N agents, then "other")
            "agent_steps": Counter("agentserve:agent_spec_steps_total", "Speculative decode steps that included a request of the agent", ["agent"]),
            "agent_tokens": Counter("agentserve:agent_spec_tokens_total", "Tokens committed by speculative steps, per agent", ["agent"]),
            "agent_accepted": Counter("agentserve:agent_spec_accepted_drafts_total", "Drafts accepted per agent and source", ["agent", "source"]),
            "seeded": Counter("agentserve:drafter_context_seeded_positions_total", "Prompt positions the radix cache held whose drafter context came from an earlier request's (no target run)"),
            "mixed": Counter("agentserve:spec_mixed_steps_total", "Extend steps that also decoded the running requests (--enable-mixed-chunk)"),
            "stall": Counter("agentserve:tier_prefill_stall_seconds_total", "Request-seconds running requests of the tier waited on other requests' prefills between two decode steps", ["tier"]),
            "held": Counter("agentserve:tier_prefill_held_total", "Scheduling rounds a waiting request of the tier was held back by prefill pacing (its prefill would break a running promise)", ["tier"]),
            "held_now": Gauge("agentserve:tier_prefill_held_requests", "Waiting requests of the tier held back by prefill pacing at the last scheduling round", ["tier"],
                              multiprocess_mode="mostrecent"),
            # copy-drafting memory (soak and `bench agents` sample these: bounded, flat under load)
            "index_session": Gauge("agentserve:draft_index_session_tokens", "Tokens held by the per-session suffix indexes",
                                   multiprocess_mode="mostrecent"),
            "index_shared": Gauge("agentserve:draft_index_shared_tokens", "Tokens held by the cross-session (agent/tier/global) index",
                                  multiprocess_mode="mostrecent"),
            "index_sessions": Gauge("agentserve:draft_index_sessions", "Session suffix indexes held", multiprocess_mode="mostrecent"),
            "tier_len": Histogram("agentserve:tier_verify_len_per_request", "Draft tokens verified per request per step, per tier", ["tier"], buckets=width_buckets),
        }
    except Exception as e:  # pragma: no cover - prometheus misconfigured
        log.warning("agentserve worker metrics disabled: %s", e)
        _m = {}
    return _m or None


def fallback(reason: str) -> None:
    m = _metrics()
    if m:
        m["fallback"].labels(reason=reason).inc()


_held_now: dict[str, int] = {}  # what the held-requests gauge shows, per tier


def prefill_held(tiers: list[str]) -> None:
    """A pacing round: the tier of each request it held back (none: every gauge to 0)."""
    m = _metrics()
    if m:
        try:
            now: dict[str, int] = {}
            for t in tiers:
                m["held"].labels(tier=t or "none").inc()
                now[t or "none"] = now.get(t or "none", 0) + 1
            for t in set(now) | {k for k, v in _held_now.items() if v}:
                if _held_now.get(t) != now.get(t, 0):
                    m["held_now"].labels(tier=t).set(now.get(t, 0))
                    _held_now[t] = now.get(t, 0)
        except Exception as e:  # pragma: no cover
            log.debug("metric update failed: %s", e)


INDEX_EVERY = 16  # steps between two updates of the index-memory gauges
_index_steps = 0


def index_memory(registry: Any) -> None:
    """Every INDEX_EVERY calls: the copy indexes' size (registry: copy.suffix_index.SessionIndexRegistry)."""
    global _index_steps
    _index_steps += 1
    m = _metrics()
    if not m or registry is None or _index_steps % INDEX_EVERY != 1:
        return
    try:
        session_tokens, shared_tokens, sessions = registry.memory()
        m["index_session"].set(session_tokens)
        m["index_shared"].set(shared_tokens)
        m["index_sessions"].set(sessions)
    except Exception as e:  # pragma: no cover
        log.debug("metric update failed: %s", e)


def context_seeded(positions: int) -> None:
    m = _metrics()
    if m and positions:
        try:
            m["seeded"].inc(positions)
        except Exception as e:  # pragma: no cover
            log.debug("metric update failed: %s", e)


def mixed_step() -> None:
    m = _metrics()
    if m:
        try:
            m["mixed"].inc()
        except Exception as e:  # pragma: no cover
            log.debug("metric update failed: %s", e)


def observe_step(stats: Any) -> None:
    m = _metrics()
    if not m:
        return
    try:
        m["width"].observe(stats.verify_width)
        m["batch"].observe(stats.batch_size)
        n_tok = getattr(stats, "verify_tokens", 0)
        if n_tok:
            m["tokens"].observe(n_tok)
            if n_tok != stats.verify_width * stats.batch_size:
                m["ragged"].inc()
        m["budget"].observe(sum(stats.verify_lens))
        sources = stats.sources or ["model"] * len(stats.verify_lens)
        for ell, acc, src in zip(stats.verify_lens, stats.accepted, sources):
            if ell:
                m["src_verified"].labels(source=src).inc(ell)
                m["src_accepted"].labels(source=src).inc(acc)
            m["req_len"].observe(ell)
            for pos in range(1, ell + 1):
                m["proposed"].labels(position=str(pos)).inc()
                if pos <= acc + 1:
                    m["reached"].labels(position=str(pos)).inc()
                if pos <= acc:
                    m["accepted"].labels(position=str(pos)).inc()
        agents = getattr(stats, "agents", None) or [""] * len(stats.verify_lens)
        tiers = getattr(stats, "tiers", None) or [""] * len(stats.verify_lens)
        emitted = getattr(stats, "emitted", None) or [a + 1 for a in stats.accepted]
        for agent, tier, ell, acc, src, n in zip(agents, tiers, stats.verify_lens, stats.accepted, sources, emitted):
            a = agent or "untagged"
            m["agent_steps"].labels(agent=a).inc()
            m["agent_tokens"].labels(agent=a).inc(n)
            if acc and src in COPY_SOURCES + ("model",):
                m["agent_accepted"].labels(agent=a, source=src).inc(acc)
            m["tier_len"].labels(tier=tier or "none").observe(ell)
        prefill_s = getattr(stats, "prefill_s", 0.0)
        if prefill_s > 0:
            for tier, waited in zip(tiers, getattr(stats, "waited", None) or []):
                if waited:
                    m["stall"].labels(tier=tier or "none").inc(prefill_s)
        m["phase"].labels(phase="draft").observe(stats.draft_s)
        m["phase"].labels(phase="schedule").observe(stats.schedule_s)
        m["phase"].labels(phase="verify").observe(stats.verify_s)
    except Exception as e:  # pragma: no cover
        log.debug("metric update failed: %s", e)


def _trace_write(obj: dict) -> None:
    global _trace_path
    if not _trace_path:
        return
    try:
        with open(_trace_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj, default=float) + "\n")
    except OSError as e:
        log.warning("step trace to %s disabled: %s", _trace_path, e)
        _trace_path = None


def trace_event(kind: str, fields: dict) -> None:
    """A non-step line in the step trace (e.g. a prefill pacing decision), marked by `kind`."""
    if _trace_path:
        _trace_write({"kind": kind, "t": time.time(), **fields})


def tracing() -> bool:
    """Whether AGENTSERVE_STEP_TRACE is on (the worker fills trace-only fields then)."""
    return _trace_path is not None


def trace_step(stats: Any) -> None:
    """AGENTSERVE_STEP_TRACE=FILE: one JSON line per speculative step (batch, width, verify
    lengths, sources, expected and accepted drafts, phase times), for reading why the worker
    chose what it chose. Off unless set; a write failure turns it off."""
    if _trace_path and is_dataclass(stats):
        _trace_write(asdict(stats))
