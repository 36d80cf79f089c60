"""Prefill pacing: promised tiers first, and a prefill waits while it would break a promise.

SGLang prefills newly arrived requests before the next decode step, first come first served,
and on a small machine a prefill stalls every running stream for a long time (a 700-token
agent turn at ~400 tok/s: 1.7 s, a whole interactive answer). The admission gate and the
tier-aware scheduler shape decode only, so a promised (interactive) request can meet its
speed in every step and still miss it over the request. Before SGLang builds a prefill batch,
`PrefillPacer.plan`

1. orders the waiting queue by tier priority, arrival order within a tier, so a promised
   request never waits behind best-effort prompts (nor shares a chunked prefill with them);
2. walks it in that order, adding each request's uncached prompt tokens to the stall this
   round would cause (tokens / the measured prefill rate), and holds a request back when that
   stall would put a running promised request of its own or a more important tier below
   (1 + margin) x target over its whole answer:

       (tokens so far + remaining) / (elapsed + remaining / speed x slowdown + stall),

   remaining = its max_new_tokens left (an upper bound), speed = its decode speed so far,
   slowdown = the measured step period at the batch size this round would leave over that at
   the batch size now (each request let in decodes alongside it for the rest of its answer).
   A request of the same tier is held only for a running request whose speed is measured.
   A request is only held for one that holding can save: one that would still reach its
   target (the target itself, not target + margin: a τ ≈ 1 answer making 12.5 tok/s alone
   keeps a 12 tok/s promise) at the speed it would get once the less important requests drain
   (its speed scaled by the measured step period at the current batch size over that at the
   smaller one). A promised request too new to have a speed, or being prefilled in this very
   round, counts as exactly on target: anything less important that would stall it waits
   until its speed shows slack.

Never held back: a request that has waited `max_defer_s` (no starvation; one such per round,
so requests held together are not let go together into one long stall), a chunked prefill
already under way, and everything when no prefill rate has been measured yet. Only the order
of work changes, never a token: lossless by construction.

On by default (profile `prefill_max_defer_s: 10`; 0 turns it off). A/B at 8 clients on agent
turns, 20 interactive requests per system, each pair in one run (docs/bench-cpu/):
  tiers-agent-pacing3 (this pacer)                 80 % vs 60 % interactive, 85 % vs 78 % standard, total +1 %
  tiers-agent-pacing2 (no target-only rescue)      70 % vs 65 %, 80 % vs 72 %, total +1 %
  tiers-agent-pacing  (same-tier holds for new promises, overdue requests all at once, no batch
                       slowdown in the prediction) 75 % vs 90 %, total +3 %
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

from sglang_ext import worker_metrics
from sglang_ext.load_report import PRIOR_SLOPE
from sglang_ext.tier_policy import TierPolicy, request_tags


def uncached_tokens(req: Any) -> int:
    """Prompt tokens a prefill of `req` computes: what the radix cache does not already hold."""
    total = len(getattr(req, "origin_input_ids", ()) or ()) + len(getattr(req, "output_ids", ()) or ())
    hit = int(getattr(req, "num_matched_prefix_tokens", 0) or getattr(req, "prefix_len", 0) or 0)
    return max(0, total - hit)


class PrefillPacer:
    def __init__(self, policy: TierPolicy, max_defer_s: float = 10.0, margin: float = 0.1,
                 clock: Callable[[], float] = time.monotonic,
                 periods: Optional[Callable[[], dict[int, float]]] = None) -> None:
        self.policy, self.max_defer_s, self.margin, self.clock = policy, max_defer_s, margin, clock
        self.periods = periods or (lambda: {})  # measured decode step period per batch size
        self.rate: Optional[float] = None  # prefill tokens per second (EMA of measured extends)
        self._waiting_since: dict[str, float] = {}
        self.deferred = 0  # rounds with a request held back (metrics, tests)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            r = tokens / seconds
            self.rate = r if self.rate is None else 0.7 * self.rate + 0.3 * r

    def _priority(self, req: Any) -> int:
        info = self.policy.tiers.get(request_tags(req)[1])
        return info.priority if info is not None else self.policy.top

    def order(self, waiting: Sequence[Any]) -> list[Any]:
        """Most important tier first; arrival order within a tier (a stable sort)."""
        return sorted(waiting, key=self._priority)

    def _slowdown(self, b: int, small: int) -> float:
        """Step period at `b` running requests over that at `small` (>= 1)."""
        p = self.periods()
        if b in p and small in p and p[small] > 0:
            return max(1.0, p[b] / p[small])
        return (1 + PRIOR_SLOPE * (b - 1)) / (1 + PRIOR_SLOPE * (small - 1))

    def _promises(self, running: Sequence[Any], now: float) -> list[tuple[int, float, float, float, float, bool]]:
        """Per running promised request that holding back can save: (priority, need, tokens so
        far + remaining, elapsed, remaining / speed at the current batch size, speed measured)."""
        out = []
        prios = [self._priority(r) for r in running]
        for r, p in zip(running, prios):
            info = self.policy.tiers.get(request_tags(r)[1])
            if info is None or not info.target:
                continue
            need = (1 + self.margin) * float(info.target)
            n = len(r.output_ids)
            max_new = getattr(r.sampling_params, "max_new_tokens", None)
            remaining = max(0, (max_new if max_new is not None else 4 * n) - n)
            got = self.policy.achieved(r.rid, n, now)
            st = self.policy._start.get(r.rid)
            if got is None or st is None:
                out.append((p, need, 1.0, 1.0 / need, 0.0, False))  # new: exactly on target
                continue
            t0, n0 = st
            done, elapsed = n - n0, now - t0
            keep = sum(1 for q in prios if q <= p)  # what runs on when less important work drains
            best = got * self._slowdown(len(running), keep)
            if (done + remaining) / (elapsed + remaining / max(best, 1e-6)) < float(info.target):
                continue  # misses its target even alone with its peers: holding others back does not save it
            out.append((p, need, done + remaining, elapsed, remaining / max(got, 1e-6), True))
        return out

    def _promised(self, req: Any) -> bool:
        info = self.policy.tiers.get(request_tags(req)[1])
        return info is not None and bool(info.target)

    def plan(self, running: Sequence[Any], waiting: Sequence[Any],
             match: Optional[Callable[[Sequence[Any]], None]] = None) -> tuple[list[Any], list[Any]]:
        """(requests SGLang may prefill this round, in order; requests held back). `match`
        refreshes the waiting requests' radix-cache hits, called only when a stall matters."""
        ordered = self.order(waiting)
        if self.max_defer_s <= 0 or not ordered or self.rate is None:
            return ordered, []
        now = self.clock()
        live = {r.rid for r in ordered}
        self._waiting_since = {rid: t for rid, t in self._waiting_since.items() if rid in live}
        for r in ordered:
            self._waiting_since.setdefault(r.rid, now)
        promises = self._promises(running, now)
        if not promises and not any(self._promised(r) for r in ordered):
            return ordered, []  # no promise running or waiting: nothing a stall could break
        if match is not None:
            match(ordered)
        go: list[Any] = []
        held: list[Any] = []
        stall = 0.0
        overdue = False  # one request per round goes for having waited: no burst of them
        for r in ordered:
            p = self._priority(r)
            cost = uncached_tokens(r) / self.rate
            waited = now - self._waiting_since[r.rid] >= self.max_defer_s
            # the rest of each answer runs at the batch size this round leaves: every request let
            # in decodes alongside it from now on (step period at B over that at the B now)
            slow = self._slowdown(len(running) + len(go) + 1, max(1, len(running)))
            # a same-tier request waits only for a promise whose speed is known: two of a tier
            # arriving together are prefilled together, not one into the other's first steps
            breaks = any((q < p or (q == p and measured)) and total / (elapsed + rest * slow + stall + cost) < need
                         for q, need, total, elapsed, rest, measured in promises)
            if breaks and (overdue or not waited):
                held.append(r)
                continue
            overdue = overdue or breaks
            go.append(r)
            stall += cost
            if self._promised(r):  # prefilled now, decoding next: a promise too
                need = (1 + self.margin) * float(self.policy.tiers[request_tags(r)[1]].target)
                promises.append((p, need, 1.0, 1.0 / need - stall, 0.0, False))  # only later stalls count
        if held:
            self.deferred += 1
        return go, held


