"""Admission control per interactivity tier (HTTP process, in front of SGLang).

A request of tier T starts when
  (a) T has no `max_concurrency`, or fewer than that many of its requests are running; and
  (b) no more important tier (smaller `priority`) with a target speed has running requests
      while its recent attainment — the share of its requests finished in the last
      `window_s` seconds (at most the last 16) whose per-user tok/s met the target — is below
      `min_attainment` (0.95). With `live` (profile admission_live) the rule looks at the
      running streams instead: a more important tier has a running request below its target
      now, as the scheduler measures each running request's decode speed (load report,
      tier-aware scheduling; the look-back applies when no report came in the last 2 s).
      The live rule lets lower tiers back in as soon as the promised streams are on target;
      measured at 8 clients it did worse (40 % interactive attainment, total 0.77x plain,
      against 90 % and 0.89x looking back, same run): their prefills then stall the
      promised streams. So it is off by default.
  (c) predictive (when the scheduler publishes its load report, load_report.py): admitting
      one more request, B+1 running, keeps the predicted speed τ_U / period(B+1) of every
      running tier U with a target more important than T at or above (1 + margin) x U's
      target; and for T itself (when it has a target), if T's promise holds at the current
      load, τ_T / period(B) >= target, it must still hold at B+1. A promise already broken
      at the current load is not served by holding T's own requests back (this machine
      cannot give T its speed even now; more important tiers still hold lower ones back).
      A request of T is also admitted when less important requests are running: those stop
      being admitted and drain, so a promised tier never waits behind best-effort work.
      With `plan: attainment` (profile admission_plan, the default) a more important tier U
      is judged by the share of its requests predicted at (1 + margin) x target, over its
      running requests and its last 16 finished ones (each at its own τ / period(B)): T waits
      when that share at B+1 would fall below both 95 % and the share at B. So T is not held
      back for a request that misses at any batch size (its text does not draft; the machine
      cannot give it the speed anyway), and it is held back when the running requests all copy
      well but the tier's recent answers say the next ones will not. With `drain`
      (experimental) a tier U as important as T or more waits T when U's share at B+1 would
      fall below 95 % and below the share U keeps once everything less important drains
      (U's and more important tiers' requests, without T's new one): a promised tier whose
      answers need a small batch gets one, and a second request of it waits too. With
      `slowest` U's speed is planned on its slowest running request's τ. Each falls back to
      the mean-τ prediction until a tier has 4 known requests.
      A more important promised tier counts with its queued requests, and (experimental,
      profile admission_return_s, default 0) with its requests that finished in the last
      `return_s` seconds and were not yet followed by a new one: an agent's next turn comes back
      after its tool call, and a request let in meanwhile is prefilled into the middle of it.
      Measured at 8 clients on agent turns, `drain` with a 1 s return window did worse than
      the default (60 % interactive attainment, 0.87x plain, against 75 % and 1.00x, one run):
      the promised tier ran alone at small batches while lower tiers waited, and its misses
      were prefills of its own second client and answers no batch size saves.
Otherwise T's `on_overload` decides: "reject" answers 429 at once (Retry-After set); "queue"
waits, in (priority, arrival) order, until (a) and (b) hold, at most `queue_timeout_s`, then
answers 503. Both errors name the tier and the reason, so a client knows what to back off on.
Rule (c) acts before a promise is broken, rule (b) after; (b) is also what keeps promises: when the top tier misses its target, lower tiers stop
adding load instead of everyone slowing down; on a compute-bound server every extra
request slows every running one.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from agentserve.profile import Tier

from sglang_ext.tiers.load_report import CapacityModel

RECENT = 16


@dataclass
class TierState:
    name: str
    target: Optional[float]
    priority: int
    max_concurrency: Optional[int]
    on_overload: str
    queue_timeout_s: float
    running: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"admitted": 0, "queued": 0, "rejected": 0, "timed_out": 0})
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT))  # (t_end, tok/s)
    pending: collections.deque = field(default_factory=collections.deque)  # end times of requests expected back

    def returning(self, now: float, window_s: float) -> int:
        """Requests expected back: ended in the last `window_s` and not yet followed by a new start
        of the tier (an agent's next turn follows its last one after a tool call)."""
        while self.pending and now - self.pending[0] > window_s:
            self.pending.popleft()
        return len(self.pending)

    def present(self, now: float, window_s: float) -> int:
        return self.running + self.returning(now, window_s)

    def attainment(self, now: float, window_s: float) -> Optional[float]:
        xs = [tps for t, tps in self.recent if now - t <= window_s]
        if self.target is None or not xs:
            return None
        return sum(1 for x in xs if x >= self.target) / len(xs)


class Overloaded(Exception):
    def __init__(self, status: int, tier: str, message: str, retry_after: int = 1):
        super().__init__(message)
        self.status, self.tier, self.message, self.retry_after = status, tier, message, retry_after


class TierGate:
    def __init__(self, tiers: Sequence[Tier], window_s: float = 60.0, min_attainment: float = 0.95,
                 clock: Callable[[], float] = time.monotonic, enabled: bool = True,
                 capacity: Optional[CapacityModel] = None, margin: float = 0.1, live: bool = False,
                 plan: str = "attainment", return_s: float = 0.0) -> None:
        self.enabled = enabled  # off: count and time requests per tier, never hold one back
        self.tiers = {t.name: TierState(t.name, t.target_tokens_per_s, t.priority, t.max_concurrency,
                                        t.on_overload, t.queue_timeout_s) for t in tiers}
        self.window_s = window_s
        self.min_attainment = min_attainment
        self.clock = clock
        self.capacity, self.margin, self.live = capacity, margin, live
        self.plan = plan  # rule (c) for more important tiers: "attainment" or "slowest"
        self.return_s = return_s  # a promised tier's finished request holds its place this long
        self._waiters: list[tuple[int, int, str]] = []  # (priority, seq, tier)
        self._seq = 0
        self._cond: Optional[asyncio.Condition] = None

    def blocked_by(self, tier: str) -> Optional[str]:
        """Why a request of `tier` cannot start now (None: it can)."""
        t = self.tiers[tier]
        if t.max_concurrency is not None and t.running >= t.max_concurrency:
            return f"tier '{tier}' has {t.running} running requests (max_concurrency {t.max_concurrency})"
        now = self.clock()
        for u in self.tiers.values():
            if u.priority < t.priority and u.target is not None and u.present(now, self.return_s) > 0:
                live = self.capacity.behind(u.name) if self.capacity is not None and self.live else None
                if live is not None:
                    if live > 0:
                        return (f"tier '{u.name}' has {live} running request(s) below its {u.target:g} tok/s target; "
                                f"tier '{tier}' waits for it")
                    continue
                att = u.attainment(now, self.window_s)
                if att is not None and att < self.min_attainment:
                    return (f"tier '{u.name}' is below its {u.target:g} tok/s target (attainment {att:.0%}); "
                            f"tier '{tier}' waits for it")
        return self._predicted_miss(t, now)

    def _predicted_miss(self, t: TierState, now: float) -> Optional[str]:
        if self.capacity is None:
            return None
        # a more important promised tier counts with its queued and returning requests: their
        # place is kept (an agent's next turn comes back after a tool call)
        waiting = collections.Counter(w[2] for w in self._waiters)
        count = {u.name: u.present(now, self.return_s) + waiting[u.name]
                 if u.priority < t.priority and u.target is not None else u.running for u in self.tiers.values()}
        running = sum(count.values())
        if running == 0:
            return None  # an idle server always takes the request
        b = running + 1
        less_important_running = any(u.priority > t.priority and u.running > 0 for u in self.tiers.values())
        for u in sorted(self.tiers.values(), key=lambda u: u.priority):
            if u.priority > t.priority or u.target is None or (count[u.name] == 0 and u is not t):
                continue
            need = (1 + self.margin) * u.target
            ref = None  # the batch size u's predicted share at B+1 is compared with
            if self.plan == "drain":  # what u keeps once everything less important drains, without T's request
                ref = max(1, sum(c for v, c in count.items() if self.tiers[v].priority <= u.priority))
            elif self.plan == "attainment" and u.priority < t.priority:
                ref = running  # the load now
            if ref is not None:
                next_att, ref_att = self.capacity.attainment(u.name, b, need), self.capacity.attainment(u.name, ref, need)
                if next_att is not None and ref_att is not None:
                    if next_att < min(self.min_attainment, ref_att):
                        return (f"tier '{u.name}' is predicted to keep {next_att:.0%} of its requests at its "
                                f"{u.target:g} tok/s target (+{self.margin:.0%} margin) with {b} requests running, "
                                f"against {ref_att:.0%} with {ref}")
                    continue  # the tier keeps >= 95 %, or holding T back would not raise its share
            if u.priority == t.priority:
                if less_important_running:
                    continue  # they drain: rule (c) holds their tiers back while u misses
                now_pred = self.capacity.predict(u.name, running)
                if now_pred is None or now_pred < u.target:
                    continue  # already below target at this load: holding u back does not keep it
            pred = self.capacity.predict(u.name, b)
            if pred is not None and pred < need:
                return (f"tier '{u.name}' is predicted at {pred:.1f} tok/s per user with {b} requests running, "
                        f"below its {u.target:g} tok/s target (+{self.margin:.0%} margin)")
        return None

    def _first_startable(self) -> Optional[tuple[int, int, str]]:
        for w in sorted(self._waiters):
            if self.blocked_by(w[2]) is None:
                return w
        return None

    def _start(self, t: TierState) -> None:
        t.running += 1
        t.counts["admitted"] += 1
        if t.pending:
            t.pending.popleft()  # the return it was waiting for

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
        async with self._cond:
            reason = self.blocked_by(tier)
            ahead = any(p <= t.priority for p, _, _ in self._waiters)
            if reason is None and not ahead:
                self._start(t)
                return False
            if t.on_overload == "reject":
                t.counts["rejected"] += 1
                raise Overloaded(429, tier, f"x-agent-tier: {reason or 'earlier requests are queued'}; "
                                 f"tier '{tier}' rejects on overload (on_overload: reject), retry later")
            t.counts["queued"] += 1
            self._seq += 1
            me = (t.priority, self._seq, tier)
            self._waiters.append(me)
            deadline = time.monotonic() + t.queue_timeout_s  # real time, whatever clock ages attainment
            try:
                while self._first_startable() != me:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        t.counts["timed_out"] += 1
                        raise Overloaded(503, tier, f"x-agent-tier: queued {t.queue_timeout_s:g} s (tier '{tier}' "
                                         f"queue_timeout_s) without capacity: {self.blocked_by(tier) or 'others first'}",
                                         retry_after=max(1, int(t.queue_timeout_s)))
                    try:  # re-check on every release, and at least every 0.25 s (attainment and returns age out)
                        await asyncio.wait_for(self._cond.wait(), timeout=min(left, 0.25))
                    except asyncio.TimeoutError:
                        pass
                self._start(t)
                return True
            finally:
                self._waiters.remove(me)
                self._cond.notify_all()

    async def release(self, tier: Optional[str], tokens_per_s: Optional[float]) -> None:
        if tier is None or tier not in self.tiers:
            return
        t = self.tiers[tier]
        t.running -= 1
        if tokens_per_s is not None:
            t.recent.append((self.clock(), tokens_per_s))
        if self.return_s > 0 and t.target is not None:
            t.pending.append(self.clock())
        if self._cond is not None:
            async with self._cond:
                self._cond.notify_all()

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.clock()
        b = sum(t.running for t in self.tiers.values()) + 1
        pred = (lambda name: self.capacity.predict(name, b)) if self.capacity is not None else (lambda name: None)

        def share(t: TierState) -> Optional[float]:
            if self.capacity is None or t.target is None:
                return None
            return self.capacity.attainment(t.name, b, (1 + self.margin) * t.target)

        return [{"name": t.name, "predicted_tokens_per_s_next": pred(t.name), "predicted_attainment_next": share(t),
                 "target_tokens_per_s": t.target, "priority": t.priority,
                 "max_concurrency": t.max_concurrency, "on_overload": t.on_overload, "running": t.running,
                 "queued_now": sum(1 for w in self._waiters if w[2] == t.name),
                 "attainment": t.attainment(now, self.window_s), **t.counts}
                for t in sorted(self.tiers.values(), key=lambda t: t.priority)]
