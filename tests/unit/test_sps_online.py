"""The worker's online step-cost table: measured points, the monotone fallback, padding to a
cheaper wider verify, and the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_ext.sps_online import OnlineSPS


def fed(points: dict[int, float], path: Path | None = None, n: int = 16) -> OnlineSPS:
    sps = OnlineSPS(path)
    for _ in range(n):
        for b, sec in points.items():
            sps.observe(b, sec)
    return sps


def test_measured_points_keep_their_shape() -> None:
    # a bf16 CPU: 2 tokens cost more than 4 or 8 (the isotonic table averages that away)
    sps = fed({1: 0.070, 2: 0.125, 4: 0.090, 8: 0.095})
    assert sps.step_seconds(2) == pytest.approx(0.125)
    assert 1.0 / sps(2) < 0.125  # the monotone table would call width 2 cheaper than it is
    assert sps.step_seconds(3) == pytest.approx(1.0 / sps(3))  # unmeasured: the table


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
    again = OnlineSPS(path)
    assert again.step_seconds(8) == pytest.approx(sps.step_seconds(8))
    assert again(1) == pytest.approx(sps(1))