def match_prefixes(scheduler: Any, reqs: Sequence[Any]) -> None:
    """Each waiting request's radix-cache hit, as SGLang's scheduling policy computes it every
    round (an agent's next turn is mostly cached: its stall is the new tokens only)."""
    tree = getattr(scheduler, "tree_cache", None)
    if tree is None or not tree.supports_fast_match_prefix():
        return
    from sglang.srt.mem_cache.common import match_kv_cache

    for r in reqs:
        match_kv_cache(r, tree)


TARGET = "sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw"


def around_prefill(original: Callable[..., Any], scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    pacer = getattr(getattr(scheduler, "draft_worker", None), "pacer", None)
    if pacer is None or getattr(scheduler, "chunked_req", None) is not None or not scheduler.waiting_queue:
        return original(scheduler, *args, **kwargs)
    running_batch = kwargs.get("running_batch", args[1] if len(args) > 1 else None)
    queue = list(scheduler.waiting_queue)
    try:
        go, held = pacer.plan(running_batch.reqs if running_batch is not None else [], queue,
                              match=lambda reqs: match_prefixes(scheduler, reqs))
    except Exception:  # pacing is an aid: never let it stop scheduling
        return original(scheduler, *args, **kwargs)
    if held:
        worker_metrics.prefill_held([request_tags(r)[1] for r in held])
    if not go:
        return None, running_batch
    scheduler.waiting_queue = go
    try:
        return original(scheduler, *args, **kwargs)
    finally:  # what SGLang left waiting, then the held requests; all in plan order next round
        scheduler.waiting_queue = list(scheduler.waiting_queue) + held
