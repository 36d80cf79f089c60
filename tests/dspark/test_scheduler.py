from __future__ import annotations

import itertools

import pytest
import torch

from sglang_ext.dspark.scheduler import (
    SchedulerInput, expected_throughput, schedule_algorithm1,
)
from sglang_ext.dspark.sps import SPSTable
from sglang_ext.dspark.verify import verify_block


def brute_force(conf: torch.Tensor, sps, max_len=None) -> float:
    r, g = conf.shape
    best = -1.0
    ranges = [range(0, (g if max_len is None else int(max_len[i])) + 1) for i in range(r)]
    for lens in itertools.product(*ranges):
        best = max(best, expected_throughput(conf, torch.tensor(lens), sps))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_algorithm1_matches_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    r, gamma = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    conf = torch.rand(r, gamma, generator=g) ** 0.3
    alpha = float(torch.rand(1, generator=g)) * 2 + 0.05
    beta = float(torch.rand(1, generator=g)) * 0.5 + 0.01
    sps = SPSTable.from_cost_model(alpha, beta, range(1, 40))  # smooth -> unimodal path
    lens = schedule_algorithm1(conf, sps)
    assert expected_throughput(conf, lens, sps) == pytest.approx(brute_force(conf, sps), rel=1e-9)
    # the no-early-stop search is the global optimum for ANY SPS (jagged too)
    jag = lambda b: [1.0, 0.9, 0.4, 0.39, 0.38, 0.2, 0.19, 0.18, 0.17, 0.1][min(b, 10) - 1] / (1 + 0.01 * b)
    full = schedule_algorithm1(conf, jag, early_stop=False)
    assert expected_throughput(conf, full, jag) == pytest.approx(brute_force(conf, jag), rel=1e-9)
    # prefix lengths within [0, gamma]
    assert ((lens >= 0) & (lens <= gamma)).all()


def test_max_min_len_and_weights() -> None:
    conf = torch.tensor([[0.9, 0.9, 0.9], [0.2, 0.2, 0.2]])
    sps = SPSTable.from_cost_model(1.0, 0.05, range(1, 20))
    base = schedule_algorithm1(conf, sps)
    capped = schedule_algorithm1(SchedulerInput(conf, max_len=torch.tensor([1, 3])), sps)
    assert capped[0] <= 1
    floored = schedule_algorithm1(SchedulerInput(conf, min_len=torch.tensor([0, 2])), sps)
    assert floored[1] >= 2
    heavy = schedule_algorithm1(SchedulerInput(conf, weight=torch.tensor([1.0, 20.0])), sps)
    assert heavy[1] >= base[1]


@pytest.mark.parametrize("seed", range(8))
def test_decisions_are_causal(seed: int) -> None:
    """Whether x_{r,j} is verified must not change when confidences at positions > j of that
    request change (those depend on x_{r,j} and later drafts)."""
    g = torch.Generator().manual_seed(seed)
    r, gamma = 3, 5
    conf = torch.rand(r, gamma, generator=g) ** 0.4
    sps = SPSTable.from_cost_model(0.5, 0.08, range(1, 64))
    for ri in range(r):
        for j in range(gamma):
            alt = conf.clone()
            alt[ri, j + 1:] = torch.rand(gamma - j - 1, generator=g)
            a, b = schedule_algorithm1(conf, sps), schedule_algorithm1(alt, sps)
            assert (a[ri] >= j + 1) == (b[ri] >= j + 1)


def _appendix_a_distribution(early_stop: bool, n: int = 40000) -> torch.Tensor:
    sps_tab = {1: 1.0, 2: 0.5, 3: 0.45}
    sps = lambda b: sps_tab[min(b, 3)]
    p_t = torch.tensor([0.7, 0.3])
    q = torch.tensor([0.5, 0.5])
    gen = torch.Generator().manual_seed(7)
    x1 = torch.multinomial(q, n, replacement=True, generator=gen)
    # c1 = 0.8 (pre-token); c2 depends on x1: 0.9 if A else 0
    c2 = torch.where(x1 == 0, 0.9, 0.0)
    conf = torch.stack([torch.full((n,), 0.8), c2], 1)
    lens = torch.stack([schedule_algorithm1(conf[i:i + 1], sps, early_stop=early_stop)
                        for i in (0, int((x1 == 1).nonzero()[0]))]).squeeze(1)
    lens_all = torch.where(x1 == 0, lens[0], lens[1])
    drafts = torch.stack([x1, torch.zeros_like(x1)], 1)  # x2 irrelevant for Y1
    p = p_t.expand(n, 3, 2).clone()
    res = verify_block(drafts, p, q.expand(n, 2, 2), lens_all, generator=gen)
    y1 = torch.tensor([t[0] for t in res.tokens])
    return torch.bincount(y1, minlength=2).double() / n


def test_appendix_a_counterexample() -> None:
    biased = _appendix_a_distribution(early_stop=False)
    assert biased[0] == pytest.approx(0.85, abs=0.01)
    ours = _appendix_a_distribution(early_stop=True)
    assert ours[0] == pytest.approx(0.7, abs=0.01)
