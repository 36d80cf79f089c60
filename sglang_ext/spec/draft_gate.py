"""Cost-aware gate for model drafting: draft with the DSpark model only where it pays.

On a small machine the drafter is not free: a block costs t_draft (its backbone and the LM
head) and the block's positions make the verify forward longer. For a request whose model
drafts are rarely accepted (chat, math on a weak drafter) the step is slower than plain
decoding. The gate skips model drafting for request r this step when

    E_r * t_token  <  t_draft + t_extra

i.e. the expected accepted model drafts E_r (an EMA over r's earlier model-drafted steps,
starting from the server-wide EMA) buy less time than drafting and the longer verify.

What E_r averages: a block's accepted count is a poor sample of what the next block will
get. At position-1 acceptance ~0.5 about half the blocks accept nothing, and the mean comes
from the few that accept several, so an EMA of counts dips below the threshold after two or
three empty blocks while the request's mean pays, and the probe interval (doubling) then keeps
it from drafting for the rest of the answer: the warm headline run's model-only server skipped
82-98 % of its batch-1 steps with τ ≈ 2 offline. The confidence head's expectation for the same
block (sum of prefix products of its calibrated confidences over the verified positions) has the
same mean where the head is calibrated and far less spread, so with ``estimate="confidence"``
(the default) each sample is the mean of the two: the head's expectation keeps the estimate
steady, the count keeps it honest where the head is not calibrated. t_token (a plain step's seconds per request) and t_extra (what r's
block adds to the verify forward) come from the worker's one step-cost model (step_cost.py),
passed in by the caller; the gate itself measures only the drafter (t_draft, an EMA per
drafted request). A skipped request drafts anyway after `probe_every` skipped steps, so E_r
follows the text (a tool call after chat prose); each probe that still does not pay doubles
that request's interval, up to `max_probe_every` (a probe is not free: the first one also
projects the whole prompt into the drafter's context). Copy drafts are not gated: they cost
nothing to propose.

Cold start: the drafter's first call in a process is slow (kernels chosen by timing, buffers
allocated, the whole prompt projected into its context): 2.6 s against ~10 ms afterwards on a
2-core CPU. Learned as is, that one sample made every later step look too dear to draft, and
the batch-level width check (plan.best_width) then vetoed even the probes, so the drafter never
ran again. Hence: the worker seeds `t_draft` from a start-up timing of the warmed drafter
(`time_drafter`), a new sample counts at most `CLIP` times the estimate, and a probe really
drafts (`decide` says "probe"; propose.py lets it past the width check).

Lossless: the gate's decision for a step uses only earlier steps' outcomes and timings, never
the drafts of this step; skipping only means verifying nothing beyond the anchor, which is
plain decoding through the same forward.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Hashable, Literal

import torch

CLIP = 3.0  # a drafter-time sample counts at most this many times the current estimate
Decision = Literal["draft", "probe", "skip"]


class DraftGate:
    def __init__(self, prior_accepted: float = 1.0, ema: float = 0.3, probe_every: int = 8,
                 time_ema: float = 0.2, max_probe_every: int = 64, t_draft: float | None = None,
                 estimate: Literal["confidence", "accepted"] = "confidence") -> None:
        self.ema, self.time_ema = ema, time_ema
        self.estimate = estimate
        self.probe_every = int(probe_every)
        self.max_probe_every = max(int(max_probe_every), self.probe_every)
        self._interval: dict[Hashable, int] = {}
        self.global_acc = float(prior_accepted)
        self._acc: dict[Hashable, float] = {}
        self._skipped: dict[Hashable, int] = {}
        self.t_draft: float | None = t_draft  # seconds of a drafter call, per drafted request

    # ---- measurements (after each step)
    def observe_draft(self, drafted_rows: int, draft_s: float) -> None:
        if drafted_rows > 0:
            per = draft_s / drafted_rows
            if self.t_draft is None:
                self.t_draft = per
            else:  # one slow call (a long prompt's first projection, a preempted core) is not the drafter's cost
                self.t_draft = (1 - self.time_ema) * self.t_draft + self.time_ema * min(per, CLIP * self.t_draft)

    def observe_model(self, rid: Hashable, accepted: int, expected: float | None = None) -> None:
        """After a model-drafted step: `accepted` drafts were accepted; `expected` is the
        confidence head's expectation for the verified positions (None: not known)."""
        a = float(accepted)
        if self.estimate == "confidence" and expected is not None:
            a = 0.5 * (a + float(expected))
        old = self._acc.get(rid, self.global_acc)
        self._acc[rid] = (1 - self.ema) * old + self.ema * a
        self.global_acc = (1 - self.ema / 4) * self.global_acc + (self.ema / 4) * a

    def forget(self, rid: Hashable) -> None:
        self._acc.pop(rid, None)
        self._skipped.pop(rid, None)
        self._interval.pop(rid, None)

    # ---- the decision (before drafting)
    def expected(self, rid: Hashable) -> float:
        return self._acc.get(rid, self.global_acc)

    def decide(self, rid: Hashable, t_token: float, t_extra: float) -> Decision:
        """Draft, probe or skip request rid this step. t_token: a plain step's seconds per
        request; t_extra: the verify seconds rid's block adds (both from the step-cost model)."""
        if self.t_draft is None:
            return "probe"  # the drafter not measured yet: draft, which measures
        cost = self.t_draft + max(0.0, t_extra)
        if self.expected(rid) * t_token >= cost:
            self._skipped.pop(rid, None)
            self._interval.pop(rid, None)
            return "draft"
        n = self._skipped.get(rid, 0) + 1
        interval = self._interval.get(rid, self.probe_every)
        if n >= interval:  # probe: refresh the estimate now and then, less often each time
            self._skipped[rid] = 0
            self._interval[rid] = min(2 * interval, self.max_probe_every)
            return "probe"
        self._skipped[rid] = n
        return "skip"


@torch.no_grad()
def time_drafter(drafter: Any, device: torch.device | str, context: int = 64, reps: int = 4) -> float:
    """Seconds of one steady-state drafter call for one request (median of the calls after a
    warm-up call): a context of `context` random target features, a greedy block. Warms the
    drafter's kernels too, so the first served step does not pay for that."""
    from sglang_ext.dspark.sampling import SamplingParams

    feat = drafter.fc.in_features
    gen = torch.Generator(device="cpu").manual_seed(0)
    ctx = drafter.new_context()
    hidden = torch.randn(context, feat, generator=gen).to(device=device, dtype=drafter.dtype)
    drafter.append_context(ctx, hidden, torch.arange(context, device=device))
    anchor = torch.tensor([1], device=device)
    pos = torch.tensor([context], device=device)
    sampling = SamplingParams.make(0.0, n=1, device=device)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        drafter.draft_block([ctx], anchor, pos, sampling)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])
