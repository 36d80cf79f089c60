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

What drafting costs (`cost`): with "block" a drafted request is priced at the drafter call and
its whole block's verify (t_extra), as if every draft were verified. With "draft" only the
drafter call is priced: the plan then cuts each model row's verify length from the
block's own calibrated confidences (Algorithm 1), so a block the head does not trust costs the
drafter call and little more. Replayed offline over every position of 135 held-out greedy
answers (benchmarks/gate_offline.py), the "block" rule skipped stretches that would have paid
(acceptance comes in runs: a request that met three empty blocks was probed every 8, 16, 32
steps and never drafted again) and gave 1.32x plain's tokens/s at batch 1; pricing the drafter
call only, with the block's expectation as the sample (`estimate="block"`), gave 1.43x, as much
as drafting every step, on every domain; and it no longer depends on the step-cost model's
estimate of a longer verify, which a server learns from its own mixed traffic. In the server
(docs/results.md, held-out prompts, two processes per system) it took model-only drafting from
0.94-1.02x plain's latency to 0.62x on code and math at one request; at 8 requests it cost
6-16 % of total throughput (the drafter call for every row is 15-20 % of a batch-8 step, and
verify positions there buy less), where "block" pricing held plain's. So "auto" (the profile's
default) prices by the step's batch: "draft" with the "block" estimate up to `cut_max_batch`
requests, "block" with the "confidence" estimate above. Every estimate is kept per request, so
the switch needs no relearning.

Lossless: the gate's decision for a step uses only earlier steps' outcomes and timings, never
the drafts of this step; skipping only means verifying nothing beyond the anchor, which is
plain decoding through the same forward.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Hashable, Literal

import torch

ESTIMATES = ("block", "confidence", "accepted")
CLIP = 3.0  # a drafter-time sample counts at most this many times the current estimate
Decision = Literal["draft", "probe", "skip"]


class DraftGate:
    def __init__(self, prior_accepted: float = 1.0, ema: float = 0.3, probe_every: int = 8,
                 time_ema: float = 0.2, max_probe_every: int = 64, t_draft: float | None = None,
                 estimate: Literal["block", "confidence", "accepted"] = "confidence",
                 cost: Literal["auto", "draft", "block"] = "block", cut_max_batch: int = 1) -> None:
        self.ema, self.time_ema = ema, time_ema
        self._estimate, self._cost, self.cut_max_batch = estimate, cost, int(cut_max_batch)
        self.batch = 1  # the step's batch size (begin_step): "auto" picks the pricing by it
        self.probe_every = int(probe_every)
        self.max_probe_every = max(int(max_probe_every), self.probe_every)
        self._interval: dict[Hashable, int] = {}
        # every estimate is kept (one EMA per kind), so "auto" can switch with the batch size
        self._global = {k: float(prior_accepted) for k in ESTIMATES}
        self._acc: dict[str, dict[Hashable, float]] = {k: {} for k in ESTIMATES}
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

    def observe_model(self, rid: Hashable, accepted: int, expected: float | None = None,
                      expected_block: float | None = None) -> None:
        """After a model-drafted step: `accepted` drafts were accepted; `expected` is the
        confidence head's expectation for the verified positions, `expected_block` for the
        whole block (None: not known)."""
        samples = {"accepted": float(accepted)}
        conf = samples["accepted"] if expected is None else 0.5 * (float(accepted) + float(expected))
        samples["confidence"] = conf
        samples["block"] = conf if expected_block is None else float(expected_block)
        for k, a in samples.items():
            old = self._acc[k].get(rid, self._global[k])
            self._acc[k][rid] = (1 - self.ema) * old + self.ema * a
            self._global[k] = (1 - self.ema / 4) * self._global[k] + (self.ema / 4) * a

    def forget(self, rid: Hashable) -> None:
        for acc in self._acc.values():
            acc.pop(rid, None)
        self._skipped.pop(rid, None)
        self._interval.pop(rid, None)

    # ---- the decision (before drafting)
    def begin_step(self, batch_size: int) -> None:
        self.batch = int(batch_size)

    @property
    def cost(self) -> str:
        """The pricing this step: "auto" is "draft" up to `cut_max_batch` requests, else "block"."""
        if self._cost != "auto":
            return self._cost
        return "draft" if self.batch <= self.cut_max_batch else "block"

    @property
    def estimate(self) -> str:
        if self._cost != "auto":
            return self._estimate
        return "block" if self.cost == "draft" else "confidence"

    @property
    def global_acc(self) -> float:
        return self._global[self.estimate]

    @property
    def cuts_verify(self) -> bool:
        """Whether a drafted row's verify length is left to the plan (cost "draft"): the batch
        width check must then not price the row's whole block."""
        return self.cost == "draft"

    def expected(self, rid: Hashable) -> float:
        return self._acc[self.estimate].get(rid, self.global_acc)

    def decide(self, rid: Hashable, t_token: float, t_extra: float) -> Decision:
        """Draft, probe or skip request rid this step. t_token: a plain step's seconds per
        request; t_extra: the verify seconds rid's block adds (both from the step-cost model)."""
        if self.t_draft is None:
            return "probe"  # the drafter not measured yet: draft, which measures
        cost = self.t_draft + (max(0.0, t_extra) if self.cost == "block" else 0.0)
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
