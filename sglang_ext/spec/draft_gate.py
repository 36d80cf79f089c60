"""Cost-aware gate for model drafting: draft with the DSpark model only where it pays.

On a small machine the drafter is not free: a block costs t_draft (its backbone and the LM
head over the whole vocabulary), and verifying W positions costs more than verifying one.
For a request whose model drafts are rarely accepted (chat, math on a weak drafter) the step
is slower than plain decoding. The gate skips model drafting for request r this step when

    E_r * t_1  <  t_draft + t_verify(W) - t_1

i.e. the expected accepted model drafts E_r (an EMA of *actual* accepted counts on r's
earlier model-drafted steps, starting from the server-wide EMA) buy less time than drafting
and the wider verify cost; t_1 is the time of a one-position step, t_verify(W) and t_draft
are EMAs of measured step phases. A skipped request drafts anyway after `probe_every` skipped
steps, so E_r follows the text (a tool call after chat prose); each probe that still does not
pay doubles that request's interval, up to `max_probe_every` (a probe is not free: the first
one also projects the whole prompt into the drafter's context). Copy drafts are not gated:
they cost nothing to propose.

Lossless: the gate's decision for a step uses only earlier steps' outcomes and timings, never
the drafts of this step; skipping only means verifying nothing beyond the anchor, which is
plain decoding through the same forward.
"""

from __future__ import annotations

from typing import Hashable

from sglang_ext.spec.step_cost import PRIOR_SLOPE


class DraftGate:
    def __init__(self, prior_accepted: float = 1.0, ema: float = 0.3, probe_every: int = 8,
                 time_ema: float = 0.2, prior_slope: float = PRIOR_SLOPE, max_probe_every: int = 64) -> None:
        self.prior_slope = prior_slope  # t(W) = t(1) * (1 + slope (W-1)) until t(1) is measured (step_cost's prior)
        self.ema, self.time_ema = ema, time_ema
        self.probe_every = int(probe_every)
        self.max_probe_every = max(int(max_probe_every), self.probe_every)
        self._interval: dict[Hashable, int] = {}
        self.global_acc = float(prior_accepted)
        self._acc: dict[Hashable, float] = {}
        self._skipped: dict[Hashable, int] = {}
        self.t_one: float | None = None  # seconds of a verify step of width 1, per request
        self.t_wide: float | None = None  # seconds per request of a wider verify step
        self.w_wide: float | None = None  # the mean width of those steps
        self.t_draft: float | None = None  # seconds of a drafter call, per drafted request

    # ---- measurements (after each step)
    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.time_ema) * old + self.time_ema * new

    def observe_times(self, width: int, rows: int, verify_s: float, drafted_rows: int, draft_s: float) -> None:
        if rows <= 0:
            return
        per = verify_s / rows
        if width == 1:
            self.t_one = self._mix(self.t_one, per)
        else:
            self.t_wide = self._mix(self.t_wide, per)
            self.w_wide = self._mix(self.w_wide, float(width))
        if drafted_rows > 0:
            self.t_draft = self._mix(self.t_draft, draft_s / drafted_rows)

    def observe_model(self, rid: Hashable, accepted: int) -> None:
        a = float(accepted)
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

    def pays(self, rid: Hashable) -> bool:
        """Should request rid get a model draft this step?"""
        wide = self.t_wide
        if self.t_draft is None or wide is None or self.w_wide is None:
            return True  # no measurements yet: draft, which measures
        t_one = self.t_one if self.t_one is not None else wide / (1 + self.prior_slope * (self.w_wide - 1))
        cost = self.t_draft + max(0.0, wide - t_one)
        if self.expected(rid) * t_one >= cost:
            self._skipped.pop(rid, None)
            self._interval.pop(rid, None)
            return True
        n = self._skipped.get(rid, 0) + 1
        interval = self._interval.get(rid, self.probe_every)
        if n >= interval:  # probe: refresh the estimate now and then, less often each time
            self._skipped[rid] = 0
            self._interval[rid] = min(2 * interval, self.max_probe_every)
            return True
        self._skipped[rid] = n
        return False
