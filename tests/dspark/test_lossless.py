"""Losslessness of the full draft -> schedule -> verify loop on a toy Markov target (V=8)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import pytest
import torch

from sglang_ext.dspark.sampling import SamplingParams, process_logits, sample_block_sequential
from sglang_ext.dspark.scheduler import schedule_algorithm1
from sglang_ext.dspark.sps import SPSTable
from sglang_ext.dspark.verify import verify_block

V, G = 8, 4


def chi2_sf_ok(obs: torch.Tensor, expected_p: torch.Tensor, alpha_stat: float) -> tuple[float, float]:
    """Return (chi2, critical value) with a Wilson-Hilferty approx of the chi2 quantile."""
    n = obs.sum().item()
    mask = expected_p > 0
    e = expected_p[mask] * n
    chi2 = float(((obs[mask] - e) ** 2 / e).sum())
    assert float(obs[~mask].sum()) == 0.0, "mass on a zero-probability outcome"
    df = int(mask.sum()) - 1
    z = 3.719  # ~ 1e-4 one-sided
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return chi2, crit


class ToyWorld:
    """Target: first-order Markov chain T[prev] -> logits.  Drafter: semi-AR with a Markov
    bias and a confidence that depends on the previous draft token (the Appendix A hazard)."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.t_logits = torch.randn(V, V, generator=g) * 1.5
        self.u = torch.randn(G, V, generator=g)  # base draft logits per slot
        self.b = torch.randn(V, V, generator=g)  # Markov bias
        self.conf_w = torch.randn(V, generator=g) * 2  # confidence depends on prev token
        self.conf_b = torch.randn(G, generator=g)

    def target_probs(self, prev: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        return process_logits(self.t_logits[prev], params)

    def exact_joint(self, start: int, params: SamplingParams, n: int) -> torch.Tensor:
        """Exact distribution of the first n tokens (flattened, V**n cells) of one request."""
        row = SamplingParams(params.temperature[:1].repeat(V), params.top_p[:1].repeat(V),
                             params.top_k[:1].repeat(V))
        p = process_logits(self.t_logits, row)  # [V, V]: next-token dist given prev
        out = p[start]
        for _ in range(n - 1):
            # last token of the flattened prefix index is (index % V)
            out = (out.reshape(-1, 1) * p[torch.arange(out.numel()) % V]).reshape(-1)
        return out


def run_loop(world: ToyWorld, params: SamplingParams, n_tokens: int, start: int, *,
             deterministic: bool, scheduler: str, batch: int, gen: torch.Generator,
             token_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Generate n_tokens for every request; returns tokens [R, n_tokens].  With `token_map` the
    drafter is truncated (FR-Spec): it drafts only those tokens, q = 0 elsewhere."""
    r = len(params)
    out = [[] for _ in range(r)]
    last = torch.full((r,), start, dtype=torch.long)
    sps = SPSTable.from_cost_model(1.0, 0.15, range(1, 64))
    while min(len(o) for o in out) < n_tokens:
        if deterministic:
            # copy-style proposals: fixed token pattern, q is one-hot (p_d one-hot)
            toks = (last[:, None] + torch.arange(1, G + 1)[None, :]) % V
            q = None
            prev = torch.cat([last[:, None], toks[:, :-1]], 1)
        else:
            tm = torch.arange(V) if token_map is None else token_map
            base = world.u[None, :, tm].expand(r, G, len(tm))
            blk = sample_block_sequential(base, torch.zeros(r, G, 1), last, params,
                                          lambda pv, h, s: (world.b[pv][:, tm], s), gen,
                                          token_map=token_map, token_map_vocab=V)
            toks, q, prev = blk.tokens, blk.q_probs, blk.prev_tokens
        conf = torch.sigmoid(world.conf_w[prev] + world.conf_b[None])
        lens = torch.empty(r, dtype=torch.long)
        for s in range(0, r, batch):
            sl = slice(s, min(r, s + batch))
            if scheduler == "alg1":
                lens[sl] = schedule_algorithm1(conf[sl], sps)
            else:
                lens[sl] = G
        chain = torch.cat([last[:, None], toks], 1)  # p_j conditions on x_j (x_0 = anchor)
        p = world.target_probs(chain.reshape(-1), params.expand(G + 1)).reshape(r, G + 1, V)
        res = verify_block(toks, p, q, lens, greedy=params.is_greedy, generator=gen)
        for i, t in enumerate(res.tokens):
            out[i].extend(t)
        last = torch.tensor([o[-1] for o in out])
    return torch.tensor([o[:n_tokens] for o in out])


# a truncated draft vocabulary that leaves out the target's likeliest tokens from some states
TRUNC = torch.tensor([0, 2, 3, 5, 6])


@pytest.mark.parametrize(
    "deterministic,scheduler,temp,top_p,top_k,truncated",
    [
        (False, "alg1", 1.0, 1.0, -1, False),
        (False, "alg1", 0.8, 0.9, 5, False),
        (True, "alg1", 1.0, 1.0, -1, False),
        (False, "full", 1.3, 1.0, 3, False),
        (False, "alg1", 1.0, 1.0, -1, True),
        (False, "full", 0.8, 0.9, 5, True),
    ],
)
def test_sampled_distribution_equals_target(deterministic: bool, scheduler: str, temp: float,
                                            top_p: float, top_k: int, truncated: bool) -> None:
    world = ToyWorld(1)
    n = 30000
    params = SamplingParams.make(temp, top_p, top_k, n=n)
    gen = torch.Generator().manual_seed(123)
    toks = run_loop(world, params, 2, start=3, deterministic=deterministic,
                    scheduler=scheduler, batch=4, gen=gen, token_map=TRUNC if truncated else None)
    joint = torch.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V).double()
    expected = world.exact_joint(3, params, 2).double()
    chi2, crit = chi2_sf_ok(joint, expected, 1e-4)
    assert chi2 < crit, f"chi2={chi2:.1f} >= {crit:.1f}"
    tv = 0.5 * (joint / n - expected).abs().sum().item()
    assert tv < 0.03


def test_chi2_detects_one_percent_bias() -> None:
    """Power check of the test statistic used above: a 1% shift is caught."""
    world = ToyWorld(1)
    params = SamplingParams.make(1.0, n=1)
    p = world.exact_joint(3, params, 2).double()
    n = 30000
    biased = p.clone()
    i, j = int(p.argmax()), int(p.argsort()[-2])
    biased[i] += 0.01
    biased[j] -= 0.01
    counts = torch.bincount(torch.multinomial(biased, n, replacement=True,
                                              generator=torch.Generator().manual_seed(0)),
                            minlength=V * V).double()
    chi2, crit = chi2_sf_ok(counts, p, 1e-4)
    assert chi2 > crit


def test_greedy_equals_plain_greedy() -> None:
    world = ToyWorld(2)
    r = 64
    params = SamplingParams.make(0.0, n=r)
    gen = torch.Generator().manual_seed(0)
    for det, tm in ((False, None), (True, None), (False, TRUNC)):
        toks = run_loop(world, params, 12, start=5, deterministic=det, scheduler="alg1", batch=4, gen=gen,
                        token_map=tm)
        ref = [5]
        for _ in range(12):
            ref.append(int(world.t_logits[ref[-1]].argmax()))
        assert (toks == torch.tensor(ref[1:])[None]).all()


def test_truncated_draft_never_proposes_outside_its_vocabulary() -> None:
    world = ToyWorld(3)
    r = 2000
    params = SamplingParams.make(1.0, n=r)
    base = world.u[None, :, TRUNC].expand(r, G, len(TRUNC))
    blk = sample_block_sequential(base, torch.zeros(r, G, 1), torch.full((r,), 1), params,
                                  lambda pv, h, s: (world.b[pv][:, TRUNC], s), torch.Generator().manual_seed(0),
                                  token_map=TRUNC, token_map_vocab=V)
    assert bool(torch.isin(blk.tokens, TRUNC).all())
    outside = torch.ones(V, dtype=torch.bool)
    outside[TRUNC] = False
    assert float(blk.q_probs[..., outside].abs().sum()) == 0.0
    assert torch.allclose(blk.q_probs.sum(-1), torch.ones(r, G))
