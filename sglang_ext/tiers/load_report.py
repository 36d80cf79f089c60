"""What the scheduler measures about load, for predictive admission in the HTTP process.

SGLang runs the scheduler (our worker) and the HTTP server in different processes. The
worker knows what admission needs to predict a tier's speed before admitting one more request:
- the decode step period at each batch size B (wall time from one decode step to the next
  while the same requests continue: forward, our drafting, SGLang's result processing and any
  prefill of newly arrived requests in between — what a user's stream actually waits for);
- tokens emitted per step per request (τ), per tier, under the current drafting, and the τ of
  the slowest running request of each tier (a tier's mean hides the request whose drafts do
  not pay, and that request is the one that misses the promise);
- the forward cost per batch-token count (the one step-cost model, spec/step_cost.py:
  measured where seen, its prior elsewhere), to extrapolate to an unseen B;
- per tier, how many running requests are below their target right now (tier-aware
  scheduling measures each request's decode speed so far), which admission's rule (b) uses;
- per agent label: decode steps, tokens and accepted drafts by source (session, shared,
  radix, model), for the per-agent table (τ and copy share) of /agentserve/v1/agents.
`LoadPublisher` (scheduler) writes them a few times a second as one small JSON file beside
SGLang's Prometheus multiprocess files, and once more shortly after the last step, so an idle
server's report holds its last request. This file is the one channel from the scheduler to the
HTTP process; the Prometheus series are for outside scrapers. `CapacityModel` (HTTP) reads it
and predicts

    speed_U(B) = τ_U / period(B)

for tier U at B running requests (τ_U: the slowest running request's τ while U has running
requests, else U's mean): the measured period where B has been seen, else the nearest
measured period scaled by the forward-cost ratio f(B)/f(b) of the SPS table.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

MIN_PERIODS = 3  # samples before a batch size's measured period is used as is
RECENT = 16  # finished requests per tier whose τ predicts attainment
MIN_SAMPLES = 4  # requests (running or finished) before a tier's attainment is predicted
# f(B) = 1 + slope (B - 1) when no forward cost is known: the step-cost model's one prior
# (the report's "forward" curve already carries that model's costs, so this is rarely used)
from sglang_ext.spec.step_cost import PRIOR_SLOPE  # noqa: E402

from sglang_ext.spec.stats import COPY_SOURCES  # noqa: E402

SOURCES = COPY_SOURCES + ("model",)  # where accepted drafts came from


def report_path(port: int) -> Optional[Path]:
    """Where this server's load report lives (None: nowhere to put it, prediction off). One
    file per port, in SGLang's per-run Prometheus directory or AGENTSERVE_LOAD_DIR."""
    base = os.environ.get("AGENTSERVE_LOAD_DIR") or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not base:
        return None
    return Path(base) / f"agentserve-load-{port}.json"


