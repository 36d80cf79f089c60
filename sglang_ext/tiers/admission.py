"""Admission control per interactivity tier (HTTP process, in front of SGLang).

A tier's promise (profile `Tier`): decode at `target_tokens_per_s` and/or a first token within
`target_ttft_s` of arrival, the wait in this gate's queue included. A finished request counts
as met only if every promise its tier makes held (`Tier.met`); a tier's attainment is the share
of its requests finished in the last `window_s` seconds (at most the last 16) that met it.

A request of tier T starts when
  (a) T has no `max_concurrency`, or fewer than that many of its requests are running;
  (a') T's own load keeps its promise: a promised tier learns how many of its requests can run
      at once and still meet it (additive increase while they meet, a quarter less when one
      misses what the server controls: its decode speed or its time to first token after
      admission). A miss with one request of T running is not T's own load, and forgets the
      limit. So 32 agents in one tier queue (or are refused, per `on_overload`) instead of
      all slowing below the target together;
  (b) no more important tier with a promise has running requests while its attainment is
      below `min_attainment` (0.95): lower tiers stop adding load instead of everyone slowing
      down (on a compute-bound server every extra request slows every running one);
  (c) predictive (when the scheduler publishes its load report, load_report.py): admitting
      one more request, B+1 running, keeps every more important promised tier U: the share of
      U's requests predicted at (1 + margin) x its speed target (its running requests and its
      last 16 finished ones, each at its own τ / period(B)) must not fall below both 95 % and
      the share at B (U's queued requests count as running). Until U has 4 known requests its
      mean τ must keep (1 + margin) x target at B+1. T itself, when its promise holds at the
      current load, must keep it at B+1 (a promise already broken at this load is not served
      by holding T's own requests back); a request of T is also admitted while less important
      requests run: those stop being admitted and drain. A tier with `admit_at: plain_speed`
      prices its new request at plain decoding's speed at B+1 (one token per step): how fast
      it will copy is unknown until it runs, and an answer the drafter cannot predict makes
      only that, so every admitted answer keeps the promise whatever it drafts.
Starve no one: while T's share of the admissions of the last `window_s` seconds is below its
`Tier.share_floor` (profile `min_share`; 5 % for a best-effort tier by default, 0 for a
promised one), rules (b) and (c) do not hold T back, so every tier finishes requests in every
window however loaded the promised tiers are.

Otherwise T's `on_overload` decides: "reject" answers 429 at once (Retry-After set); "queue"
waits until the rules hold, at most `queue_timeout_s`, then answers 429. Both refusals are 429
(too many requests for this tier now, come back after Retry-After): a 5xx means the server
failed or is going away (503 only while it drains, server/drain.py). The queue is served
most important tier first and, within a tier, most urgent first (earliest arrival +
target_ttft_s, else arrival + queue_timeout_s). A request that waited past its tier's
target_ttft_s still runs, and counts as missed. Both errors name the tier and the reason.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from agentserve.profile import Tier

from sglang_ext.tiers.load_report import CapacityModel

RECENT = 16
DECREASE = 0.75  # a miss under own load: the learned concurrency limit shrinks by a quarter


@dataclass
class TierState:
    """Runtime state of one profile Tier (its settings are read from `tier`, never copied)."""

    tier: Tier
    running: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"admitted": 0, "queued": 0, "rejected": 0, "timed_out": 0,
                                                            "held_by_own_load": 0, "late": 0})
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT))  # (t_end, met)
    starts: collections.deque = field(default_factory=collections.deque)  # admission times in the window
    limit: Optional[float] = None  # learned concurrency that keeps the promise (None: not limited)

    @property
    def name(self) -> str:
        return self.tier.name

    @property
    def priority(self) -> int:
        return self.tier.priority

    def attainment(self, now: float, window_s: float) -> Optional[float]:
        xs = [met for t, met in self.recent if now - t <= window_s]
        if not self.tier.promised or not xs:
            return None
        return sum(xs) / len(xs)

    def learn(self, met_service: Optional[bool], running: int) -> None:
        """AIMD on the tier's own concurrency, from a finished request's service (wait excluded)."""
        if met_service is None:
            return
        if met_service:
            if self.limit is not None:
                self.limit += 1.0 / max(1.0, self.limit)
        elif running <= 1:
            self.limit = None  # alone and still missing: holding its own requests back gives nothing
        else:
            self.limit = max(1.0, math.floor(min(self.limit or running, running) * DECREASE))


class Overloaded(Exception):
    def __init__(self, status: int, tier: str, message: str, retry_after: int = 1, timed_out: bool = False):
        super().__init__(message)
        self.status, self.tier, self.message, self.retry_after = status, tier, message, retry_after
        self.timed_out = timed_out  # queued past queue_timeout_s (else refused at once)


@dataclass(order=True)
class _Waiter:
    priority: int
    deadline: float
    seq: int
    tier: str = field(compare=False)


class TierGate:
    def __init__(self, tiers: Sequence[Tier], window_s: float = 60.0, min_attainment: float = 0.95,
                 clock: Callable[[], float] = time.monotonic, enabled: bool = True,
                 capacity: Optional[CapacityModel] = None, margin: float = 0.1) -> None:
        self.enabled = enabled  # off: count and time requests per tier, never hold one back
        self.tiers = {t.name: TierState(t) for t in tiers}
        self.window_s = window_s
        self.min_attainment = min_attainment
        self.clock = clock
        self.capacity, self.margin = capacity, margin
        self._waiters: list[_Waiter] = []
        self._seq = 0
        self._cond: Optional[asyncio.Condition] = None

    # --- the rules -------------------------------------------------------------------------
    def share(self, t: TierState, now: float) -> Optional[float]:
        """T's share of the admissions of the last window (None: nobody was admitted)."""
        total = 0
        for u in self.tiers.values():
            while u.starts and now - u.starts[0] > self.window_s:
                u.starts.popleft()
            total += len(u.starts)
        return len(t.starts) / total if total else None

    def starving(self, t: TierState, now: float) -> bool:
        floor = t.tier.share_floor
        if floor <= 0:
            return False
        s = self.share(t, now)
        return s is None or s < floor

    def own_load(self, t: TierState) -> Optional[str]:
        if t.limit is not None and t.running >= t.limit:
            return (f"tier '{t.name}' has {t.running} running requests, as many as keep its promise now "
                    f"(learned limit {t.limit:.1f})")
        return None

    def blocked_by(self, tier: str) -> Optional[str]:
        """Why a request of `tier` cannot start now (None: it can)."""
        t = self.tiers[tier]
        mc = t.tier.max_concurrency
        if mc is not None and t.running >= mc:
            return f"tier '{tier}' has {t.running} running requests (max_concurrency {mc})"
        own = self.own_load(t)
        if own is not None:
            return own
        now = self.clock()
        if self.starving(t, now):
            return None  # its minimum share: more important tiers do not hold it back now
        for u in self.tiers.values():
            if u.priority < t.priority and u.tier.promised and u.running > 0:
                att = u.attainment(now, self.window_s)
                if att is not None and att < self.min_attainment:
                    return f"tier '{u.name}' is below its promise (attainment {att:.0%}); tier '{tier}' waits for it"
        return self._predicted_miss(t)

    def _predicted_miss(self, t: TierState) -> Optional[str]:
        if self.capacity is None:
            return None
        # a more important promised tier counts with its queued requests: their place is kept
        waiting = collections.Counter(w.tier for w in self._waiters)
        count = {u.name: u.running + waiting[u.name] if u.priority < t.priority and u.tier.target_tokens_per_s
                 else u.running for u in self.tiers.values()}
        running = sum(count.values())
        if running == 0:
            return None  # an idle server always takes the request
        b = running + 1
        less_important_running = any(u.priority > t.priority and u.running > 0 for u in self.tiers.values())
        if t.tier.admit_at == "plain_speed" and t.tier.target_tokens_per_s is not None:
            need = (1 + self.margin) * t.tier.target_tokens_per_s
            p = self.capacity.period(b)
            if p is not None and 1.0 / p < need:
                return (f"tier '{t.name}' admits at plain decoding's speed (admit_at: plain_speed): "
                        f"{1.0 / p:.1f} tok/s per user with {b} requests running, below its "
                        f"{t.tier.target_tokens_per_s:g} tok/s target (+{self.margin:.0%} margin)")
        for u in sorted(self.tiers.values(), key=lambda u: u.priority):
            target = u.tier.target_tokens_per_s
            if u.priority > t.priority or target is None or (count[u.name] == 0 and u is not t):
                continue
            need = (1 + self.margin) * target
            if u.priority < t.priority:  # the share of u's requests kept at B+1 against B
                next_att, ref_att = self.capacity.attainment(u.name, b, need), self.capacity.attainment(u.name, running, need)
                if next_att is not None and ref_att is not None:
                    if next_att < min(self.min_attainment, ref_att):
                        return (f"tier '{u.name}' is predicted to keep {next_att:.0%} of its requests at its "
                                f"{target:g} tok/s target (+{self.margin:.0%} margin) with {b} requests running, "
                                f"against {ref_att:.0%} with {running}")
                    continue  # the tier keeps >= 95 %, or holding T back would not raise its share
            if u.priority == t.priority:
                if less_important_running:
                    continue  # they drain: rule (c) holds their tiers back while u misses
                now_pred = self.capacity.predict(u.name, running)
                if now_pred is None or now_pred < target:
                    continue  # already below target at this load: holding u back does not keep it
            pred = self.capacity.predict(u.name, b)
            if pred is not None and pred < need:
                return (f"tier '{u.name}' is predicted at {pred:.1f} tok/s per user with {b} requests running, "
                        f"below its {target:g} tok/s target (+{self.margin:.0%} margin)")
        return None

    # --- the queue -------------------------------------------------------------------------
    def _first_startable(self) -> Optional[_Waiter]:
        for w in sorted(self._waiters):
            if self.blocked_by(w.tier) is None:
                return w
        return None

    def _start(self, t: TierState) -> None:
        t.running += 1
        t.counts["admitted"] += 1
        t.starts.append(self.clock())

    def _deadline(self, t: TierState, arrived: float) -> float:
        return arrived + (t.tier.target_ttft_s if t.tier.target_ttft_s is not None else t.tier.queue_timeout_s)

    async def admit(self, tier: Optional[str]) -> bool:
        """Return when the request may start (it then counts as running until release());
        True if it had to wait in the queue."""
        if tier is None or tier not in self.tiers:
            return False
        t = self.tiers[tier]
        if not self.enabled:
            self._start(t)
            return False
        if self._cond is None:
            self._cond = asyncio.Condition()
        arrived = time.monotonic()  # real time, whatever clock ages attainment
        async with self._cond:
            reason = self.blocked_by(tier)
            me = _Waiter(t.priority, self._deadline(t, arrived), self._seq + 1, tier)
            ahead = any(w < me for w in self._waiters) and not self.starving(t, self.clock())
            if reason is None and not ahead:
                self._start(t)
                return False
            if reason is not None and reason == self.own_load(t):
                t.counts["held_by_own_load"] += 1
            if t.tier.on_overload == "reject":
                t.counts["rejected"] += 1
                raise Overloaded(429, tier, f"x-agent-tier: {reason or 'earlier requests are queued'}; "
                                 f"tier '{tier}' rejects on overload (on_overload: reject), retry later")
            t.counts["queued"] += 1
            self._seq += 1
            self._waiters.append(me)
            deadline = arrived + t.tier.queue_timeout_s
            try:
                while self._first_startable() is not me:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        t.counts["timed_out"] += 1
                        raise Overloaded(429, tier, f"x-agent-tier: queued {t.tier.queue_timeout_s:g} s (tier '{tier}' "
                                         f"queue_timeout_s) without capacity: {self.blocked_by(tier) or 'others first'}",
                                         retry_after=max(1, int(t.tier.queue_timeout_s)), timed_out=True)
                    try:  # re-check on every release, and at least every 0.25 s (attainment ages out)
                        await asyncio.wait_for(self._cond.wait(), timeout=min(left, 0.25))
                    except asyncio.TimeoutError:
                        pass
                self._start(t)
                if t.tier.target_ttft_s is not None and time.monotonic() - arrived > t.tier.target_ttft_s:
                    t.counts["late"] += 1  # its promise is lost already: it runs, and counts as missed
                return True
            finally:
                self._waiters.remove(me)
                self._cond.notify_all()

    async def release(self, tier: Optional[str], tokens_per_s: Optional[float], ttft_s: Optional[float] = None,
                      waited_s: float = 0.0) -> None:
        """A request of `tier` finished: its decode speed and its time to first token from arrival
        (`waited_s` of it in this gate's queue) judge its promise and teach the tier's limit."""
        if tier is None or tier not in self.tiers:
            return
        t = self.tiers[tier]
        met = t.tier.met(tokens_per_s, ttft_s)
        if met is not None:
            t.recent.append((self.clock(), met))
            service_ttft = None if ttft_s is None else max(0.0, ttft_s - waited_s)
            t.learn(t.tier.met(tokens_per_s, service_ttft), t.running)
        t.running -= 1
        if self._cond is not None:
            async with self._cond:
                self._cond.notify_all()

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.clock()
        b = sum(t.running for t in self.tiers.values()) + 1
        pred = (lambda name: self.capacity.predict(name, b)) if self.capacity is not None else (lambda name: None)

        def share(t: TierState) -> Optional[float]:
            target = t.tier.target_tokens_per_s
            if self.capacity is None or target is None:
                return None
            return self.capacity.attainment(t.name, b, (1 + self.margin) * target)

        return [{"name": t.name, "predicted_tokens_per_s_next": pred(t.name), "predicted_attainment_next": share(t),
                 "target_tokens_per_s": t.tier.target_tokens_per_s, "target_ttft_s": t.tier.target_ttft_s,
                 "priority": t.priority, "max_concurrency": t.tier.max_concurrency, "on_overload": t.tier.on_overload,
                 "min_share": t.tier.share_floor, "admitted_share": self.share(t, now), "concurrency_limit": t.limit,
                 "running": t.running, "queued_now": sum(1 for w in self._waiters if w.tier == t.name),
                 "attainment": t.attainment(now, self.window_s), **t.counts}
                for t in sorted(self.tiers.values(), key=lambda t: t.priority)]
