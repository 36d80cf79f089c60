from __future__ import annotations

import pytest
import torch

from sglang_ext.dspark.calibration import STSCalibration, expected_calibration_error, fit_sts
from sglang_ext.dspark.sampling import SamplingParams, process_logits
from sglang_ext.dspark.sps import SPSTable, cache_key, machine_fingerprint
from sglang_ext.dspark.verify import verify_block


def _synthetic(n: int, g: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    true_logit = torch.randn(n, g, generator=gen) * 1.5 + 1.0
    true_c = torch.sigmoid(true_logit)
    ok = torch.rand(n, g, generator=gen) < true_c
    survived = torch.cumprod(ok.long(), 1).bool()
    over = true_logit * 2.5 + 0.3  # overconfident head
    return over, survived


def test_sts_reduces_ece_and_preserves_order(tmp_path) -> None:
    z, s = _synthetic(20000, 5, 0)
    temps, before, after = fit_sts(z, s)
    assert all(a <= b + 1e-12 for a, b in zip(after, before))
    assert sum(before) / 5 > 0.1 and sum(after) < 0.25 * sum(before)
    assert all(t > 1.0 for t in temps)  # overconfident -> soften
    # held-out data: still better
    z2, s2 = _synthetic(20000, 5, 1)
    cal = STSCalibration()
    cal.fit(1.0, z, s)
    c2 = cal.apply_logits(z2, torch.ones(z2.shape[0]))
    raw_cum = torch.cumprod(torch.sigmoid(z2), 1)
    cal_cum = torch.cumprod(c2.double(), 1)
    for k in range(5):
        assert expected_calibration_error(cal_cum[:, k], s2[:, k]) < expected_calibration_error(raw_cum[:, k], s2[:, k])
    # order preserving per position
    for k in range(5):
        order_raw = torch.argsort(z2[:, k], stable=True)
        assert torch.all(c2[order_raw, k][1:] >= c2[order_raw, k][:-1])
    # buckets + JSON round trip
    cal.fit(0.0, z * 0.5, s)
    p = tmp_path / "sts.json"
    cal.save(str(p))
    cal2 = STSCalibration.load(str(p))
    assert cal2.buckets == cal.buckets
    assert torch.equal(cal2.apply_logits(z2[:4], [0.0, 0.1, 1.0, 0.7]), cal.apply_logits(z2[:4], [0.0, 0.1, 1.0, 0.7]))
    assert torch.allclose(cal2.temperatures_for(0.2, 5), torch.tensor(cal.buckets["0.0"], dtype=torch.float64))


def test_sps_monotone_interp_and_cache(tmp_path) -> None:
    t = SPSTable([1, 2, 4, 8, 16], [10.0, 10.5, 8.0, 8.2, 4.0])
    vals = [t(b) for b in range(1, 40)]
    assert all(b <= a + 1e-12 for a, b in zip(vals, vals[1:]))
    assert t(3) == pytest.approx((t(2) + t(4)) / 2)
    t.save(str(tmp_path / "sps.json"))
    assert SPSTable.load(str(tmp_path / "sps.json")).fitted == t.fitted
    assert cache_key("a") != cache_key("b")
    assert "torch" in machine_fingerprint()


def test_process_logits_semantics() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4))
    p = process_logits(logits, SamplingParams.make([1.0, 1.0, 0.0, 1.0], [1.0, 0.8, 1.0, 0.5], [-1, 2, -1, 1]))
    assert torch.allclose(p[0], torch.tensor([0.5, 0.3, 0.15, 0.05]))
    # top_p=0.8 keeps tokens whose preceding mass <= 0.8 (0.5, 0.3), then top_k=2
    assert torch.allclose(p[1], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.equal(p[2], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(p[3], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    t = process_logits(logits[:1], SamplingParams.make([2.0], [1.0], [-1]))
    ref = torch.softmax(logits[0] / 2, -1)
    assert torch.allclose(t[0], ref)


def test_verify_rules() -> None:
    v = 4
    p = torch.zeros(1, 4, v)
    p[0, :, 1] = 1.0  # target deterministic: always 1
    drafts = torch.tensor([[1, 1, 2]])
    r = verify_block(drafts, p, None, greedy=torch.tensor([True]))
    assert r.accept_lens.tolist() == [2] and r.tokens == [[1, 1, 1]]
    assert r.accept_flags.tolist() == [[True, True, False]]
    # verify length truncation: only 1 verified -> bonus from p at position 1
    r = verify_block(drafts, p, None, verify_lens=torch.tensor([1]), greedy=torch.tensor([True]))
    assert r.tokens == [[1, 1]]
    # EOS accepted ends the round without bonus
    r = verify_block(drafts, p, None, greedy=torch.tensor([True]), eos_token_ids=[1])
    assert r.tokens == [[1]] and r.bonus.tolist() == [-1]
    # sampling, q one-hot at a zero-probability token -> always rejected, residual = p
    r = verify_block(torch.tensor([[0, 1, 1]]), p, None, generator=torch.Generator().manual_seed(0))
    assert r.tokens == [[1]]


def _filter_by_stable_sort(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The reference: a stable descending sort of each whole row (ties ranked by token id)."""
    probs = torch.softmax(logits.float() / params.temperature[:, None], dim=-1)
    v = probs.shape[-1]
    p_sort, p_idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    drop = (torch.cumsum(p_sort, dim=-1) - p_sort) > params.top_p[:, None]
    k = torch.where(params.top_k <= 0, torch.full_like(params.top_k, v), params.top_k)
    drop |= torch.arange(v)[None, :] >= k[:, None]
    drop[:, 0] = False
    kept = torch.zeros_like(probs).scatter_(1, p_idx, p_sort.masked_fill(drop, 0.0))
    filtered = (params.top_p < 1.0) | (k < v)  # rows without a filter are the softmax itself
    return torch.where(filtered[:, None], kept / kept.sum(dim=-1, keepdim=True), probs)


def test_process_logits_filter_equals_a_full_stable_sort() -> None:
    """The topk-prefix filter keeps exactly the tokens a stable full sort keeps, with the same
    probabilities, including ties at the cut (bf16 logits tie often) and cuts deep in the
    vocabulary (flat rows, top_p near 1, top_k above the first prefix)."""
    gen = torch.Generator().manual_seed(0)
    v, n = 49152, 48
    scale = torch.tensor([0.5, 2.0, 6.0])[torch.arange(n) % 3][:, None]
    logits = (torch.randn(n, v, generator=gen) * scale).to(torch.bfloat16).float()
    logits[:4, :40] = 9.0  # 40 tied leaders: a top_k / top_p cut falls among equal values
    temp = [0.7, 1.0, 1.3]
    top_p = [1.0, 0.95, 0.5, 0.999, 0.9, 0.2]
    top_k = [-1, 20, 300, 5000, 1, -1, 7]
    params = SamplingParams.make([temp[i % 3] for i in range(n)], [top_p[i % 6] for i in range(n)],
                                 [top_k[i % 7] for i in range(n)])
    got = process_logits(logits, params)
    want = _filter_by_stable_sort(logits, params)
    assert torch.equal(got > 0, want > 0)
    assert torch.allclose(got, want, rtol=0, atol=1e-7)
    kept = (got > 0).sum(-1)
    assert int(kept.max()) > 1024 and int(kept.min()) == 1  # deep cuts and single-token rows were covered
    tied_rows = [(int(r), int((got[r, :40] > 0).sum())) for r in range(4)]
    assert any(0 < k < 40 for _, k in tied_rows), tied_rows  # a cut inside the tie was exercised


def test_sts_by_log_loss_holds_up_on_a_few_hundred_blocks() -> None:
    """With a few hundred blocks (what the CPU can roll out), the log-loss fit lowers held-out
    ECE at every position; its temperatures stay off the grid's ends."""
    from sglang_ext.dspark.calibrate import survival_ece

    z, s = _synthetic(240, 7, 3)
    z2, s2 = _synthetic(20000, 7, 4)
    temps, _, _ = fit_sts(z, s, objective="nll")
    before, after = survival_ece(z2, s2, [1.0] * 7), survival_ece(z2, s2, temps)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert all(1.0 < t < 30.0 for t in temps), temps
    with pytest.raises(ValueError, match="objective"):
        fit_sts(z, s, objective="brier")


def test_a_shifted_head_needs_the_bias_and_it_round_trips(tmp_path) -> None:
    """Logits right in scale but 1.5 too high: the fitted shift brings held-out ECE down where a
    temperature alone helps less; the file keeps the shifts and applies them."""
    from sglang_ext.dspark.calibrate import survival_ece
    from sglang_ext.dspark.calibration import fit_sts_bias

    def shifted(n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        true_logit = torch.randn(n, 4, generator=gen, dtype=torch.float64) + 0.5
        ok = torch.rand(n, 4, generator=gen, dtype=torch.float64) < torch.sigmoid(true_logit)
        return true_logit + 1.5, torch.cumprod(ok.long(), 1).bool()

    z, s = shifted(3000, 5)
    z2, s2 = shifted(20000, 6)
    temps, biases = fit_sts_bias(z, s)
    assert biases[0] == pytest.approx(-1.5, abs=0.3)
    raw = sum(survival_ece(z2, s2, [1.0] * 4))
    temp_only = sum(survival_ece(z2, s2, fit_sts(z, s, objective="nll")[0]))
    shifted_fit = sum(survival_ece(z2, s2, temps, biases))
    assert shifted_fit < temp_only < raw and shifted_fit < 0.3 * raw
    cal = STSCalibration(buckets={"0.0": temps}, biases={"0.0": biases})
    cal.save(str(tmp_path / "sts.json"))
    back = STSCalibration.load(str(tmp_path / "sts.json"))
    want = torch.sigmoid(z2[:3] / torch.tensor(temps) + torch.tensor(biases)).float()
    assert torch.allclose(back.apply_logits(z2[:3].float(), 0.0), want, atol=1e-5)
