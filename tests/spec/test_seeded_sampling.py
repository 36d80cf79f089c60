"""Keyed (seeded) sampling, seeded_sampling.py: an exact draw from the processed distribution,
a pure function of (logits, seed, position), and coupled drafting."""

from __future__ import annotations

import collections

import pytest
import torch
from scipy.stats import chisquare

from sglang_ext.spec import seeded_sampling as ss
from sglang_ext.dspark.sampling import SamplingParams, process_logits, sample_block_sequential

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -3.0])


def _probs(t: float = 1.0, top_p: float = 1.0, top_k: int = -1) -> torch.Tensor:
    return process_logits(LOGITS[None], SamplingParams.make([t], [top_p], [top_k]))[0]


def _gof(draws: list[int], p: torch.Tensor) -> float:
    """Chi-square goodness of fit of the draws against p (cells with p > 0)."""
    cnt = collections.Counter(draws)
    cells = [i for i in range(len(p)) if p[i] > 0]
    assert set(cnt) <= set(cells), (cnt, p)  # never a filtered token
    n, mass = len(draws), float(sum(float(p[i]) for i in cells))
    return float(chisquare([cnt[i] for i in cells], [float(p[i]) / mass * n for i in cells]).pvalue)


@pytest.mark.parametrize("kw", [{}, {"t": 0.7}, {"top_k": 3}, {"top_p": 0.8}])
def test_keyed_draws_over_seeds_follow_the_distribution(kw: dict) -> None:
    p = _probs(**kw)
    draws = [ss.sample_row(LOGITS, kw.get("t", 1.0), kw.get("top_p", 1.0), kw.get("top_k", -1), 0.0, seed, 17)
             for seed in range(3000)]
    assert _gof(draws, p) > 1e-3


def test_keyed_draws_over_positions_follow_the_distribution() -> None:
    p = _probs()
    draws = [ss.sample_row(LOGITS, 1.0, 1.0, -1, 0.0, 1234, pos) for pos in range(3000)]
    assert _gof(draws, p) > 1e-3


def test_a_biased_sampler_fails_the_fit() -> None:
    # the check above can fail: draws from a sharper distribution do not fit p
    p = _probs()
    sharp = _probs(t=0.5)
    draws = [ss.keyed_choice(sharp, seed, 3) for seed in range(3000)]
    assert _gof(draws, p) < 1e-6


def test_min_p_drops_unlikely_tokens() -> None:
    p = ss.processed(LOGITS, 1.0, 1.0, -1, min_p=0.5)
    assert (p > 0).tolist() == [True, True, False, False, False, False]
    draws = {ss.sample_row(LOGITS, 1.0, 1.0, -1, 0.5, seed, 0) for seed in range(200)}
    assert draws == {0, 1}


def test_same_seed_and_position_same_token_else_independent() -> None:
    a = [ss.sample_row(LOGITS, 1.0, 1.0, -1, 0.0, 7, pos) for pos in range(200)]
    assert a == [ss.sample_row(LOGITS, 1.0, 1.0, -1, 0.0, 7, pos) for pos in range(200)]
    b = [ss.sample_row(LOGITS, 1.0, 1.0, -1, 0.0, 8, pos) for pos in range(200)]
    assert a != b
    # large and negative seeds (SGLang accepts int64) are valid keys
    assert 0 <= ss.key(-(2**63), 5) < 2**63 and 0 <= ss.key(2**63 - 1, 5) < 2**63


def test_request_seeds_skip_greedy_unseeded_and_custom_processors() -> None:
    class SP:
        def __init__(self, seed, t=1.0, top_k=-1):
            self.sampling_seed, self.temperature, self.top_k = seed, t, top_k

    class Req:
        def __init__(self, sp, custom=None):
            self.sampling_params, self.custom_logit_processor = sp, custom

    reqs = [Req(SP(5)), Req(SP(None)), Req(SP(5, t=0.0)), Req(SP(5, top_k=1)), Req(SP(9), custom="x")]
    assert ss.request_seeds(reqs) == [5, None, None, None, None]


def test_coupled_drafting_matches_the_keyed_target_draw() -> None:
    # A drafter whose distribution equals the target's proposes, with the request's noise,
    # exactly the tokens the keyed verifier draws: every draft is accepted.
    torch.manual_seed(0)
    g, v = 5, 40
    base = torch.randn(2, g, v) * 2
    params = SamplingParams.make([1.0, 1.0], [1.0, 1.0], [-1, -1])
    seed, anchor_pos = 99, 50
    noise = {0: torch.stack([ss.gumbel(seed, anchor_pos + k, v) for k in range(g)])}
    blk = sample_block_sequential(base, torch.zeros(2, g, 1), torch.zeros(2, dtype=torch.long), params, None,
                                  torch.Generator().manual_seed(1), gumbel=noise)
    target = [ss.keyed_choice(process_logits(base[0, k][None], params.index(torch.tensor([0])))[0], seed, anchor_pos + k)
              for k in range(g)]
    assert blk.tokens[0].tolist() == target


@pytest.mark.parametrize("t,top_p,top_k", [(1.0, 1.0, -1), (0.7, 0.9, -1), (1.0, 1.0, 50), (1.3, 0.99, 3000),
                                         (0.5, 0.5, 10), (1.0, 0.999, -1)])
def test_processed_equals_process_logits(t: float, top_p: float, top_k: int) -> None:
    # the topk-prefix cut is the full-sort cut of process_logits (the verifier's semantics),
    # also where the cut lies past the first prefix (top_k 3000, top_p 0.999 on flat logits)
    torch.manual_seed(3)
    for scale in (0.5, 3.0):
        x = torch.randn(8000) * scale
        ref = process_logits(x[None], SamplingParams.make([t], [top_p], [top_k]))[0]
        got = ss.processed(x, t, top_p, top_k)
        assert torch.equal(got > 0, ref > 0)
        assert torch.allclose(got, ref, atol=1e-6)


def test_with_a_step_trace_every_target_forward_is_timed(tmp_path, monkeypatch) -> None:
    import json
    from types import SimpleNamespace

    from sglang_ext.spec import seeded_sampling, stats

    path = tmp_path / "trace.jsonl"
    batch = SimpleNamespace(reqs=[object(), object()], forward_mode=SimpleNamespace(name="DECODE"))
    seeded_sampling.around_tp_forward(lambda w, b: "out", None, batch)
    assert not path.exists()  # off unless AGENTSERVE_STEP_TRACE is set
    monkeypatch.setattr(stats, "_trace_path", str(path))
    assert seeded_sampling.around_tp_forward(lambda w, b: "out", None, batch) == "out"
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert line["kind"] == "forward" and line["mode"] == "DECODE" and line["batch_size"] == 2 and line["seconds"] >= 0