class LoadPublisher:
    def __init__(self, path: Optional[Path], every_s: float = 0.25, ema: float = 0.2,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.path, self.every_s, self.ema, self.clock = path, every_s, ema, clock
        self.period: dict[int, float] = {}
        self.count: dict[int, int] = {}
        # the same without the prefills in between: what a step itself costs at B (prefill
        # pacing adds the stalls it is about to cause on its own)
        self.step_period: dict[int, float] = {}
        self.plain_period: dict[int, float] = {}  # the same for steps verifying no drafts
        self.plain_count: dict[int, int] = {}
        self.tau: dict[str, float] = {}
        self.tau_all: Optional[float] = None
        self.req_tau: dict[str, float] = {}  # running request -> its τ (EMA from its tier's mean)
        self.tau_min: dict[str, float] = {}  # tier -> τ of its slowest running request
        self.tau_running: dict[str, list[float]] = {}  # tier -> τ of each running request
        self.behind: Optional[dict[str, int]] = None  # tier -> running requests below target (None: not measured)
        self._life: dict[str, list] = {}  # running request -> [tier, decode steps, tokens]
        self.recent: dict[str, collections.deque] = {}  # tier -> τ of its last RECENT finished requests
        self._prev: Optional[tuple[float, int, frozenset[str]]] = None
        self._written = 0.0
        # per agent label: steps, tokens, accepted drafts by source (cumulative)
        self.agents: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()  # the trailing write runs on a timer thread
        self._timer: Optional[threading.Timer] = None

    def _mix(self, old: Optional[float], new: float) -> float:
        return new if old is None else (1 - self.ema) * old + self.ema * new

    def observe(self, rids: list[str], tiers: list[str], emitted: list[int],
                forward: Callable[[], dict[int, float]], behind: Optional[dict[str, int]] = None,
                stall_s: float = 0.0, plain: bool = False) -> None:
        """After a decode step: its requests, their tiers and tokens emitted; `forward()` gives
        the measured forward seconds per batch-token count (called only when writing);
        `behind`: running requests per tier below target (tier-aware scheduling only);
        `stall_s`: prefill seconds run since the previous decode step; `plain`: the step
        verified no drafts (one position per request)."""
        with self._lock:
            self._observe(rids, tiers, emitted, behind, stall_s, plain)
        self._publish(forward)

    def observe_agents(self, agents: list[str], emitted: list[int], accepted: list[int], sources: list[str]) -> None:
        """A step's requests by agent label: tokens emitted, drafts accepted and their source."""
        with self._lock:
            for agent, n, acc, src in zip(agents, emitted, accepted, sources):
                row = self.agents.setdefault(agent or "untagged", {"steps": 0.0, "tokens": 0.0})
                row["steps"] += 1
                row["tokens"] += n
                if acc and src != "none":
                    row[src] = row.get(src, 0.0) + acc

    def _observe(self, rids: list[str], tiers: list[str], emitted: list[int], behind: Optional[dict[str, int]],
                 stall_s: float, plain: bool) -> None:
        self.behind = None if behind is None else dict(behind)
        now = self.clock()
        cur = frozenset(rids)
        if self._prev is not None:
            t, b, prev = self._prev
            if prev & cur:  # the same streams went on: the gap is what they waited
                self.period[b] = self._mix(self.period.get(b), now - t)
                self.step_period[b] = self._mix(self.step_period.get(b), max(0.0, now - t - stall_s))
                if plain:
                    self.plain_period[b] = self._mix(self.plain_period.get(b), max(0.0, now - t - stall_s))
                    self.plain_count[b] = self.plain_count.get(b, 0) + 1
                self.count[b] = self.count.get(b, 0) + 1
        if self._prev is not None:
            for rid in self._prev[2] - cur:  # gone from the decode batch: finished
                life = self._life.pop(rid, None)
                if life is not None and life[1] >= 2:
                    self.recent.setdefault(life[0], collections.deque(maxlen=RECENT)).append(life[2] / life[1])
        for rid, tier, n in zip(rids, tiers, emitted):
            life = self._life.setdefault(rid, [tier, 0, 0])
            life[1] += 1
            life[2] += int(n)
        self._prev = (now, len(rids), cur)
        req_tau: dict[str, float] = {}  # requests not in this step have finished
        tau_min: dict[str, float] = {}
        for rid, tier, n in zip(rids, tiers, emitted):
            req_tau[rid] = self._mix(self.req_tau.get(rid, self.tau.get(tier)), float(n))
            tau_min[tier] = min(tau_min.get(tier, req_tau[rid]), req_tau[rid])
        for tier, n in zip(tiers, emitted):
            self.tau[tier] = self._mix(self.tau.get(tier), float(n))
            self.tau_all = self._mix(self.tau_all, float(n))
        self.req_tau, self.tau_min = req_tau, tau_min
        self.tau_running = {}
        for rid, tier in zip(rids, tiers):
            self.tau_running.setdefault(tier, []).append(req_tau[rid])

    def _publish(self, forward: Callable[[], dict[int, float]]) -> None:
        if self.path is None:
            return
        now = self.clock()
        if now - self._written >= self.every_s:
            self._written = now
            self.write(forward())
        elif self._timer is None:  # not due: write once more when it is, whatever comes after
            self._timer = threading.Timer(self.every_s, self._trailing, args=(forward,))
            self._timer.daemon = True
            self._timer.start()

    def _trailing(self, forward: Callable[[], dict[int, float]]) -> None:
        self._timer = None
        if self.path is not None:
            self._written = self.clock()
            self.write(forward())

    def measured_periods(self) -> dict[int, float]:
        """Decode step period per batch size, where seen MIN_PERIODS times."""
        return {b: p for b, p in self.period.items() if self.count.get(b, 0) >= MIN_PERIODS}

    def step_periods(self) -> dict[int, float]:
        """The same without the prefills run between steps."""
        return {b: p for b, p in self.step_period.items() if self.count.get(b, 0) >= MIN_PERIODS}

    def plain_periods(self) -> dict[int, float]:
        """Step period per batch size of steps that verified no drafts (plain decoding): what a
        request whose drafts do not pay gets, whatever the mean step at that size costs."""
        return {b: p for b, p in self.plain_period.items() if self.plain_count.get(b, 0) >= MIN_PERIODS}

    def request_tau(self, rid: str) -> Optional[float]:
        """Tokens per decode step of a running request over its answer so far (None before two
        steps): unlike its tokens per second, the same at any batch size and with any stall."""
        life = self._life.get(rid)
        return life[2] / life[1] if life is not None and life[1] >= 2 else None

    def snapshot(self, forward: dict[int, float]) -> dict[str, Any]:
        return {"period": self.period, "count": self.count, "tau": self.tau, "tau_all": self.tau_all,
                "tau_min": self.tau_min, "tau_running": self.tau_running,
                "tau_recent": {t: list(d) for t, d in self.recent.items()}, "forward": forward, "time": time.time(),
                "behind": self.behind, "agents": self.agents}

    def write(self, forward: dict[int, float]) -> None:
        assert self.path is not None
        with self._lock:
            text = json.dumps(self.snapshot(forward))
        try:
            tmp = self.path.with_suffix(f".{threading.get_ident()}.tmp")  # the timer thread may write too
            tmp.write_text(text)
            tmp.replace(self.path)
        except OSError as e:  # prediction is an aid: never let it break a step
            log.warning("could not write load report %s: %s", self.path, e)
            self.path = None


def _interp(points: dict[int, float], x: float) -> Optional[float]:
    """Piecewise-linear through measured points, linear extrapolation past the ends."""
    xs = sorted(points)
    if not xs:
        return None
    if len(xs) == 1:
        return points[xs[0]] * (1 + PRIOR_SLOPE * (x - 1)) / (1 + PRIOR_SLOPE * (xs[0] - 1))
    lo, hi = (xs[0], xs[1]) if x <= xs[0] else (xs[-2], xs[-1])
    for a, b in zip(xs, xs[1:]):
        if a <= x <= b:
            lo, hi = a, b
            break
    slope = max(0.0, (points[hi] - points[lo]) / (hi - lo))
    return max(1e-6, points[lo] + slope * (x - lo))


class CapacityModel:
    """Reads the scheduler's load report (re-read at most every `refresh_s`)."""

    def __init__(self, path: Optional[Path], refresh_s: float = 0.2,
                 locate: Optional[Callable[[], Optional[Path]]] = None) -> None:
        self.path, self.refresh_s, self.locate = path, refresh_s, locate
        self._data: Optional[dict[str, Any]] = None
        self._read_at = -1e9

    @classmethod
    def for_port(cls, port: int) -> CapacityModel:
        # SGLang sets PROMETHEUS_MULTIPROC_DIR after our plugin loads: find the file when asked
        return cls(None, locate=lambda: report_path(port))

    @classmethod
    def from_report(cls, data: dict[str, Any]) -> CapacityModel:
        m = cls(None)
        m._data = m._parse(data)
        return m

    @staticmethod
    def _parse(d: dict[str, Any]) -> dict[str, Any]:
        return {"period": {int(k): float(v) for k, v in d.get("period", {}).items()},
                "count": {int(k): int(v) for k, v in d.get("count", {}).items()},
                "tau": {str(k): float(v) for k, v in d.get("tau", {}).items()},
                "tau_all": None if d.get("tau_all") is None else float(d["tau_all"]),
                "tau_min": {str(k): float(v) for k, v in d.get("tau_min", {}).items()},
                "tau_running": {str(k): [float(x) for x in v] for k, v in d.get("tau_running", {}).items()},
                "tau_recent": {str(k): [float(x) for x in v] for k, v in d.get("tau_recent", {}).items()},
                "forward": {int(k): float(v) for k, v in d.get("forward", {}).items()},
                "behind": None if d.get("behind") is None else {str(k): int(v) for k, v in d["behind"].items()},
                "agents": {str(a): {str(k): float(v) for k, v in row.items()} for a, row in d.get("agents", {}).items()},
                "time": float(d.get("time") or 0.0)}

    def data(self) -> Optional[dict[str, Any]]:
        if self.path is None and self.locate is not None:
            self.path = self.locate()
        if self.path is None:
            return self._data
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s:
            self._read_at = now
            try:
                self._data = self._parse(json.loads(self.path.read_text()))
            except (OSError, ValueError, TypeError, AttributeError):
                pass  # not written yet (or mid-replace): keep what we had
        return self._data

    def period(self, b: int) -> Optional[float]:
        d = self.data()
        if not d:
            return None
        seen = {k: v for k, v in d["period"].items() if d["count"].get(k, 0) >= MIN_PERIODS}
        if b in seen:
            return seen[b]
        if not seen:
            return None
        near = min(seen, key=lambda k: (abs(k - b), -k))
        f_b, f_near = _interp(d["forward"], b), _interp(d["forward"], near)
        if f_b is None or f_near is None:
            f_b, f_near = 1 + PRIOR_SLOPE * (b - 1), 1 + PRIOR_SLOPE * (near - 1)
        return seen[near] * f_b / f_near

    def tau(self, tier: str) -> float:
        """Tokens per step to plan `tier` with: its slowest running request's, else its mean."""
        d = self.data() or {}
        return ((d.get("tau_min") or {}).get(tier) or (d.get("tau") or {}).get(tier) or d.get("tau_all")
                or 1.0)

    def behind(self, tier: str, max_age_s: float = 2.0) -> Optional[int]:
        """Running requests of `tier` below their target at the scheduler's last decode step;
        None when unknown (no report, not tier-aware, or no step in the last `max_age_s`: a long
        prefill or an idle server says nothing about the streams now)."""
        d = self.data()
        if not d or d.get("behind") is None or time.time() - d.get("time", 0.0) > max_age_s:
            return None
        return int(d["behind"].get(tier, 0))

    def attainment(self, tier: str, b: int, speed: float) -> Optional[float]:
        """Predicted share of `tier`'s requests decoding at >= `speed` tok/s with `b` running:
        each of its running requests (its τ so far) and of its last finished ones (their τ over
        the whole request) at τ / period(b). None while fewer than MIN_SAMPLES are known or
        period(b) is unknown. The finished ones stand for the requests still to come: a tier whose
        running requests happen to copy 8 tokens a step still gets answers the drafter cannot
        predict, and those are the ones a larger batch makes miss."""
        d = self.data()
        if not d:
            return None
        taus = (d.get("tau_running") or {}).get(tier, []) + (d.get("tau_recent") or {}).get(tier, [])
        p = self.period(b)
        if len(taus) < MIN_SAMPLES or p is None:
            return None
        return sum(1 for t in taus if t / p >= speed) / len(taus)

    def agent_spec(self) -> dict[str, dict[str, Any]]:
        """Per agent label: τ (tokens per decode step), the copy share of accepted drafts and
        each source's share (session, shared, radix, model); {} before any step."""
        out: dict[str, dict[str, Any]] = {}
        for agent, row in ((self.data() or {}).get("agents") or {}).items():
            by = {src: row.get(src, 0.0) for src in SOURCES}
            total = sum(by.values())
            out[agent] = {"accept_length": row["tokens"] / row["steps"] if row.get("steps") else None,
                          "copy_share": (total - by["model"]) / total if total else None,
                          "source_share": {k: v / total for k, v in by.items()} if total else {}}
        return out

    def predict(self, tier: str, b: int) -> Optional[float]:
        """Predicted decode tok/s per user of `tier` with `b` requests running (None: unknown)."""
        p = self.period(b)
        return None if p is None else self.tau(tier) / p
