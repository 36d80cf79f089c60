"""Sequential Temperature Scaling (STS) of the confidence head.

c_k = sigmoid(z_k) models P(x_k survives | x_<k survived), so the prefix survival estimate is
prod_{i<=k} c_i.  Left to right, T_k is chosen on a grid to minimise the ECE of
prod_{i<k} sigmoid(z_i/T_i) * sigmoid(z_k/T) against the observed prefix survival
(1 if drafts 1..k were all accepted), keeping T_<k fixed.  Scaling a logit by a positive
temperature is order preserving.  Calibration depends on the sampling temperature, so
temperatures are stored per sampling-temperature bucket ("0.0", "1.0", ...).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

DEFAULT_GRID = torch.cat([torch.logspace(-1.5, 1.5, 241, dtype=torch.float64), torch.ones(1, dtype=torch.float64)])


def expected_calibration_error(pred: torch.Tensor, obs: torch.Tensor, n_bins: int = 15) -> float:
    """Equal-width-bin ECE: sum_b |mean(pred_b) - mean(obs_b)| * n_b / N."""
    pred = pred.double().reshape(-1)
    obs = obs.double().reshape(-1)
    n = pred.numel()
    if n == 0:
        return 0.0
    idx = (pred * n_bins).long().clamp(0, n_bins - 1)
    cnt = torch.bincount(idx, minlength=n_bins).double()
    sp = torch.bincount(idx, weights=pred, minlength=n_bins)
    so = torch.bincount(idx, weights=obs, minlength=n_bins)
    return float((sp - so).abs().sum() / n)


def prefix_survival_observed(accept_len: torch.Tensor, gamma: int) -> torch.Tensor:
    """accept_len [N] (drafts accepted, full block verified) -> survived [N, gamma] bool."""
    return torch.arange(1, gamma + 1)[None, :] <= accept_len.reshape(-1, 1).cpu()


def _to_logits(conf: torch.Tensor, is_logit: bool) -> torch.Tensor:
    if is_logit:
        return conf.double()
    c = conf.double().clamp(1e-7, 1 - 1e-7)
    return torch.log(c) - torch.log1p(-c)


def fit_sts(
    conf: torch.Tensor,
    survived: torch.Tensor,
    is_logit: bool = True,
    grid: Optional[torch.Tensor] = None,
    n_bins: int = 15,
    objective: str = "ece",
    min_reached: int = 50,
) -> tuple[list[float], list[float], list[float]]:
    """conf [N, g] raw confidence logits (or probabilities with is_logit=False); survived
    [N, g] observed prefix survival.  Returns (temperatures, ece_before, ece_after) per position
    (ECE of the cumulative product).  `objective` is what T_k minimises: "ece" (the paper's;
    fine with thousands of blocks) or "nll", the log-loss of the cumulative product, a proper
    score that does not chase the bin noise of a few hundred blocks (ECE fitted on 240 blocks
    drove late positions' T to the grid's end and raised held-out ECE).  A position that fewer
    than `min_reached` blocks reached (all earlier drafts accepted) keeps the previous T."""
    if objective not in ("ece", "nll"):
        raise ValueError(f"objective: 'ece' or 'nll', not {objective!r}")
    z = _to_logits(conf, is_logit).cpu()
    s = survived.double().cpu()
    grid = DEFAULT_GRID if grid is None else grid.double()
    n, g = z.shape
    temps: list[float] = []
    before: list[float] = []
    after: list[float] = []
    cum_raw = torch.ones(n, dtype=torch.float64)
    cum_cal = torch.ones(n, dtype=torch.float64)
    for k in range(g):
        cum_raw = cum_raw * torch.sigmoid(z[:, k])
        before.append(expected_calibration_error(cum_raw, s[:, k], n_bins))
        reached = n if k == 0 else int(s[:, k - 1].sum())
        best_t, best_e = 1.0, float("inf")
        if reached < min_reached and temps:
            # too few blocks got here to say anything: the previous position's temperature
            # (fitted alone, such a position went to the grid's end and raised held-out ECE)
            temps.append(temps[-1])
            cum_cal = cum_cal * torch.sigmoid(z[:, k] / temps[-1])
            after.append(expected_calibration_error(cum_cal, s[:, k], n_bins))
            continue
        for t in grid.tolist():
            p = cum_cal * torch.sigmoid(z[:, k] / t)
            if objective == "ece":
                e = expected_calibration_error(p, s[:, k], n_bins)
            else:
                p = p.clamp(1e-9, 1 - 1e-9)
                e = float(-(s[:, k] * p.log() + (1 - s[:, k]) * (-p).log1p()).mean())
            # prefer the temperature closest to 1 among (numerically) equal errors
            if e < best_e - 1e-12 or (abs(e - best_e) <= 1e-12 and abs(t - 1.0) < abs(best_t - 1.0)):
                best_t, best_e = t, e
        temps.append(best_t)
        cum_cal = cum_cal * torch.sigmoid(z[:, k] / best_t)
        after.append(expected_calibration_error(cum_cal, s[:, k], n_bins))
    return temps, before, after


BIAS_GRID = torch.linspace(-3.0, 3.0, 121, dtype=torch.float64)


def fit_sts_bias(conf: torch.Tensor, survived: torch.Tensor, min_reached: int = 50,
                 grid: Optional[torch.Tensor] = None) -> tuple[list[float], list[float]]:
    """STS with a shift: c_k = sigmoid(z_k / T_k + b_k), (T_k, b_k) left to right minimising the
    log-loss of the cumulative product (a temperature alone cannot move a head whose logits
    are about right in scale but off in level; measured on the shipped drafter, position 1 was
    8 % off at T = 0 with a fitted T of 0.9). Still order preserving per position. Positions
    reached by fewer than `min_reached` blocks keep the previous (T, b). Returns (T, b)."""
    z = conf.double().cpu()
    s = survived.double().cpu()
    grid = DEFAULT_GRID if grid is None else grid.double()
    n, g = z.shape
    temps: list[float] = []
    biases: list[float] = []
    cum = torch.ones(n, dtype=torch.float64)
    for k in range(g):
        reached = n if k == 0 else int(s[:, k - 1].sum())
        if reached < min_reached and temps:
            temps.append(temps[-1])
            biases.append(biases[-1])
        else:
            best = (float("inf"), 1.0, 0.0)
            for t in grid.tolist():
                p = (cum[:, None] * torch.sigmoid(z[:, k, None] / t + BIAS_GRID[None, :])).clamp(1e-9, 1 - 1e-9)
                y = s[:, k, None]
                loss = -(y * p.log() + (1 - y) * (-p).log1p()).mean(0)  # [len(BIAS_GRID)]
                j = int(loss.argmin())
                if float(loss[j]) < best[0] - 1e-12:
                    best = (float(loss[j]), t, float(BIAS_GRID[j]))
            temps.append(best[1])
            biases.append(best[2])
        cum = cum * torch.sigmoid(z[:, k] / temps[-1] + biases[-1])
    return temps, biases


def bucket_key(temperature: float) -> str:
    return f"{float(temperature):.1f}"


@dataclass
class STSCalibration:
    """Per-sampling-temperature-bucket temperatures T_1..T_g."""

    buckets: dict[str, list[float]] = field(default_factory=dict)
    stats: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    biases: dict[str, list[float]] = field(default_factory=dict)  # per bucket b_k (fit_sts_bias); none: 0

    def fit(self, sampling_temperature: float, conf_logits: torch.Tensor, survived: torch.Tensor,
            objective: str = "ece") -> dict[str, list[float]]:
        temps, before, after = fit_sts(conf_logits, survived, is_logit=True, objective=objective)
        key = bucket_key(sampling_temperature)
        self.buckets[key] = temps
        self.stats[key] = {"ece_before": before, "ece_after": after}
        return self.stats[key]

    def _nearest(self, sampling_temperature: float) -> str:
        return min(self.buckets, key=lambda k: (abs(float(k) - float(sampling_temperature)), float(k)))

    @staticmethod
    def _padded(values: list[float], gamma: int) -> torch.Tensor:
        return torch.tensor((values + [values[-1]] * gamma)[:gamma], dtype=torch.float64)  # the block size may grow

    def temperatures_for(self, sampling_temperature: float, gamma: int) -> torch.Tensor:
        if not self.buckets:
            return torch.ones(gamma, dtype=torch.float64)
        return self._padded(list(self.buckets[self._nearest(sampling_temperature)]), gamma)

    def apply_logits(self, conf_logits: torch.Tensor, sampling_temperatures: torch.Tensor | Sequence[float] | float) -> torch.Tensor:
        """conf_logits [R, g] -> calibrated c [R, g] (float32)."""
        r, g = conf_logits.shape
        if isinstance(sampling_temperatures, (int, float)):
            temps_in = [float(sampling_temperatures)] * r
        else:
            temps_in = [float(x) for x in torch.as_tensor(sampling_temperatures).reshape(-1).tolist()]
        cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        rows, shifts = [], []
        for t in temps_in:
            k = bucket_key(t)
            if k not in cache:
                cache[k] = (self.temperatures_for(t, g), self.biases_for(t, g))
            rows.append(cache[k][0])
            shifts.append(cache[k][1])
        tt = torch.stack(rows).to(conf_logits.device, torch.float32)
        bb = torch.stack(shifts).to(conf_logits.device, torch.float32)
        return torch.sigmoid(conf_logits.float() / tt + bb)

    def biases_for(self, sampling_temperature: float, gamma: int) -> torch.Tensor:
        """b_1..b_g of the bucket temperatures_for picks (zeros where it has none)."""
        if not self.buckets:
            return torch.zeros(gamma, dtype=torch.float64)
        return self._padded(list(self.biases.get(self._nearest(sampling_temperature)) or [0.0]), gamma)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"format": "dspark-sts-v1", "buckets": self.buckets, "stats": self.stats}
        if self.biases:
            out["biases"] = self.biases
        return out

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "STSCalibration":
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("format") != "dspark-sts-v1" or not isinstance(d.get("buckets"), dict):
            raise ValueError(f"{path}: not a dspark-sts-v1 calibration file (field 'format'/'buckets')")
        buckets = {str(k): [float(x) for x in v] for k, v in d["buckets"].items()}
        for k, v in buckets.items():
            if not v or any(x <= 0 for x in v):
                raise ValueError(f"{path}: bucket {k!r} must hold positive temperatures")
        biases = {str(k): [float(x) for x in v] for k, v in (d.get("biases") or {}).items()}
        for k, v in biases.items():
            if k not in buckets or len(v) != len(buckets[k]):
                raise ValueError(f"{path}: field 'biases' bucket {k!r} must match a 'buckets' entry in length")
        return cls(buckets=buckets, stats=d.get("stats") or {}, biases=biases)
