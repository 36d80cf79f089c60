"""Prefill pacing: a less important request's prefill waits while it would break a promise.

SGLang prefills a newly arrived request before the next decode step, and on a small machine a
prefill stalls every running stream for a long time (a 200-token prompt at ~250 tok/s: 0.8 s,
about six decode steps). The admission gate and the tier-aware scheduler shape decode only, so
a promised (interactive) request can meet its speed in every step and still miss it over the
request. Before SGLang builds a prefill batch, `PrefillPacer.defer` predicts each running
promised request's speed over its whole answer if the stall happened now,

    (tokens so far + remaining) / (elapsed + remaining / speed so far + stall),

remaining = its max_new_tokens left (an upper bound), stall = the waiting prompt tokens over
the measured prefill rate, and holds the prefill back while any prediction falls below
(1 + margin) x that request's target. Never held back: a waiting request of a tier as
important as the most important promised running one (its prefill is a promise too), a
chunked prefill already under way, and anything that has waited `max_defer_s` (no starvation).

Only the order of work changes, never a token: lossless by construction.

Experimental and off by default (profile `prefill_max_defer_s: 0`): at 8 clients on the
bundled model it kept 50 % of interactive requests on target against 75 % without it (one run
against two, 8 interactive requests each, within this VM's noise), so no gain is shown yet.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

from sglang_ext.tier_policy import TierPolicy, request_tags


class PrefillPacer:
    def __init__(self, policy: TierPolicy, max_defer_s: float = 10.0, margin: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy, self.max_defer_s, self.margin, self.clock = policy, max_defer_s, margin, clock
        self.rate: Optional[float] = None  # prefill tokens per second (EMA of measured extends)
        self._waiting_since: dict[str, float] = {}
        self.deferred = 0  # steps held back (metrics, tests)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            r = tokens / seconds
            self.rate = r if self.rate is None else 0.7 * self.rate + 0.3 * r

    def _priority(self, tier: str) -> Optional[int]:
        info = self.policy.tiers.get(tier)
        return None if info is None else info.priority

    def defer(self, running: Sequence[Any], waiting: Sequence[Any]) -> bool:
        """Hold this scheduling round's prefill back? running/waiting: SGLang Reqs."""
        if self.max_defer_s <= 0 or not waiting or self.rate is None:
            return False
        now = self.clock()
        live = {r.rid for r in waiting}
        self._waiting_since = {rid: t for rid, t in self._waiting_since.items() if rid in live}
        for r in waiting:
            self._waiting_since.setdefault(r.rid, now)
        promised = []
        for r in running:
            tier = request_tags(r)[1]
            info = self.policy.tiers.get(tier)
            if info is not None and info.target:
                promised.append((r, info))
        if not promised:
            return False
        top = min(info.priority for _, info in promised)
        for r in waiting:
            p = self._priority(request_tags(r)[1])
            if (p is not None and p <= top) or now - self._waiting_since[r.rid] >= self.max_defer_s:
                return False
        stall = sum(len(r.origin_input_ids) - len(getattr(r, "prefix_indices", ()) or ()) for r in waiting[:1]) / self.rate
        for r, info in promised:
            n = len(r.output_ids)
            got = self.policy.achieved(r.rid, n, now)
            st = self.policy._start.get(r.rid)
            if got is None or st is None:
                continue  # too early to know its speed
            t0, n0 = st
            max_new = getattr(r.sampling_params, "max_new_tokens", None)
            remaining = max(0, (max_new if max_new is not None else 4 * n) - n)
            done = n - n0
            predicted = (done + remaining) / ((now - t0) + remaining / max(got, 1e-6) + stall)
            if predicted < (1 + self.margin) * float(info.target):
                self.deferred += 1
                return True
        return False


TARGET = "sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw"


def around_prefill(original: Callable[..., Any], scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    pacer = getattr(getattr(scheduler, "draft_worker", None), "pacer", None)
    if pacer is not None and getattr(scheduler, "chunked_req", None) is None:
        running_batch = kwargs.get("running_batch", args[1] if len(args) > 1 else None)
        try:
            hold = running_batch is not None and pacer.defer(running_batch.reqs, scheduler.waiting_queue)
        except Exception:  # pacing is an aid: never let it stop scheduling
            hold = False
        if hold:
            return None, running_batch
    return original(scheduler, *args, **kwargs)
