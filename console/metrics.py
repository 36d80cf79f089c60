"""Fetch and parse what the console shows: SGLang's /metrics (Prometheus text) and the per-agent
JSON endpoint, into typed snapshots; windowed rates and means between two snapshots.

Nothing here raises on bad input: a missing metric is None, a malformed line is skipped and
counted, an unreachable server gives a snapshot with ``connected=False`` and the reason.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

AGENTS_PATH = "/agentserve/v1/agents"

# (labels as a sorted tuple of (key, value), value)
Samples = dict[str, list[tuple[tuple[tuple[str, str], ...], float]]]


# ---------------------------------------------------------------------------------------------
# Prometheus text -> flat samples


def _add_families(families: Any, out: Samples) -> None:
    for fam in families:
        for s in fam.samples:
            v = float(s.value)
            if math.isnan(v):
                continue
            out.setdefault(s.name, []).append((tuple(sorted(s.labels.items())), v))


def parse_samples(text: str) -> tuple[Samples, int]:
    """Samples by name, and how many lines were skipped as malformed.

    The whole text is parsed first; if the parser rejects it, each line is parsed on its own
    (without its TYPE context, which we do not need: everything is looked up by sample name)."""
    out: Samples = {}
    try:
        _add_families(text_string_to_metric_families(text), out)
        return out, 0
    except Exception:
        out = {}
    bad = 0
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            _add_families(text_string_to_metric_families(line + "\n"), out)
        except Exception:
            bad += 1
    return out, bad


# ---------------------------------------------------------------------------------------------
# Typed views


@dataclass
class Histogram:
    """One (label-merged) Prometheus histogram: cumulative bucket counts by upper bound."""

    buckets: list[tuple[float, float]] = field(default_factory=list)  # (le, cumulative count), sorted
    sum: float = 0.0
    count: float = 0.0

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def minus(self, prev: Histogram | None) -> Histogram:
        """The observations made since ``prev`` (itself if prev is missing or counters reset)."""
        if prev is None or self.count < prev.count or self.sum < prev.sum:
            return self  # no baseline, or the server restarted (our observations are >= 0)
        pb = dict(prev.buckets)
        return Histogram([(le, max(0.0, c - pb.get(le, 0.0))) for le, c in self.buckets],
                         self.sum - prev.sum, self.count - prev.count)

    def quantile(self, q: float) -> float | None:
        """Prometheus-style estimate (linear within the bucket); None without observations."""
        if self.count <= 0 or not self.buckets:
            return None
        rank = q * self.count
        prev_le, prev_c = 0.0, 0.0
        for le, c in self.buckets:
            if c >= rank:
                if math.isinf(le):
                    return prev_le
                if c == prev_c:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
            prev_le, prev_c = le, c
        return prev_le


def _histogram(samples: Samples, name: str, where: dict[str, str] | None = None) -> Histogram | None:
    """Merge every label set (optionally filtered by ``where``) of histogram ``name``."""
    def keep(labels: tuple[tuple[str, str], ...]) -> bool:
        d = dict(labels)
        return all(d.get(k) == v for k, v in (where or {}).items())

    counts = [v for lab, v in samples.get(name + "_count", []) if keep(lab)]
    if not counts:
        return None
    by_le: dict[float, float] = {}
    for lab, v in samples.get(name + "_bucket", []):
        if not keep(lab):
            continue
        try:
            le = float(dict(lab)["le"])
        except (KeyError, ValueError):
            continue
        by_le[le] = by_le.get(le, 0.0) + v
    sums = [v for lab, v in samples.get(name + "_sum", []) if keep(lab)]
    return Histogram(sorted(by_le.items()), sum(sums), sum(counts))


def _total(samples: Samples, name: str) -> float | None:
    vals = [v for _, v in samples.get(name, [])]
    return sum(vals) if vals else None


def _mean(samples: Samples, name: str) -> float | None:
    vals = [v for _, v in samples.get(name, [])]
    return sum(vals) / len(vals) if vals else None


def _by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for lab, v in samples.get(name, []):
        key = dict(lab).get(label)
        if key is not None:
            out[key] = out.get(key, 0.0) + v
    return out


def _counter(samples: Samples, base: str) -> float | None:
    """A counter by its family name: the ``_total`` sample, or the bare one (untyped text)."""
    v = _total(samples, base + "_total")
    return v if v is not None else _total(samples, base)


def _counter_by_label(samples: Samples, base: str, label: str) -> dict[str, float]:
    return _by_label(samples, base + "_total", label) or _by_label(samples, base, label)


@dataclass
class MetricsSnapshot:
    """What one poll of /metrics saw. Every metric is None when the server did not export it."""

    t: float
    connected: bool
    error: str | None = None
    malformed_lines: int = 0
    running: float | None = None
    queued: float | None = None
    token_usage: float | None = None          # KV cache usage, 0..1
    accept_length: float | None = None        # tau: tokens per verify step (SGLang gauge)
    accept_rate: float | None = None
    gen_throughput: float | None = None       # SGLang's own gauge, tok/s
    generation_tokens: float | None = None    # counter
    prompt_tokens: float | None = None        # counter
    requests_total: float | None = None       # counter
    ttft: Histogram | None = None
    itl: Histogram | None = None
    e2e: Histogram | None = None
    verify_width: Histogram | None = None
    verify_budget: Histogram | None = None
    verify_len_per_request: Histogram | None = None
    spec_batch_size: Histogram | None = None
    step_seconds: dict[str, Histogram] = field(default_factory=dict)   # by phase
    verified_by_pos: dict[int, float] = field(default_factory=dict)
    accepted_by_pos: dict[int, float] = field(default_factory=dict)
    fallbacks: dict[str, float] = field(default_factory=dict)          # by reason
    prefill_stall_s: dict[str, float] = field(default_factory=dict)    # by tier: request-seconds stalled
    prefill_held: dict[str, float] = field(default_factory=dict)       # by tier: requests held back by pacing now

    @property
    def has_metrics(self) -> bool:
        return self.connected and any(
            v is not None for v in (self.running, self.queued, self.token_usage, self.generation_tokens))


def _positions(d: dict[str, float]) -> dict[int, float]:
    out: dict[int, float] = {}
    for k, v in d.items():
        try:
            out[int(k)] = v
        except ValueError:
            continue
    return dict(sorted(out.items()))


def snapshot_from_text(text: str, t: float | None = None) -> MetricsSnapshot:
    s, bad = parse_samples(text)
    phases = {lab_v for lab, _ in s.get("agentserve:spec_step_seconds_count", [])
              for k, lab_v in lab if k == "phase"}
    # SGLang exports tau = 0 when it does not speculate; tau >= 1 whenever it does.
    tau = _mean(s, "sglang:spec_accept_length")
    tau = tau if tau is not None and tau > 0 else None
    return MetricsSnapshot(
        t=time.monotonic() if t is None else t,
        connected=True,
        malformed_lines=bad,
        running=_total(s, "sglang:num_running_reqs"),
        queued=_total(s, "sglang:num_queue_reqs"),
        token_usage=_mean(s, "sglang:token_usage"),
        accept_length=tau,
        accept_rate=_mean(s, "sglang:spec_accept_rate") if tau is not None else None,
        gen_throughput=_total(s, "sglang:gen_throughput"),
        generation_tokens=_counter(s, "sglang:generation_tokens"),
        prompt_tokens=_counter(s, "sglang:prompt_tokens"),
        requests_total=_counter(s, "sglang:num_requests"),
        ttft=_histogram(s, "sglang:time_to_first_token_seconds"),
        # Streaming requests feed inter_token_latency; non-streaming ones only the per-request TPOT.
        itl=(_histogram(s, "sglang:inter_token_latency_seconds")
             or _histogram(s, "sglang:request_time_per_output_token_seconds")),
        e2e=_histogram(s, "sglang:e2e_request_latency_seconds"),
        verify_width=_histogram(s, "agentserve:verify_width"),
        verify_budget=_histogram(s, "agentserve:verify_budget_tokens"),
        verify_len_per_request=_histogram(s, "agentserve:verify_len_per_request"),
        spec_batch_size=_histogram(s, "agentserve:spec_batch_size"),
        step_seconds={p: h for p in sorted(phases)
                      if (h := _histogram(s, "agentserve:spec_step_seconds", {"phase": p})) is not None},
        verified_by_pos=_positions(_counter_by_label(s, "agentserve:spec_verified_drafts", "position")),
        accepted_by_pos=_positions(_counter_by_label(s, "agentserve:spec_accepted_drafts", "position")),
        fallbacks=_counter_by_label(s, "agentserve:drafter_fallback", "reason"),
        prefill_stall_s=_counter_by_label(s, "agentserve:tier_prefill_stall_seconds", "tier"),
        prefill_held=_by_label(s, "agentserve:tier_prefill_held_requests", "tier"),
    )


def fetch_snapshot(url: str, timeout: float = 2.0, session: requests.Session | None = None) -> MetricsSnapshot:
    get = (session or requests).get
    try:
        r = get(url.rstrip("/") + "/metrics", timeout=timeout)
    except requests.RequestException as e:
        return MetricsSnapshot(t=time.monotonic(), connected=False, error=_short_error(e))
    if r.status_code != 200:
        return MetricsSnapshot(t=time.monotonic(), connected=False, error=f"/metrics: HTTP {r.status_code}")
    return snapshot_from_text(r.text)


def _short_error(e: Exception) -> str:
    if isinstance(e, requests.ConnectionError):
        return "connection refused or reset"
    if isinstance(e, requests.Timeout):
        return "timed out"
    return type(e).__name__


# ---------------------------------------------------------------------------------------------
# Per-agent JSON


@dataclass
class AgentRow:
    agent_id: str
    tier: str | None = None
    requests: int | None = None
    running: int | None = None
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    itl_p50_s: float | None = None
    itl_p95_s: float | None = None
    tokens_per_s: float | None = None
    accept_length: float | None = None
    copy_share: float | None = None
    # accepted drafts by where they came from: session / shared / radix (copies) and model
    source_share: dict[str, float] = field(default_factory=dict)


@dataclass
class TierRow:
    name: str
    target_tokens_per_s: float | None = None
    attainment: float | None = None
    admitted: int | None = None
    queued: int | None = None
    refused: int | None = None


@dataclass
class AgentsSnapshot:
    """The per-agent endpoint's answer; ``available`` is False when it is absent (404),
    unreachable or malformed, with the reason in ``note``."""

    available: bool
    agents: list[AgentRow] = field(default_factory=list)
    tiers: list[TierRow] = field(default_factory=list)
    note: str | None = None


def _num(v: Any, kind: type = float) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return kind(v)


def _shares(v: Any) -> dict[str, float]:
    if not isinstance(v, dict):
        return {}
    return {str(k): x for k, x in ((k, _num(x)) for k, x in v.items()) if x is not None}


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def agents_from_json(doc: Any) -> AgentsSnapshot:
    if not isinstance(doc, dict):
        return AgentsSnapshot(False, note="malformed agents JSON")
    agents: list[AgentRow] = []
    for a in doc.get("agents") or []:
        if not isinstance(a, dict) or not isinstance(a.get("agent_id"), (str, int)):
            continue
        agents.append(AgentRow(
            agent_id=str(a["agent_id"]), tier=_str(a.get("tier")),
            requests=_num(a.get("requests"), int), running=_num(a.get("running"), int),
            ttft_p50_s=_num(a.get("ttft_p50_s")), ttft_p95_s=_num(a.get("ttft_p95_s")),
            itl_p50_s=_num(a.get("itl_p50_s")), itl_p95_s=_num(a.get("itl_p95_s")),
            tokens_per_s=_num(a.get("tokens_per_s")), accept_length=_num(a.get("accept_length")),
            copy_share=_num(a.get("copy_share")), source_share=_shares(a.get("source_share"))))
    tiers: list[TierRow] = []
    for t in doc.get("tiers") or []:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            continue
        tiers.append(TierRow(
            name=t["name"], target_tokens_per_s=_num(t.get("target_tokens_per_s")),
            attainment=_num(t.get("attainment")), admitted=_num(t.get("admitted"), int),
            queued=_num(t.get("queued"), int), refused=_num(t.get("refused"), int)))
    return AgentsSnapshot(True, agents, tiers)


def fetch_agents(url: str, timeout: float = 2.0, session: requests.Session | None = None) -> AgentsSnapshot:
    get = (session or requests).get
    try:
        r = get(url.rstrip("/") + AGENTS_PATH, timeout=timeout)
    except requests.RequestException as e:
        return AgentsSnapshot(False, note=_short_error(e))
    if r.status_code == 404:
        return AgentsSnapshot(False, note="not served by this server (404)")
    if r.status_code != 200:
        return AgentsSnapshot(False, note=f"HTTP {r.status_code}")
    try:
        return agents_from_json(r.json())
    except ValueError:
        return AgentsSnapshot(False, note="malformed agents JSON")


# ---------------------------------------------------------------------------------------------
# Between two snapshots


@dataclass
class Window:
    """Rates and windowed means between the previous and the current snapshot. Windowed values
    fall back to the lifetime ones (``cur`` alone) when nothing happened in the window."""

    seconds: float | None = None
    gen_tokens_per_s: float | None = None
    requests_per_s: float | None = None
    verify_width_mean: float | None = None
    verify_budget_mean: float | None = None
    batch_size_mean: float | None = None
    steps: float | None = None                  # speculative steps in the window
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    itl_p50: float | None = None
    itl_p95: float | None = None
    acceptance_by_pos: dict[int, float] = field(default_factory=dict)   # accepted / verified
    # per tier: running streams standing still for other requests' prefills, on average over
    # the window (request-seconds stalled per second)
    stalled_streams: dict[str, float] = field(default_factory=dict)
    # per tier: waiting requests prefill pacing holds back at the last poll (a gauge)
    held: dict[str, float] = field(default_factory=dict)


def _rate(cur: float | None, prev: float | None, dt: float | None) -> float | None:
    if cur is None or prev is None or not dt or dt <= 0 or cur < prev:
        return None
    return (cur - prev) / dt


def _windowed(cur: Histogram | None, prev: Histogram | None) -> Histogram | None:
    if cur is None:
        return None
    d = cur.minus(prev)
    return d if d.count > 0 else cur


def window(prev: MetricsSnapshot | None, cur: MetricsSnapshot) -> Window:
    if prev is not None and not prev.connected:
        prev = None
    dt = (cur.t - prev.t) if prev is not None else None
    p = prev or MetricsSnapshot(t=cur.t, connected=False)
    w = Window(seconds=dt)
    w.gen_tokens_per_s = _rate(cur.generation_tokens, p.generation_tokens, dt)
    w.requests_per_s = _rate(cur.requests_total, p.requests_total, dt)
    vw = _windowed(cur.verify_width, p.verify_width)
    vb = _windowed(cur.verify_budget, p.verify_budget)
    bs = _windowed(cur.spec_batch_size, p.spec_batch_size)
    w.verify_width_mean = vw.mean if vw else None
    w.verify_budget_mean = vb.mean if vb else None
    w.batch_size_mean = bs.mean if bs else None
    if cur.verify_budget is not None:
        w.steps = cur.verify_budget.minus(p.verify_budget).count
    ttft = _windowed(cur.ttft, p.ttft)
    itl = _windowed(cur.itl, p.itl)
    if ttft:
        w.ttft_p50, w.ttft_p95 = ttft.quantile(0.5), ttft.quantile(0.95)
    if itl:
        w.itl_p50, w.itl_p95 = itl.quantile(0.5), itl.quantile(0.95)
    w.held = {tier: n for tier, n in cur.prefill_held.items() if n > 0}
    for tier, cur_s in cur.prefill_stall_s.items():
        r = _rate(cur_s, p.prefill_stall_s.get(tier, 0.0 if prev is not None else None), dt)
        if r is not None:
            w.stalled_streams[tier] = r
    # Per-position acceptance over the window, or lifetime where the window verified nothing.
    for pos, ver in cur.verified_by_pos.items():
        acc = cur.accepted_by_pos.get(pos, 0.0)
        dver = ver - p.verified_by_pos.get(pos, 0.0)
        dacc = acc - p.accepted_by_pos.get(pos, 0.0)
        if dver > 0 and dacc >= 0:
            w.acceptance_by_pos[pos] = min(1.0, dacc / dver)
        elif ver > 0:
            w.acceptance_by_pos[pos] = min(1.0, acc / ver)
    return w
