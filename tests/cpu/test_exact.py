"""Exact mode's row-invariant products (sglang_ext/cpu/exact.py), on whatever CPU runs this."""

from __future__ import annotations

import pytest
import torch

from sglang_ext.cpu import exact


def _w(n: int = 200, k: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("kind", ["chosen on this CPU", exact.ROW])
def test_a_row_comes_out_the_same_in_any_batch(kind: str) -> None:
    # the kernel the start-up check picks on whatever CPU runs this, and the one-row fallback
    t = exact.TiledLinear(tile=8)
    w, bias = _w(), torch.randn(200).to(torch.bfloat16)
    if kind == exact.ROW:
        t.kinds[(200, 96)] = kind
    assert t.kind(w, bias) in (exact.BF16, exact.F32, exact.ROW)
    x = torch.randn(37, 96).to(torch.bfloat16)
    full = t.linear(x, w, bias)
    assert full.shape == (37, 200) and full.dtype == torch.bfloat16
    for i in (0, 7, 8, 36):
        assert torch.equal(t.linear(x[i:i + 1], w, bias)[0], full[i])  # alone
    perm = torch.randperm(37)
    assert torch.equal(t.linear(x[perm], w, bias), full[perm])  # other neighbours, other tile positions
    assert torch.equal(t.linear(x[:9], w, bias), full[:9])  # a shorter batch
    ref = (x.double() @ w.double().T + bias.double())
    assert (full.double() - ref).abs().max() <= 0.02 * ref.abs().max()


def test_the_kernel_passes_its_check_on_this_cpu_or_falls_back() -> None:
    t = exact.TiledLinear()
    kind = t.kind(_w(), None)
    assert kind in (exact.BF16, exact.F32, exact.ROW)
    assert t.check(kind, _w(), None) or kind == exact.ROW  # ROW is invariant by construction


def test_a_kernel_that_is_not_row_invariant_is_not_used(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    t = exact.TiledLinear(prefer=exact.BF16)
    real = t._run

    def noisy(kind: str, x: torch.Tensor, w: torch.Tensor, bias):  # a kernel whose rows depend on the batch
        out = real(kind, x, w, bias)
        return out + (x.shape[0] % 3) * 1e-2 if kind == exact.BF16 else out

    monkeypatch.setattr(t, "_run", noisy)
    assert t.kind(_w(), None) == exact.F32
    assert "not row-invariant" in caplog.text


def test_attention_of_a_query_alone_equals_it_in_a_prefill_and_a_verify_block() -> None:
    g = torch.Generator().manual_seed(1)
    n = 40
    q = torch.randn(n, 6, 32, generator=g).to(torch.bfloat16)
    k = torch.randn(n, 2, 32, generator=g).to(torch.bfloat16)
    v = torch.randn(n, 2, 32, generator=g).to(torch.bfloat16)
    prefill = exact.attend(q, k, v, 0, 0.17, True).to(torch.bfloat16)
    for i in range(n):  # decode: one query over its own prefix
        assert torch.equal(exact.attend(q[i:i + 1], k[:i + 1], v[:i + 1], i, 0.17, True).to(torch.bfloat16), prefill[i:i + 1])
    for i in range(0, n - 5, 7):  # a verify block of 5 after a prefix of i
        blk = exact.attend(q[i:i + 5], k[:i + 5], v[:i + 5], i, 0.17, True).to(torch.bfloat16)
        assert torch.equal(blk, prefill[i:i + 5])
    # and it is attention: causal softmax against a float64 reference
    rep = k.double().repeat_interleave(3, dim=1), v.double().repeat_interleave(3, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), rep[0]) * 0.17
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), rep[1])
    assert (prefill.double() - ref).abs().max() < 0.02


def test_the_profile_switch_defaults_off() -> None:
    from agentserve.profile import ServerSpec

    assert ServerSpec().deterministic is False
    assert ServerSpec(deterministic=True).deterministic is True


def test_a_onednn_isa_cap_below_bf16_means_the_fp32_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert exact.native_bf16_matmul() is False and exact.TiledLinear().prefer == exact.F32
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    flags = exact.native_bf16_matmul()  # what this CPU has
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert exact.native_bf16_matmul() == flags  # a cap that allows bf16 changes nothing
