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

   remaining = its max_new_tokens left (an upper bound), speed = its tokens per decode step so
   far over the measured step period at the batch size now (prefills between steps left out:
   the stalls are added apart; its decode speed so far until both are known), slowdown = the
   step period at the batch size this round would leave over that at the batch size now (each
   request let in decodes alongside it for the rest of its answer).
   A request of the same tier is held for a running request of its tier too (two answers
   of a tier interleaved with each other's prefills both miss; one after the other, both can
   keep the promise), but not for one being prefilled in this very round: two arriving
   together are prefilled together.
   A request is only held for one that holding can save: one that would still reach its
   target (the target itself, not target + margin: a τ ≈ 1 answer making 12.5 tok/s alone
   keeps a 12 tok/s promise) at the speed it would get once the less important requests and
   the other answers of its tier are gone (its tokens per step over the step period at that
   batch size, and at least plain decoding's: a τ ≈ 1 answer slowed to 7 tok/s beside wide
   verifies makes 16 alone here). A promised request too new to have a speed, or being
   prefilled in this very round, counts as exactly on target: anything less important that
   would stall it waits until its speed shows slack.

No starvation: a request that has waited `max_defer_s` is held only while it would break an
answer already decoding (it goes with the next promise's prefill, where the stall lands in
that request's time to first token, or when the answers have slack), and after OVERDUE_HARD x
max_defer_s it goes regardless. Overdue requests
go one per decode step: SGLang runs prefill rounds back to back while requests wait, so "one
per round" let several overdue prompts into one long stall. Never held back: a chunked
prefill already under way (SGLang fills the rest of its chunks from the waiting queue, so it
is shown only what may go), and everything when no prefill rate has been measured yet. Only
the order of work changes, never a token: lossless by construction.

On by default (profile `prefill_max_defer_s: 10`; 0 turns it off). A/B at 8 clients on agent
turns, 20 interactive requests per system, each pair in one run (docs/bench-cpu/):
  tiers-agent-pacing4 (this pacer)                 95 % vs 65 % interactive, 92 % vs 75 % standard, total -3 %
  tiers-agent-pacing3 (overdue requests one per prefill round, into any answer after 10 s; same
                       tier holds only for measured answers; chunks filled from the whole queue;
                       future speed from speed so far)  80 % vs 60 %, 85 % vs 78 %, total +1 %
  tiers-agent-pacing2 (no target-only rescue)      70 % vs 65 %, 80 % vs 72 %, total +1 %
  tiers-agent-pacing  (same-tier holds for new promises, overdue requests all at once, no batch
                       slowdown in the prediction) 75 % vs 90 %, total +3 %
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

from sglang_ext.spec import stats as worker_metrics
from sglang_ext.tiers.load_report import PRIOR_SLOPE
from sglang_ext.tiers.policy import TierPolicy, request_tags

OVERDUE_HARD = 3.0  # x max_defer_s: past this a held request goes whatever it stalls


class Promise(NamedTuple):
    """A promised answer a prefill could break: it keeps `need` tok/s while
    total / (elapsed + rest x slowdown + stall) >= need."""

    priority: int
    need: float  # (1 + margin) x target
    total: float  # tokens so far + remaining
    elapsed: float
    rest: float  # remaining / its speed at the current batch size
    measured: bool  # its speed is known (else: counts as exactly on target)
    now_in: bool  # prefilled in this round: a stall lands in its time to first token
    rid: str

    @classmethod
    def fresh(cls, priority: int, need: float, rid: str, now_in: bool, stall: float = 0.0) -> Promise:
        """No speed yet: exactly on target, so any later stall breaks it."""
        return cls(priority, need, 1.0, 1.0 / need - stall, 0.0, False, now_in, rid)


def uncached_tokens(req: Any) -> int:
    """Prompt tokens a prefill of `req` computes: what the radix cache does not already hold."""
    total = len(getattr(req, "origin_input_ids", ()) or ()) + len(getattr(req, "output_ids", ()) or ())
    hit = int(getattr(req, "num_matched_prefix_tokens", 0) or getattr(req, "prefix_len", 0) or 0)
    return max(0, total - hit)


class PrefillPacer:
    def __init__(self, policy: TierPolicy, max_defer_s: float = 10.0, margin: float = 0.1,
                 clock: Callable[[], float] = time.monotonic,
                 periods: Optional[Callable[[], dict[int, float]]] = None,
                 tau: Optional[Callable[[str], Optional[float]]] = None,
                 plain_periods: Optional[Callable[[], dict[int, float]]] = None) -> None:
        self.policy, self.max_defer_s, self.margin, self.clock = policy, max_defer_s, margin, clock
        self.periods = periods or (lambda: {})  # measured decode step period per batch size (no prefills)
        self.tau = tau or (lambda rid: None)  # a running request's tokens per step so far
        self.plain_periods = plain_periods or (lambda: {})  # the same for steps verifying no drafts
        self.rate: Optional[float] = None  # prefill tokens per second (EMA of measured extends)
        self._waiting_since: dict[str, float] = {}
        self.deferred = 0  # rounds with a request held back (metrics, tests)
        self.steps = 0  # decode steps so far (the worker counts them)
        self._overdue_step = -1  # the decode step an overdue request last went before

    def decode_step(self) -> None:
        self.steps += 1

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

    def _period(self, b: int, plain: bool = False) -> Optional[float]:
        """Step period at `b` running requests (`plain`: of steps verifying no drafts):
        measured, else the nearest measured one scaled by the prior cost slope; None before
        any is measured."""
        p = self.plain_periods() if plain else self.periods()
        if b in p:
            return p[b]
        if not p:
            return None
        near = min(p, key=lambda k: (abs(k - b), k))
        return p[near] * (1 + PRIOR_SLOPE * (b - 1)) / (1 + PRIOR_SLOPE * (near - 1))

    def _promises(self, running: Sequence[Any], now: float) -> list[Promise]:
        """Each running promised request that holding back can save."""
        out = []
        prios = [self._priority(r) for r in running]
        for r, p in zip(running, prios):
            info = self.policy.tiers.get(request_tags(r)[1])
            if info is None or not info.target_tokens_per_s:
                continue
            need = (1 + self.margin) * float(info.target_tokens_per_s)
            n = len(r.output_ids)
            max_new = getattr(r.sampling_params, "max_new_tokens", None)
            remaining = max(0, (max_new if max_new is not None else 4 * n) - n)
            got = self.policy.achieved(r.rid, n, now)
            st = self.policy._start.get(r.rid)
            if got is None or st is None:
                out.append(Promise.fresh(p, need, r.rid, now_in=False))
                continue
            t0, n0 = st
            done, elapsed = n - n0, now - t0
            # what runs on once less important work drains and its own tier's other answers end
            # (answers are short; a same-tier request waits for this one): the more important ones
            keep = 1 + sum(1 for q in prios if q < p)
            tau, at_now, at_keep = self.tau(r.rid), self._period(len(running)), self._period(keep)
            if tau is not None and at_now and at_keep:
                # from here on: its tokens per step over the step period, stalls added apart
                # (its speed so far carries the stalls it already had). Alone (with the more
                # important ones) at least plain decoding's speed, which a request whose drafts
                # do not pay gets: the mean step includes wide verifies of requests whose drafts do
                plain = self._period(keep, True)
                ahead, best = tau / at_now, max(tau / at_keep, 1 / plain if plain else 0.0)
            else:
                ahead = got
                best = got * self._slowdown(len(running), keep)
            if (done + remaining) / (elapsed + remaining / max(best, 1e-6)) < float(info.target_tokens_per_s):
                continue  # misses its target even alone: holding others back does not save it
            out.append(Promise(p, need, done + remaining, elapsed, remaining / max(ahead, 1e-6), True, False, r.rid))
        return out

    def _promised(self, req: Any) -> bool:
        info = self.policy.tiers.get(request_tags(req)[1])
        return info is not None and bool(info.target_tokens_per_s)

    def plan(self, running: Sequence[Any], waiting: Sequence[Any],
             match: Optional[Callable[[Sequence[Any]], None]] = None,
             ongoing: Optional[Any] = None) -> tuple[list[Any], list[Any]]:
        """(requests SGLang may prefill this round, in order; requests held back). `match`
        refreshes the waiting requests' radix-cache hits, called only when a stall matters;
        `ongoing`: a chunked prefill under way (it continues this round whatever the plan)."""
        ordered = self.order(waiting)
        if self.max_defer_s <= 0 or not ordered or self.rate is None:
            return ordered, []
        now = self.clock()
        live = {r.rid for r in ordered}
        self._waiting_since = {rid: t for rid, t in self._waiting_since.items() if rid in live}
        for r in ordered:
            self._waiting_since.setdefault(r.rid, now)
        promises = self._promises(running, now)
        if ongoing is not None and self._promised(ongoing):  # being prefilled: a promise too
            need = (1 + self.margin) * float(self.policy.tiers[request_tags(ongoing)[1]].target_tokens_per_s)
            promises.append(Promise.fresh(self._priority(ongoing), need, ongoing.rid, now_in=True))
        if not promises and not any(self._promised(r) for r in ordered):
            return ordered, []  # no promise running or waiting: nothing a stall could break
        if match is not None:
            match(ordered)
        go: list[Any] = []
        held: list[Any] = []
        stall = 0.0
        overdue_ok = self.steps != self._overdue_step  # one overdue request per decode step
        trace = [] if worker_metrics.tracing() else None
        for r in ordered:
            p = self._priority(r)
            cost = uncached_tokens(r) / self.rate
            waited = now - self._waiting_since[r.rid]
            # the rest of each answer runs at the batch size this round leaves: every request let
            # in decodes alongside it from now on (step period at B over that at the B now)
            slow = self._slowdown(len(running) + len(go) + 1, max(1, len(running)))
            # Per promise this prefill would break: True if that answer is decoding already, False
            # if it is prefilled in this round (the stall lands in its time to first token). A
            # same-tier request does not wait for one prefilled in this round: two of a tier
            # arriving together are prefilled together, not one into the other's first steps.
            broken = [not q.now_in for q in promises
                      if (q.priority < p or (q.priority == p and not q.now_in))
                      and q.total / (q.elapsed + q.rest * slow + stall + cost) < q.need]
            overdue = waited >= self.max_defer_s
            if broken and overdue and overdue_ok and (waited >= OVERDUE_HARD * self.max_defer_s or not any(broken)):
                overdue_ok = False  # it goes; the next overdue one after a decode step
                self._overdue_step = self.steps
            elif broken:
                held.append(r)
                if trace is not None:
                    trace.append((r.rid, round(cost, 3), round(waited, 2), broken, "held"))
                continue
            if trace is not None:
                trace.append((r.rid, round(cost, 3), round(waited, 2), broken, "go"))
            go.append(r)
            stall += cost
            if self._promised(r):  # prefilled now, decoding next: a promise too
                need = (1 + self.margin) * float(self.policy.tiers[request_tags(r)[1]].target_tokens_per_s)
                promises.append(Promise.fresh(p, need, r.rid, now_in=True, stall=stall))  # only later stalls count
        if held:
            self.deferred += 1
        if trace is not None:
            worker_metrics.trace_event("pace", {
                "step": self.steps, "running": [r.rid for r in running],
                "promises": [[round(x, 3) if isinstance(x, float) else x for x in q] for q in promises],
                "waiting": trace})
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
    if pacer is None or not scheduler.waiting_queue:
        if pacer is not None:
            worker_metrics.prefill_held([])  # nothing waits, so nothing is held
        return original(scheduler, *args, **kwargs)
    running_batch = kwargs.get("running_batch", args[1] if len(args) > 1 else None)
    chunked = getattr(scheduler, "chunked_req", None)
    queue = list(scheduler.waiting_queue)
    try:
        go, held = pacer.plan(running_batch.reqs if running_batch is not None else [], queue,
                              match=lambda reqs: match_prefixes(scheduler, reqs), ongoing=chunked)
    except Exception:  # pacing is an aid: never let it stop scheduling
        return original(scheduler, *args, **kwargs)
    worker_metrics.prefill_held([request_tags(r)[1] for r in held])
    if not go and chunked is None:
        return None, running_batch
    # A chunked prefill under way continues with only what may go beside it: SGLang fills
    # the rest of the chunk from the waiting queue, held requests included if they were there.
    scheduler.waiting_queue = go
    try:
        return original(scheduler, *args, **kwargs)
    finally:  # what SGLang left waiting, then the held requests; all in plan order next round
        scheduler.waiting_queue = list(scheduler.waiting_queue) + held
