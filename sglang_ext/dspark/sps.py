"""SPS(B): target forward steps per second at a batch of B tokens.

Profiled once (short sweep over batch token counts), made monotone non-increasing by isotonic
regression (pool-adjacent-violators), linearly interpolated in between, extrapolated beyond the
largest measured B assuming cost grows linearly in B (conservative).  Cached as JSON keyed by
model id + machine fingerprint, so a server start-up reuses an earlier profile.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


def _isotonic_nonincreasing(y: Sequence[float], w: Optional[Sequence[float]] = None) -> list[float]:
    """Weighted PAVA for a non-increasing fit."""
    ws = [1.0] * len(y) if w is None else list(w)
    blocks: list[list[float]] = []  # [value, weight, count]
    for yi, wi in zip(y, ws):
        blocks.append([float(yi), float(wi), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            v2, w2, c2 = blocks.pop()
            v1, w1, c1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    out: list[float] = []
    for v, _, c in blocks:
        out.extend([v] * int(c))
    return out


def machine_fingerprint() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = "cpu"
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    return {"cpu": cpu, "ncpu": str(os.cpu_count()), "torch": torch.__version__, "device": dev}


def cache_key(model_id: str, fingerprint: Optional[dict[str, str]] = None) -> str:
    fp = fingerprint or machine_fingerprint()
    blob = json.dumps({"model": model_id, **fp}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class SPSTable:
    batch_sizes: list[int]
    measured: list[float]  # raw steps/s
    fitted: list[float] = field(default_factory=list)  # monotone non-increasing
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.batch_sizes) != len(self.measured) or not self.batch_sizes:
            raise ValueError("SPSTable needs equally long, non-empty batch_sizes and measured")
        order = sorted(range(len(self.batch_sizes)), key=lambda i: self.batch_sizes[i])
        self.batch_sizes = [int(self.batch_sizes[i]) for i in order]
        self.measured = [float(self.measured[i]) for i in order]
        if any(b < 1 for b in self.batch_sizes) or any(s <= 0 for s in self.measured):
            raise ValueError("SPSTable: batch sizes must be >= 1 and SPS > 0")
        self.fitted = _isotonic_nonincreasing(self.measured)

    @classmethod
    def flat(cls, sps: float = 1.0) -> "SPSTable":
        return cls([1], [sps])

    @classmethod
    def from_cost_model(cls, alpha: float, beta: float, batch_sizes: Sequence[int]) -> "SPSTable":
        """SPS(B) = 1 / (alpha + beta * B): handy for tests and as a prior."""
        return cls(list(batch_sizes), [1.0 / (alpha + beta * b) for b in batch_sizes])

    def __call__(self, b: int) -> float:
        bs, fs = self.batch_sizes, self.fitted
        if b <= bs[0]:
            return fs[0]
        if b >= bs[-1]:
            # beyond the sweep: time per step grows linearly with B (at best)
            return fs[-1] * bs[-1] / b if len(bs) > 1 else fs[-1]
        i = bisect.bisect_right(bs, b)
        b0, b1, f0, f1 = bs[i - 1], bs[i], fs[i - 1], fs[i]
        return f0 + (f1 - f0) * (b - b0) / (b1 - b0)

    # ---- persistence
    def to_dict(self) -> dict[str, object]:
        return {"batch_sizes": self.batch_sizes, "measured": self.measured,
                "fitted": self.fitted, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> "SPSTable":
        t = cls(list(d["batch_sizes"]), list(d["measured"]))  # type: ignore[arg-type]
        t.meta = dict(d.get("meta") or {})  # type: ignore[call-overload]
        return t

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "SPSTable":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
