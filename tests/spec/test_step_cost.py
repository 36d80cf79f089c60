"""The worker's online step-cost table: measured points, the monotone fallback, padding to a
cheaper wider verify, and the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_ext.spec.step_cost import StepCost


def fed(points: dict[int, float], path: Path | None = None, n: int = 16) -> StepCost:
    sps = StepCost(path)
    for _ in range(n):
        for b, sec in points.items():
            sps.observe(b, sec)
    return sps


def test_measured_points_keep_their_shape() -> None:
    # a bf16 CPU: 2 tokens cost more than 4 or 8 (the isotonic table averages that away)
    sps = fed({1: 0.070, 2: 0.125, 4: 0.090, 8: 0.095})
    assert sps.step_seconds(2) == pytest.approx(0.125)
    assert 1.0 / sps(2) < 0.125  # the monotone table would call width 2 cheaper than it is
    # unmeasured between measured points: the measured point below plus the fitted cost per token
    assert sps.token_slope is not None
    assert sps.step_seconds(3) == pytest.approx(0.125 + sps.token_slope)


def test_unmeasured_token_counts_cost_the_fitted_slope_not_the_startup_shape() -> None:
    # an AMX CPU: the weight products are flat in B, a real verify step is not (attention,
    # logits of every position, acceptance): 8 tokens 0.155 s, 15 0.20 s, 40 0.30 s; B values
    # between are seen too rarely for points of their own
    flat = {b: 0.010 for b in (1, 2, 4, 8, 16, 32, 64)}
    sps = StepCost(None, startup=flat)
    for _ in range(8):
        for b, t in ((8, 0.155), (15, 0.20), (40, 0.30)):
            sps.observe(b, t)
    sps._rebuild()
    assert sps.token_slope == pytest.approx((0.30 - 0.155) / 32, rel=0.3)
    assert sps.step_seconds(30) > 0.155 + 10 * 0.004  # priced past 15's point, not flat
    assert sps.step_seconds(30) == pytest.approx(0.20 + 15 * sps.token_slope)
    lone = StepCost(None, startup=flat)
    for _ in range(16):
        lone.observe(8, 0.155)  # one batch size, no verify steps: nothing to fit
    lone._rebuild()
    assert lone.token_slope is None
    # ... and then an extra position costs the linear prior's slope, not the flat start-up shape
    assert lone.step_seconds(16) == pytest.approx(0.155 + 8 * lone.prior_slope * lone._t1)
    assert lone.step_seconds(16) > 0.155 * 1.5


def test_cheapest_width_pads_only_when_wider_is_cheaper() -> None:
    sps = fed({1: 0.070, 2: 0.125, 4: 0.090, 8: 0.095})
    assert sps.cheapest_width(1, 2, 8)[0] == 4
    assert sps.cheapest_width(1, 2, 8)[1] == pytest.approx(0.090)
    assert sps.cheapest_width(1, 1, 8)[0] == 1  # plain decoding stays plain
    assert sps.cheapest_width(1, 5, 8)[0] in (5, 6, 7, 8)  # never narrower than needed
    assert sps.cheapest_width(1, 2, 3)[0] in (2, 3)  # never wider than allowed
    flat = fed({1: 0.05, 2: 0.06, 4: 0.08, 8: 0.12})
    assert flat.cheapest_width(1, 2, 8)[0] == 2  # a rising cost curve never pads


def test_too_few_samples_fall_back_to_the_table() -> None:
    sps = fed({1: 0.07, 2: 0.5}, n=1)
    assert sps.step_seconds(2) == pytest.approx(1.0 / sps(2))


def test_cache_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sps.json"
    sps = fed({1: 0.07, 8: 0.14}, path)
    sps.save()
    again = StepCost(path)
    assert again.step_seconds(8) == pytest.approx(sps.step_seconds(8))
    assert again(1) == pytest.approx(sps(1))


def true_cost(b: int, kv: float) -> float:
    # an f(B) with a bump at 2 (kept, not averaged) plus 30 us per K/V token read
    return {1: 0.05, 2: 0.08, 8: 0.06, 24: 0.07}[b] + 3e-5 * kv


def fed_kv(path: Path | None = None) -> StepCost:
    sps = StepCost(path)
    for i in range(64):
        for b in (1, 2, 8, 24):
            kv = 200 + 300 * ((i * 7 + b) % 10)  # contexts from 200 to 2900 tokens, mixed per B
            sps.observe(b, true_cost(b, kv), kv)
    return sps


def test_kv_slope_is_fitted_within_each_token_count() -> None:
    sps = fed_kv()
    assert sps.kv_slope == pytest.approx(3e-5, rel=0.02)
    for b in (1, 2, 8, 24):
        for kv in (0, 1000, 8000):
            assert sps.step_seconds(b, kv) == pytest.approx(true_cost(b, kv), rel=0.02)
    assert sps.step_seconds(2, 500) > sps.step_seconds(8, 500)  # f's shape in B survives the fit


def test_phase_mixed_table_prices_extra_positions_at_the_steps_context() -> None:
    # Short chats measured B=8, long agent turns B=24: a table keyed on B alone calls the
    # 16 extra positions 0.13 s dearer; at one step's context they cost 0.01 s.
    sps = StepCost(None)
    for i in range(32):
        sps.observe(8, true_cost(8, 400 + 10 * (i % 5)), 400 + 10 * (i % 5))
        sps.observe(8, true_cost(8, 4000 + 10 * (i % 5)), 4000 + 10 * (i % 5))
        sps.observe(24, true_cost(24, 4000 + 100 * (i % 5)), 4000 + 100 * (i % 5))
    gap = sps.step_seconds(24, 4000) - sps.step_seconds(8, 4000)
    assert gap == pytest.approx(0.01, abs=0.004)
    rate = sps.at(4000)
    assert 24 * rate(24) > 8 * rate(8)  # Algorithm 1 sees the wide step as the better deal


def test_no_kv_spread_leaves_the_slope_at_zero() -> None:
    sps = fed({1: 0.07, 8: 0.14})  # every step at kv 0
    assert sps.kv_slope == 0.0
    assert sps.step_seconds(8, 5000) == pytest.approx(0.14)


def test_cache_keeps_the_kv_model(tmp_path: Path) -> None:
    path = tmp_path / "sps.json"
    sps = fed_kv(path)
    sps.save()
    again = StepCost(path)
    assert again.kv_slope == pytest.approx(sps.kv_slope)
    assert again.step_seconds(8, 1500) == pytest.approx(sps.step_seconds(8, 1500))
    assert again.token_slope == pytest.approx(sps.token_slope)  # the per-token cost survives a restart
    assert again.step_seconds(12, 1500) == pytest.approx(sps.step_seconds(12, 1500))


def test_cache_file_differs_per_dtype() -> None:
    assert StepCost.for_model("m", "bfloat16").path != StepCost.for_model("m", "float32").path


def test_startup_measurement_is_bounded_and_shapes_the_prior() -> None:
    import time

    import torch

    from sglang_ext.spec.step_cost import PRIOR_SLOPE, measure_startup

    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    t0 = time.perf_counter()
    pts = measure_startup(model, counts=(1, 2, 4, 8), budget_s=2.0)
    assert time.perf_counter() - t0 < 5.0 and sorted(pts) == [1, 2, 4, 8] and all(v > 0 for v in pts.values())
    # a prior with a bump at 2 (a CPU's GEMM kernel change), kept until steps are measured
    cost = StepCost(None, startup={1: 0.01, 2: 0.03, 4: 0.02, 8: 0.04})
    assert cost.shape(2) == pytest.approx(3.0) and cost.shape(3) == pytest.approx(2.5)
    assert cost.shape(16) == pytest.approx(8.0)  # linear past the measurement
    assert cost.cheapest_width(1, 2, 4)[0] == 4  # the start-up shape already says 4 beats 2
    assert StepCost(None).shape(8) == pytest.approx(1 + 7 * PRIOR_SLOPE)  # no measurement: the one prior
    # once steps are measured, the prior is scaled to them
    for _ in range(16):
        cost.observe(1, 0.05)
    assert cost.step_seconds(4) == pytest.approx(0.05 * 2.0)
    curve = cost.curve()
    assert curve[1] == pytest.approx(0.05) and curve[4] == pytest.approx(0.10)


def test_a_stale_cached_bucket_is_dropped_and_a_stall_moves_a_bucket_little(tmp_path) -> None:
    """A bucket measured under a stall in an earlier run (seen: B = 2 at 1.48 s beside B = 1 at
    0.048 s, after which admission never ran two requests together again) is dropped at load
    when it disagrees with this start's shape; a bump the start-up measurement also shows stays.
    A known bucket moves by at most a tenth of 3x its estimate per stalled step."""
    import json

    path = tmp_path / "sps.json"
    path.write_text(json.dumps({"seconds": {"1": 0.048, "2": 1.48, "4": 0.15, "8": 0.09},
                                "count": {"1": 100, "2": 6, "4": 5, "8": 12}, "kv": {}, "kv_slope": 0.0}))
    startup = {1: 0.01, 2: 0.011, 4: 0.03, 8: 0.02}  # a real bump at 4
    sc = StepCost(path, startup=startup)
    assert 2 not in sc.measured() and sc.measured()[4] == pytest.approx(0.15) and sc.measured()[8] == pytest.approx(0.09)
    assert sc.step_seconds(2) < 0.1  # priced from the start-up shape, not 1.48 s
    assert sc.curve()[2] < 0.1
    sc.observe(8, 9.0)  # one stalled step
    assert sc.seconds[8] == pytest.approx(0.9 * 0.09 + 0.1 * 3 * 0.09)
