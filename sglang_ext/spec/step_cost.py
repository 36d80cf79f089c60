"""SPS(B) measured on the live target: every verify forward is timed at its real batch-token
count B, in the real engine, and folded into a monotone table (sglang_ext.dspark.sps.SPSTable).

A step's cost also grows with the context its queries attend to: on this CPU eight agents with
1k-token histories spend about 0.3 s of a 0.35 s step reading K/V, whatever B is. A table keyed
on B alone mixes steps of short chats with steps of long agent turns and then prices the extra
positions of a long-context step wrongly. So each step also records its K/V length (the sum of
the batch's sequence lengths) and the model is

    t(B, kv) = f(B) + c * kv

where c is fitted from the variation of kv among steps with the same B (a within-bucket
regression, so f may keep any shape in B) and f(B) is each bucket's mean time less c times its
mean kv. Decisions for one step compare B's at that step's kv.

A batch-token count seen too rarely for a point of its own (ragged verify steps take many B
values) is priced from the nearest measured B below plus s per extra token, s the slope of
(t - c kv) on B fitted over the recent steps (before there is one, the linear prior's). The
start-up shape alone (weight products: flat in B on an AMX CPU) called a 40-token verify step
as cheap as an 8-token one; a real one cost 1.8x.

This is the project's one step-cost model: the worker's plan (Algorithm 1, padding, the
pre-draft width check), the draft gate's verify costs, the load report's forward costs (and
through it admission and prefill pacing) all read it, and PRIOR_SLOPE is the one prior.

Until a bucket has enough samples the table falls back to a prior: the start-up measurement
(`measure_startup`: the target's own weight products timed at each batch-token count, a few
seconds at server start, logged), scaled to the measured steps once there are any; without it
a linear cost, slope PRIOR_SLOPE per token relative to a 1-token step (1/7 matches the
verify(8)/verify(1) ~ 2 measured for the bundled model in fp32 on a 2-core CPU). The table is
cached on disk per model, dtype and machine, so a restarted server starts from what it learned.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sglang_ext.dspark.sps import SPSTable, cache_key

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("AGENTSERVE_CACHE", Path.home() / ".cache" / "agentserve"))
OUTLIER = 3.0  # a sample above this many times a known bucket's estimate counts as this much
STALE = 2.5  # a cached bucket this far off this start's cost shape is dropped (_drop_stale)
PRIOR_SLOPE = 1 / 7  # t(B) = t(1) (1 + slope (B - 1)) where nothing is measured
CURVE_B = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 24, 32, 48, 64, 96, 128)  # batch-token counts reported and measured


def _weights(model: Any) -> list[torch.Tensor]:
    """The 2-D weights a decode step multiplies by (every linear layer and the LM head; the
    input embedding is a lookup, unless the LM head shares it)."""
    out, seen = [], set()
    for name, p in model.named_parameters():
        if p.dim() != 2 or id(p) in seen or ("embed" in name and getattr(model, "lm_head", None) is None):
            continue
        seen.add(id(p))
        out.append(p.detach())
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    if head is not None and id(head) not in seen:
        out.append(head.detach())
    return out


def measure_startup(model: Any, counts: tuple[int, ...] = CURVE_B, budget_s: float = 4.0,
                    reps: int = 2) -> dict[int, float]:
    """Seconds of the target's weight products for a forward of B tokens, B in `counts`
    (best of `reps`; stops early at `budget_s`). A CPU's GEMM kernels change with the row count,
    which is the shape a step-cost prior must have; attention is the K/V part of the model."""
    ws = _weights(model)
    if not ws:
        return {}
    out: dict[int, float] = {}
    with torch.no_grad():
        for w in ws:  # untimed: first calls pay for kernel selection and page faults
            torch.nn.functional.linear(torch.ones(1, w.shape[1], dtype=w.dtype, device=w.device), w)
        t_end = time.perf_counter() + budget_s
        for b in counts:
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                for w in ws:
                    torch.nn.functional.linear(torch.ones(b, w.shape[1], dtype=w.dtype, device=w.device), w)
                best = min(best, time.perf_counter() - t0)
            out[b] = best
            if time.perf_counter() > t_end:
                break
    return out


class StepCost:
    min_samples = 4
    rebuild_every = 16
    save_every = 128

    window = 512  # recent steps the K/V slope is fitted on

    def __init__(self, path: Path | None, prior_slope: float = PRIOR_SLOPE, ema: float = 0.1,
                 startup: Optional[dict[int, float]] = None):
        self.path = path
        self.prior_slope = prior_slope
        self.startup = dict(startup or {})  # measure_startup's seconds per B: the prior's shape
        self.ema = ema
        self.seconds: dict[int, float] = {}  # EMA of measured seconds per B (raw)
        self.kv: dict[int, float] = {}  # EMA of those steps' K/V lengths
        self.count: dict[int, int] = {}
        self.kv_slope = 0.0  # c: seconds per K/V token read, fitted
        self.token_slope: Optional[float] = None  # s: seconds per extra batch token, fitted (None: too little spread)
        self._recent: deque[tuple[int, float, float]] = deque(maxlen=self.window)
        self._n = 0
        self._lock = threading.Lock()
        self.table = self._prior()
        if path is not None and path.is_file():
            try:
                d = json.loads(path.read_text())
                self.seconds = {int(k): float(v) for k, v in d["seconds"].items()}
                self.count = {int(k): int(v) for k, v in d["count"].items()}
                self.kv = {int(k): float(v) for k, v in d.get("kv", {}).items()}
                self.kv_slope = max(0.0, float(d.get("kv_slope", 0.0)))
                ts = d.get("token_slope")
                self.token_slope = None if ts is None else max(0.0, float(ts))
                self._drop_stale()
                self._rebuild()
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable SPS cache %s: %s", path, e)

    def _drop_stale(self) -> None:
        """Forget cached buckets whose cost relative to the 1-token step disagrees with this
        start's shape (the start-up measurement; else the linear prior, more loosely) by more
        than STALE x either way. A bucket measured while another run stalled the machine (seen:
        B = 2 at 1.48 s beside B = 1 at 0.048 s) otherwise prices B as impossible; admission and
        planning then never run B again, and the estimate never heals. Real bumps (a CPU's
        matmul kernel changing with the row count) show in the start-up shape too, and stay."""
        s1 = self.seconds.get(1)
        if s1 is None or self.count.get(1, 0) < self.min_samples:
            return
        limit = STALE if len(self.startup) >= 4 and 1 in self.startup else 2 * STALE
        for b in [b for b in self.seconds if b > 1]:
            ratio = (self.seconds[b] / s1) / self.shape(b)
            if not 1 / limit <= ratio <= limit:
                log.info("step cost: dropping the cached bucket B=%d (%.3f s against %.3f s at B=1: %.1fx this "
                         "start's shape)", b, self.seconds[b], s1, ratio)
                for d in (self.seconds, self.count, self.kv):
                    d.pop(b, None)

    @classmethod
    def for_model(cls, model_id: str, dtype: str = "", startup: Optional[dict[int, float]] = None) -> StepCost:
        # dtype in the key: an fp32 server's costs are not a bf16 one's
        return cls(CACHE_DIR / f"sps-online-{cache_key(model_id + ('|' + dtype if dtype else ''))}.json",
                   startup=startup)

    def shape(self, b: int) -> float:
        """The prior's relative cost at B (1.0 at B = 1): the start-up measurement,
        interpolated, where there is one; else linear with PRIOR_SLOPE."""
        pts = self.startup
        if len(pts) >= 4 and 1 in pts:  # fewer points (a starved start-up) say too little
            xs = sorted(pts)
            if b <= xs[-1]:
                hi = next(x for x in xs if x >= b)
                lo = max((x for x in xs if x <= b), default=hi)
                t = pts[lo] if hi == lo else pts[lo] + (pts[hi] - pts[lo]) * (b - lo) / (hi - lo)
            else:  # past the measurement: linear in B from its last point
                t = pts[xs[-1]] * b / xs[-1]
            return max(1.0, t / pts[1])  # B tokens never cost less than one (noise aside)
        return 1 + self.prior_slope * (b - 1)

    def _prior(self, t1: Optional[float] = None) -> SPSTable:
        """SPS table of the prior, scaled so a 1-token step costs t1 (default: the start-up
        measurement's own seconds, else 1)."""
        if t1 is None:
            t1 = self.startup.get(1, 1.0)
        self._t1 = t1
        bs = sorted(set(CURVE_B) | set(self.startup))
        return SPSTable(bs, [1.0 / (t1 * self.shape(b)) for b in bs])

    def observe(self, b: int, seconds: float, kv: float = 0.0) -> None:
        """One forward of b batch tokens took `seconds`; its queries read `kv` K/V positions."""
        if b < 1 or seconds <= 0:
            return
        with self._lock:
            old = self.seconds.get(b)
            if old is not None and self.count.get(b, 0) >= self.min_samples:
                # a stall (another process, a page fault storm) is not what B costs: one step
                # moves a known bucket by at most a tenth of 3x its estimate
                seconds = min(seconds, OUTLIER * old)
            self.seconds[b] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds
            okv = self.kv.get(b)
            self.kv[b] = float(kv) if okv is None else (1 - self.ema) * okv + self.ema * float(kv)
            self._recent.append((b, float(kv), seconds))
            self.count[b] = self.count.get(b, 0) + 1
            self._n += 1
            if self._n % self.rebuild_every == 0:
                self._rebuild()
            if self._n % self.save_every == 0:
                self.save()

    def _fit_kv_slope(self) -> None:
        """c from steps of equal B: sum(dkv * dt) / sum(dkv^2) with each bucket's means
        removed, so f(B)'s shape does not leak into c. Kept as is when the recent steps'
        K/V lengths hardly vary (nothing to fit from)."""
        groups: dict[int, list[tuple[float, float]]] = {}
        for b, kv, t in self._recent:
            groups.setdefault(b, []).append((kv, t))
        sxy = sxx = 0.0
        for pts in groups.values():
            if len(pts) < 3:
                continue
            mk = sum(k for k, _ in pts) / len(pts)
            mt = sum(t for _, t in pts) / len(pts)
            sxy += sum((k - mk) * (t - mt) for k, t in pts)
            sxx += sum((k - mk) ** 2 for k, _ in pts)
        if sxx > 1e4:  # at least ~100 K/V tokens of spread, summed over steps
            self.kv_slope = max(0.0, sxy / sxx)

    def _fit_token_slope(self) -> None:
        """s from the recent steps: the least-squares slope of (t - c kv) on B. Verify steps at
        B values seen too rarely for a point of their own are priced from the nearest measured
        B below plus s per extra token. Without it they fell back to the start-up shape, which
        times the weight products only: on an AMX CPU those are flat in B while a real verify
        step grew ~5 ms per extra position (chat at 8 clients verified 40-token steps the shape
        priced like 8-token ones, and lost 40 % of throughput)."""
        pts = [(b, t - self.kv_slope * kv) for b, kv, t in self._recent]
        if len(pts) < 2 * self.min_samples:
            return
        mb = sum(b for b, _ in pts) / len(pts)
        mt = sum(t for _, t in pts) / len(pts)
        sxx = sum((b - mb) ** 2 for b, _ in pts)
        if sxx < 4.0 * len(pts):  # B hardly varies (one batch size, no verify): nothing to fit
            return
        self.token_slope = max(0.0, sum((b - mb) * (t - mt) for b, t in pts) / sxx)

    def _base(self, b: int) -> float:
        """f(B): the measured seconds at B less the K/V part at those steps' mean K/V length
        (never below a fifth of the measurement: c is an estimate)."""
        raw = self.seconds[b]
        return max(0.2 * raw, raw - self.kv_slope * self.kv.get(b, 0.0))

    def _rebuild(self) -> None:
        self._fit_kv_slope()
        self._fit_token_slope()
        good = sorted(b for b, c in self.count.items() if c >= self.min_samples)
        if not good:
            return
        # Scale the prior to the measured 1-token (or smallest) step so unmeasured B stay comparable.
        b0 = good[0]
        t1 = self._base(b0) / self.shape(b0)
        prior = self._prior(t1)
        pts = {b: 1.0 / self._base(b) for b in good}
        for b in prior.batch_sizes:
            if b > good[-1]:
                pts.setdefault(b, prior(b))
        self.table = SPSTable(sorted(pts), [pts[b] for b in sorted(pts)], meta={"measured": good})

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"seconds": self.seconds, "count": self.count, "kv": self.kv,
                                       "kv_slope": self.kv_slope, "token_slope": self.token_slope}))
            tmp.replace(self.path)
        except OSError as e:
            log.warning("could not save SPS cache %s: %s", self.path, e)

    def __call__(self, b: int) -> float:
        """Batch tokens per second at B, K/V part left out (f(B) only)."""
        return self.table(b)

    def at(self, kv: float) -> Callable[[int], float]:
        """SPS(B) for a step whose queries read `kv` K/V positions (what Algorithm 1 takes)."""
        return lambda b: 1.0 / self.step_seconds(b, kv)

    def step_seconds(self, b: int, kv: float = 0.0) -> float:
        """Seconds of one forward at B batch tokens reading `kv` K/V positions: f(B) + c kv,
        with f the measured point where B has enough samples, else the monotone table. Unlike
        the table, measured points keep their shape: on a CPU without native bf16, 2 tokens
        can cost more than 4 or 8 (the matmul kernel changes with the row count), which the
        isotonic fit would average away."""
        with self._lock:
            extra = self.kv_slope * float(kv)
            if self.count.get(b, 0) >= self.min_samples:
                return self._base(b) + extra
            good = [k for k, c in self.count.items() if c >= self.min_samples]
            below = max((k for k in good if k < b), default=0)
            if below:
                # the nearest measured B below, plus the cost per extra token: fitted, else the
                # linear prior's (a cold server verified 7-position rows at 8 clients before it had
                # fitted one), never less than the start-up shape's (the weight products alone);
                # a measured B above that is cheaper still wins where callers look for the
                # cheapest count (padding)
                slope = self.token_slope if self.token_slope is not None else self.prior_slope * self._t1
                shape_step = self._t1 * max(0.0, self.shape(b) - self.shape(below)) if self.startup else 0.0
                return self._base(below) + max(slope * (b - below), shape_step) + extra
            top = max(good, default=0)
        if self.startup and b > top:  # the start-up shape, bumps kept (the table would smooth them)
            return self._t1 * self.shape(b) + extra
        return 1.0 / self.table(b) + extra

    def curve(self) -> dict[int, float]:
        """Forward seconds at each batch-token count of CURVE_B: measured (K/V part included)
        where enough samples exist, else the table (measured steps and the prior). What the
        load report carries, so the HTTP side needs no cost prior of its own."""
        got = self.measured()
        return {b: got[b] if b in got else self.step_seconds(b) for b in CURVE_B}

    def measured(self) -> dict[int, float]:
        """Forward seconds per batch-token count as measured (K/V part included), where enough
        samples exist."""
        with self._lock:
            return {b: s for b, s in self.seconds.items() if self.count.get(b, 0) >= self.min_samples}

    def _cheapest(self, counts: range, scale: int = 1, kv: float = 0.0) -> tuple[int, float]:
        """(c, seconds): the first c in `counts` whose forward over c x scale tokens is cheapest."""
        best_c, best_t = counts[0], self.step_seconds(counts[0] * scale, kv)
        for c in counts[1:]:
            t = self.step_seconds(c * scale, kv)
            if t < best_t:
                best_c, best_t = c, t
        return best_c, best_t

    def cheapest_tokens(self, tokens: int, max_tokens: int, kv: float = 0.0) -> tuple[int, float]:
        """(T, seconds): the batch-token count T in [tokens, max_tokens] whose forward is
        cheapest (a ragged step may verify more positions where that costs less)."""
        return self._cheapest(range(tokens, max(tokens, max_tokens) + 1), kv=kv)

    def cheapest_width(self, bs: int, width: int, max_width: int, kv: float = 0.0) -> tuple[int, float]:
        """(W, seconds): the verify width W in [width, max_width] whose forward over bs x W
        tokens is cheapest. A step that needs `width` positions may run wider, padded: the
        extra positions are never verified, so the result is the same and only the cost moves."""
        return self._cheapest(range(width, max(width, max_width) + 1), scale=bs, kv=kv)
