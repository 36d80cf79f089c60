"""The measured bf16/fp32 GEMM choice (sglang_ext/cpu/matmul.py)."""

from __future__ import annotations

import json

import pytest
import torch

from sglang_ext.cpu import matmul as cm


def _layer(n: int = 96, k: int = 64, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(n, k, generator=g).to(torch.bfloat16), requires_grad=False)
    return layer


def _forced(kind: int, n: int = 96, k: int = 64, budget: int = 1 << 30) -> cm.GemmChooser:
    ch = cm.GemmChooser(budget_bytes=budget)
    ch.kinds[(n, k)] = tuple([kind] * len(ch.buckets))
    return ch


@pytest.mark.parametrize("kind", [cm.F32, cm.F32_T])
@pytest.mark.parametrize("rows", [2, 5, 8, 130])
def test_fp32_kernels_match_the_bf16_product(kind: int, rows: int) -> None:
    layer, ch = _layer(), _forced(kind)
    x = torch.randn(rows, 64).to(torch.bfloat16)
    bias = torch.randn(96).to(torch.bfloat16)
    out = ch.linear(x, layer.weight, bias)
    assert out is not None and out.dtype == torch.bfloat16 and out.is_contiguous() and out.shape == (rows, 96)
    ref = (x.float() @ layer.weight.float().T + bias.float()).to(torch.bfloat16)
    # the same bf16 dot products accumulated in fp32: equal up to one bf16 rounding step
    assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    native = torch.nn.functional.linear(x, layer.weight, bias)
    assert (out.float() - native.float()).abs().max() <= 0.05 * native.float().abs().max()


def test_three_dimensional_input_keeps_its_shape() -> None:
    layer, ch = _layer(), _forced(cm.F32_T)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    out = ch.linear(x, layer.weight, None)
    assert out is not None and out.shape == (2, 3, 96)
    assert torch.allclose(out.float(), torch.nn.functional.linear(x, layer.weight).float(), rtol=2e-2, atol=2e-2)


def test_one_row_native_fp32_model_and_empty_budget_use_the_callers_kernel() -> None:
    layer = _layer()
    assert _forced(cm.F32_T).linear(torch.randn(1, 64).to(torch.bfloat16), layer.weight, None) is None
    assert _forced(cm.NATIVE).linear(torch.randn(8, 64).to(torch.bfloat16), layer.weight, None) is None
    w32 = layer.weight.float()
    assert _forced(cm.F32_T).linear(torch.randn(8, 64), w32, None) is None  # an fp32 model: nothing to choose
    assert _forced(cm.F32_T, budget=0).linear(torch.randn(8, 64).to(torch.bfloat16), layer.weight, None) is None


def test_rows_between_buckets_use_the_bucket_below() -> None:
    ch = cm.GemmChooser(budget_bytes=1 << 30, buckets=(2, 4, 8))
    w = torch.zeros(8, 4, dtype=torch.bfloat16)
    ch.kinds[(8, 4)] = (cm.F32, cm.F32_T, cm.NATIVE)
    assert [ch.kind(m, w) for m in (1, 2, 3, 4, 7, 8, 500)] == [0, 1, 1, 2, 2, 0, 0]


def test_fp32_copy_follows_a_weight_update() -> None:
    layer, ch = _layer(), _forced(cm.F32)
    x = torch.randn(4, 64).to(torch.bfloat16)
    before = ch.linear(x, layer.weight, None)
    with torch.no_grad():
        layer.weight.mul_(2)  # in place, as a weight reload does
    after = ch.linear(x, layer.weight, None)
    assert before is not None and after is not None
    assert torch.allclose(after.float(), 2 * before.float(), rtol=1e-2, atol=1e-2)
    assert ch.used == layer.weight.numel() * 4  # the stale copy's bytes were given back
    ch.kinds[(48, 64)] = ch.kinds[(96, 64)]
    ch.linear(x, layer.weight[:48], None)  # another shape of the same storage: a copy of its own
    assert ch.used == (96 + 48) * 64 * 4


def test_measure_picks_a_kernel_per_bucket_and_sets_min_rows() -> None:
    ch = cm.GemmChooser(budget_bytes=1 << 30, reps=1, buckets=(2, 8))
    w = torch.randn(64, 32).to(torch.bfloat16)
    assert ch.kind(1, w) == cm.NATIVE and not ch.kinds  # one row: native, nothing timed
    kinds = ch.measure(w)
    assert len(kinds) == 2 and set(kinds) <= {cm.NATIVE, cm.F32, cm.F32_T}


def test_linear_hook_sends_few_rows_straight_to_the_original() -> None:
    layer, calls = _layer(), []

    def original(method, lay, x, bias=None):
        calls.append(x.shape[0])
        return torch.nn.functional.linear(x, lay.weight, bias)

    cm._chooser = _forced(cm.F32_T)
    try:
        cm.around_linear(original, None, layer, torch.randn(1, 64).to(torch.bfloat16))
        out = cm.around_linear(original, None, layer, torch.randn(6, 64).to(torch.bfloat16))
    finally:
        cm._chooser = None
    assert calls == [1] and out.shape == (6, 96)


def test_profile_switch(serve_profile) -> None:
    serve_profile({"server": {"cpu_matmul": "native"}})
    assert cm.mode_from_profile() == "native"
    serve_profile({"server": {}})
    assert cm.mode_from_profile() == "auto"


def test_forced_fp32_needs_no_timing() -> None:
    ch = cm.GemmChooser(force_fp32=True)
    kinds = ch.measure(torch.randn(64, 32).to(torch.bfloat16))
    assert set(kinds) == {cm.F32_T} and len(kinds) == len(cm.BUCKETS)


def test_accelerate_routes_torch_linears_and_leaves_training_alone() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 32, bias=False)).to(torch.bfloat16)
    x = torch.randn(8, 64).to(torch.bfloat16)
    with torch.no_grad():
        ref = net(x)
    cm._chooser = cm.GemmChooser(budget_bytes=1 << 30, force_fp32=True)
    try:
        assert cm.accelerate(net) == 2
        with torch.no_grad():
            out = net(x)
        assert cm.chooser().used > 0  # the fp32 kernel ran
        assert torch.allclose(out.float(), ref.float(), rtol=3e-2, atol=3e-2)
        used = cm.chooser().used
        y = net(x)  # grad mode with trainable weights: autograd's own kernel, gradients flow
        y.float().sum().backward()
        assert net[0].weight.grad is not None and cm.chooser().used == used
    finally:
        cm._chooser = None


def test_calibrate_times_each_shape_over_all_its_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    # a forward reads every layer's weight from memory: the timing pass covers all weights of a
    # shape (a tied weight once), not one weight the caches may hold
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 64, bias=False) for _ in range(3)],
                                torch.nn.Linear(64, 16, bias=False)).to(torch.bfloat16)
    model[2].weight = model[1].weight  # tied
    seen: dict[tuple[int, int], int] = {}
    ch = cm.GemmChooser(budget_bytes=1 << 30, reps=1, buckets=(2, 4))
    real = ch.measure

    def measure(w: torch.Tensor, group: list[torch.Tensor] | None = None) -> tuple[int, ...]:
        seen[tuple(w.shape)] = len(group or [w])
        return real(w, group)

    monkeypatch.setattr(ch, "measure", measure)
    ch.calibrate(model)
    assert seen == {(64, 32): 2, (16, 64): 1}
    assert set(ch.kinds) == {(64, 32), (16, 64)} and all(len(k) == 2 for k in ch.kinds.values())
