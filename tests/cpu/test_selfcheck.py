"""The reference checks of measured kernels (sglang_ext/cpu/selfcheck.py) and the GemmChooser's
fallback when a kernel disagrees with the float64 reference on the CPU it runs on."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from sglang_ext.cpu import matmul as cm
from sglang_ext.cpu import selfcheck


def _w(n: int = 192, k: int = 576, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.05 * torch.randn(n, k, generator=g)).to(torch.bfloat16)


def test_gemm_tolerance_passes_rounding_and_fails_a_wrong_product() -> None:
    w, x = _w(), torch.randn(8, 576).to(torch.bfloat16)
    cols = selfcheck.check_columns(w.shape[0])
    assert selfcheck.gemm_error(torch.nn.functional.linear(x, w), x, w, cols) <= 1.0
    assert selfcheck.gemm_error((x.float() @ w.float().T).to(torch.bfloat16), x, w, cols) <= 1.0
    dropped = torch.nn.functional.linear(x[:, :-8], w[:, :-8])  # 8 of 576 terms lost
    assert selfcheck.gemm_error(dropped, x, w, cols) > 1.0
    half = (x.float() @ w.float().T).to(torch.float16).to(torch.bfloat16) * (1 + 2 ** -5)  # a scale slip
    assert selfcheck.gemm_error(half, x, w, cols) > 1.0


def test_every_kernel_passes_on_this_cpu() -> None:
    # Whatever x86-64 CPU runs this: the three kernels compute the bf16 product within tolerance.
    for n, k in ((192, 576), (576, 1536), (1536, 576)):
        ok = cm.GemmChooser(budget_bytes=1 << 30, buckets=(2, 8, 32)).verify(_w(n, k))
        assert all(s == {cm.NATIVE, cm.F32, cm.F32_T} for s in ok.values()), (n, k, ok)


def test_a_kernel_off_the_reference_is_never_chosen(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    # A native bf16 kernel that computes something else on this CPU (here: it loses the last
    # 8 input features) must be replaced by the fp32 product at every row count, one row too.
    real = cm._run

    def run(kind, x, w, w32):
        if kind == cm.NATIVE:
            return torch.nn.functional.linear(x[:, :-8], w[:, :-8])
        return real(kind, x, w, w32)

    monkeypatch.setattr(cm, "_run", run)
    ch = cm.GemmChooser(budget_bytes=1 << 30, reps=1, buckets=(2, 8))
    w = _w()
    with caplog.at_level(logging.WARNING, logger="agentserve.cpu_matmul"):
        kinds = ch.measure(w)
    assert cm.NATIVE not in kinds
    assert ch.min_rows == 1 and ch.kind(1, w) == cm.F32
    assert "bf16 kernel at 1 rows is off the float64 reference" in caplog.text
    out = ch.linear(torch.randn(1, 576).to(torch.bfloat16), w, None)
    assert out is not None and out.shape == (1, 192)  # one row now goes through the reference kernel


def test_forced_fp32_falls_back_too(monkeypatch: pytest.MonkeyPatch) -> None:
    real = cm._run
    monkeypatch.setattr(cm, "_run", lambda kind, x, w, w32: (real(kind, x, w, w32) * 1.1 if kind == cm.F32_T
                                                            else real(kind, x, w, w32)))
    kinds = cm.GemmChooser(budget_bytes=1 << 30, force_fp32=True, buckets=(2, 8)).measure(_w())
    assert kinds == (cm.F32, cm.F32)


def test_attention_reference_and_check() -> None:
    assert selfcheck.fp32_sdpa_ok()  # torch's fp32 SDPA on this CPU
    good = selfcheck.attention_error(lambda q, k, v, s, g: sdpa(q, k, v, scale=s, enable_gqa=g))
    assert good <= 1.0
    ref = selfcheck.attention_error(lambda q, k, v, s, g: selfcheck.reference_attention(q, k, v, s, g))
    assert ref <= 1.0
    # a missing scale or a bf16 softmax is caught
    assert selfcheck.attention_error(lambda q, k, v, s, g: sdpa(q, k, v, scale=1.0, enable_gqa=g)) > 1.0
    assert selfcheck.attention_error(
        lambda q, k, v, s, g: sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=s, enable_gqa=g).float()) > 1.0
