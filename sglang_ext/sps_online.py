"""SPS(B) measured on the live target: every verify forward is timed at its real batch-token
count B, in the real engine, and folded into a monotone table (sglang_ext.dspark.sps.SPSTable).

Until a bucket has enough samples the table falls back to a prior cost model (time grows
linearly in B with slope `prior_slope` per token relative to a 1-token step; 1/7 matches the
verify(8)/verify(1) ≈ 2 measured for the bundled model in fp32 on this CPU). The table is cached
on disk per model and machine, so a restarted server starts from what it learned.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from sglang_ext.dspark.sps import SPSTable, cache_key

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("AGENTSERVE_CACHE", Path.home() / ".cache" / "agentserve"))


class OnlineSPS:
    min_samples = 4
    rebuild_every = 16
    save_every = 128

    def __init__(self, path: Path | None, prior_slope: float = 1 / 7, ema: float = 0.1):
        self.path = path
        self.prior_slope = prior_slope
        self.ema = ema
        self.seconds: dict[int, float] = {}
        self.count: dict[int, int] = {}
        self._n = 0
        self._lock = threading.Lock()
        self.table = self._prior()
        if path is not None and path.is_file():
            try:
                d = json.loads(path.read_text())
                self.seconds = {int(k): float(v) for k, v in d["seconds"].items()}
                self.count = {int(k): int(v) for k, v in d["count"].items()}
                self._rebuild()
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable SPS cache %s: %s", path, e)

    @classmethod
    def for_model(cls, model_id: str) -> OnlineSPS:
        return cls(CACHE_DIR / f"sps-online-{cache_key(model_id)}.json")

    def _prior(self, t1: float = 1.0) -> SPSTable:
        bs = [1, 2, 4, 8, 16, 32, 64, 128]
        return SPSTable(bs, [1.0 / (t1 * (1 + self.prior_slope * (b - 1))) for b in bs])

    def observe(self, b: int, seconds: float) -> None:
        if b < 1 or seconds <= 0:
            return
        with self._lock:
            old = self.seconds.get(b)
            self.seconds[b] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds
            self.count[b] = self.count.get(b, 0) + 1
            self._n += 1
            if self._n % self.rebuild_every == 0:
                self._rebuild()
            if self._n % self.save_every == 0:
                self.save()

    def _rebuild(self) -> None:
        good = sorted(b for b, c in self.count.items() if c >= self.min_samples)
        if not good:
            return
        # Scale the prior to the measured 1-token (or smallest) step so unmeasured B stay comparable.
        b0 = good[0]
        t1 = self.seconds[b0] / (1 + self.prior_slope * (b0 - 1))
        prior = self._prior(t1)
        pts = {b: 1.0 / self.seconds[b] for b in good}
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
            tmp.write_text(json.dumps({"seconds": self.seconds, "count": self.count}))
            tmp.replace(self.path)
        except OSError as e:
            log.warning("could not save SPS cache %s: %s", self.path, e)

    def __call__(self, b: int) -> float:
        return self.table(b)

    def step_seconds(self, b: int) -> float:
        """Seconds of one forward at B batch tokens: the measured average where B has enough
        samples, else the monotone table. Unlike the table, measured points keep their shape:
        on a CPU without native bf16, 2 tokens can cost more than 4 or 8 (the matmul kernel
        changes with the row count), which the isotonic fit would average away."""
        with self._lock:
            if self.count.get(b, 0) >= self.min_samples:
                return self.seconds[b]
        return 1.0 / self.table(b)

    def measured(self) -> dict[int, float]:
        """Forward seconds per batch-token count, where enough samples exist."""
        with self._lock:
            return {b: s for b, s in self.seconds.items() if self.count.get(b, 0) >= self.min_samples}

    def _cheapest(self, counts: range, scale: int = 1) -> tuple[int, float]:
        """(c, seconds): the first c in `counts` whose forward over c x scale tokens is cheapest."""
        best_c, best_t = counts[0], self.step_seconds(counts[0] * scale)
        for c in counts[1:]:
            t = self.step_seconds(c * scale)
            if t < best_t:
                best_c, best_t = c, t
        return best_c, best_t

    def cheapest_tokens(self, tokens: int, max_tokens: int) -> tuple[int, float]:
        """(T, seconds): the batch-token count T in [tokens, max_tokens] whose forward is
        cheapest (a ragged step may verify more positions where that costs less)."""
        return self._cheapest(range(tokens, max(tokens, max_tokens) + 1))

    def cheapest_width(self, bs: int, width: int, max_width: int) -> tuple[int, float]:
        """(W, seconds): the verify width W in [width, max_width] whose forward over bs x W
        tokens is cheapest. A step that needs `width` positions may run wider, padded: the
        extra positions are never verified, so the result is the same and only the cost moves."""
        return self._cheapest(range(width, max(width, max_width) + 1), scale=bs)
