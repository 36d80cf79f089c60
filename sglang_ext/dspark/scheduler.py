"""Hardware-aware prefix scheduler (paper Algorithm 1).

Objective: choose verify lengths l_r in [0, g] maximising Theta = tau * SPS(B) with
B = sum_r (1 + l_r) and tau = sum_r (1 + sum_{j<=l_r} a_{r,j}), a_{r,j} = prod_{i<=j} c_{r,i}.

Causality (what keeps verification lossless): c_{r,j} may depend on x_{r,j-1}, so the decision
"x_{r,j} is verified" may only look at a_{r,<=j}.  Algorithm 1 guarantees this by admitting
candidates in descending a and stopping at the first non-improving one.  (The paper's
asynchronous variant, a budget from two-step-old confidences, is not here: SGLang's CPU
scheduler runs without overlap, so the confidences of the step are always at hand.)

Tier-aware extension point: ``SchedulerInput`` carries optional per-request ``weight``
(multiplies that request's expected accepted drafts in tau), ``min_len`` (forced floor,
admitted up front: token-independent) and ``max_len`` (cap).  They must be constant within a
block, which keeps the causality argument intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

SPSFn = Callable[[int], float]


@dataclass
class SchedulerInput:
    confidences: torch.Tensor  # [R, g] conditional survival c_{r,k} (calibrated)
    weight: Optional[torch.Tensor] = None  # [R] >= 0, default 1
    min_len: Optional[torch.Tensor] = None  # [R] forced floor, default 0
    max_len: Optional[torch.Tensor] = None  # [R] cap, default g

    def resolved(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.confidences.detach().double().cpu().clamp(0.0, 1.0)
        r, g = c.shape
        w = torch.ones(r, dtype=torch.float64) if self.weight is None else self.weight.double().cpu()
        lo = torch.zeros(r, dtype=torch.long) if self.min_len is None else self.min_len.long().cpu().clamp(0, g)
        hi = torch.full((r,), g, dtype=torch.long) if self.max_len is None else self.max_len.long().cpu().clamp(0, g)
        lo = torch.minimum(lo, hi)
        return c, w, lo, hi


def prefix_survival(conf: torch.Tensor) -> torch.Tensor:
    """a_{r,j} = prod_{i<=j} c_{r,i}."""
    return torch.cumprod(conf.double().clamp(0.0, 1.0), dim=-1)


def _candidates(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> list[tuple[float, int, int]]:
    """Admissible (a, j, r) with lo_r < j <= hi_r and a > 0, sorted by a desc, then j, then r."""
    r, g = a.shape
    out = []
    al = a.tolist()
    for ri in range(r):
        for j in range(int(lo[ri]) + 1, int(hi[ri]) + 1):
            v = al[ri][j - 1]
            if v > 0:
                out.append((v, j, ri))
    out.sort(key=lambda t: (-t[0], t[1], t[2]))
    return out


def _base_state(a: torch.Tensor, w: torch.Tensor, lo: torch.Tensor) -> tuple[int, float]:
    r = a.shape[0]
    b = r + int(lo.sum())
    tau = float(r)
    for ri in range(r):
        if int(lo[ri]) > 0:
            tau += float(w[ri]) * float(a[ri, : int(lo[ri])].sum())
    return b, tau


def schedule_algorithm1(inp: SchedulerInput | torch.Tensor, sps: SPSFn, early_stop: bool = True) -> torch.Tensor:
    """Paper Algorithm 1.  Returns l [R] (long).  ``early_stop=False`` is the retrospective
    global search over the same greedy path (NOT lossless when c depends on drafted tokens;
    kept for the Appendix A demonstration and for the async budget, where it is causal)."""
    if isinstance(inp, torch.Tensor):
        inp = SchedulerInput(inp)
    c, w, lo, hi = inp.resolved()
    a = prefix_survival(c)
    r = a.shape[0]
    lens = lo.clone()
    best_lens = lens.clone()
    b, tau = _base_state(a, w, lo)
    best = tau * sps(b)
    for v, j, ri in _candidates(a, lo, hi):
        lens[ri] = j
        b += 1
        tau += float(w[ri]) * v
        theta = tau * sps(b)
        if theta > best:
            best = theta
            best_lens = lens.clone()
        elif early_stop:
            break
    return best_lens


def expected_throughput(conf: torch.Tensor, lens: torch.Tensor, sps: SPSFn,
                        weight: Optional[torch.Tensor] = None) -> float:
    """Theta = tau * SPS(B) for given lengths (used by brute-force tests and diagnostics)."""
    a = prefix_survival(conf)
    r = a.shape[0]
    w = torch.ones(r, dtype=torch.float64) if weight is None else weight.double()
    tau = float(r)
    b = r
    for ri in range(r):
        l = int(lens[ri])
        b += l
        tau += float(w[ri]) * float(a[ri, :l].sum())
    return tau * sps(b)
