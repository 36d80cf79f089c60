"""Phase 2, the verify lengths: the pre-draft cost check (plan.best_width) and, for ragged steps,
each copy row's own length (plan.ragged_lengths). Costs come from the one step-cost model."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from sglang_ext.copy.chooser import HybridDecision
from sglang_ext.spec.plan import best_width, prefix_products, ragged_lengths
from sglang_ext.spec.step_cost import StepCost


def _worker(ragged: bool) -> SimpleNamespace:
    # linear prior t(B) = 1 + 0.25 (B - 1): every batch token adds a quarter of a lone step
    gate = SimpleNamespace(t_draft=None, expected=lambda rid: 0.0)
    return SimpleNamespace(sps=StepCost(None, prior_slope=0.25), ragged=ragged, block=7, copy_block=7, gate=gate,
                           min_step_gain=0.0)


def _decision(conf: float) -> HybridDecision:
    return HybridDecision(source="copy", expected_copy=7 * conf, expected_model=0.0, tokens=[1] * 7,
                          confidences=[conf] * 7)


def _rate(w: SimpleNamespace, pps: list[list[float]], lens: tuple[int, ...], bs: int) -> float:
    gain = sum(sum(pp[:n]) for pp, n in zip(pps, lens))
    return (bs + gain) / w.sps.step_seconds(bs + sum(lens))


def test_ragged_lengths_are_the_best_per_row_lengths() -> None:
    """A copy that survives (0.9 per token) verifies deep, one that rarely does (0.1) verifies
    nothing: brute force over every pair of lengths finds no better rate."""
    w = _worker(ragged=True)
    pps = [prefix_products([0.9] * 7), prefix_products([0.1] * 7)]
    rate, lens = ragged_lengths(w, pps, [], bs=2, kv=0.0, t_draft=0.0)
    best = max(itertools.product(range(8), range(8)), key=lambda ls: _rate(w, pps, ls, 2))
    assert rate == pytest.approx(_rate(w, pps, best, 2))
    assert tuple(lens) == best
    assert lens[0] >= 3 and lens[1] == 0


def test_ragged_check_beats_one_width_for_all_rows() -> None:
    """The old ragged check gave every copy row the same width: the low-survival row verified as
    deep as the good one. Per-row lengths give at least that rate, here strictly more."""
    w = _worker(ragged=True)
    decisions = [_decision(0.9), _decision(0.1)]
    width, lens = best_width(w, decisions, [0, 1], [], ["a", "b"], bs=2)
    assert width == 1 + lens[0] and lens[1] == 0
    pps = [prefix_products([0.9] * 7), prefix_products([0.1] * 7)]
    one_width = max(_rate(w, pps, (n, n), 2) for n in range(8))
    assert _rate(w, pps, (lens[0], lens[1]), 2) > one_width


@pytest.mark.parametrize("ragged", [True, False])
def test_copies_that_do_not_pay_leave_the_step_plain(ragged: bool) -> None:
    w = _worker(ragged)
    width, lens = best_width(w, [_decision(0.05)] * 4, [0, 1, 2, 3], [], list("abcd"), bs=4)
    assert width == 1 and lens == {}


def test_uniform_layout_keeps_one_width() -> None:
    w = _worker(ragged=False)
    width, lens = best_width(w, [_decision(0.9), _decision(0.1)], [0, 1], [], ["a", "b"], bs=2)
    assert width > 1 and lens == {}


def test_model_rows_add_their_block_and_drafter_time() -> None:
    """A model row whose past acceptance (3 of 7) beats its seven positions' cost drafts; with a
    drafter that costs two lone steps it does not."""
    w = _worker(ragged=True)
    w.gate.expected = lambda rid: 3.0
    width, _ = best_width(w, [None], [], [0], ["m"], bs=1)
    assert width == 8
    w.gate.t_draft = 2.0
    width, _ = best_width(w, [None], [], [0], ["m"], bs=1)
    assert width == 1


@pytest.mark.parametrize("ragged", [True, False])
def test_a_step_that_barely_pays_stays_plain_under_a_margin(ragged: bool) -> None:
    # four good copies beat plain decoding by a few per cent under this cost model: verified
    # with no margin (the default), decoded plainly when the profile asks for 10 % more
    w = _worker(ragged)
    args = ([_decision(0.65)] * 4, [0, 1, 2, 3], [], list("abcd"))
    assert best_width(w, *args, bs=4)[0] > 1
    w.min_step_gain = 0.1
    assert best_width(w, *args, bs=4) == (1, {})
