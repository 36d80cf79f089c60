"""The cost-aware drafting gate: skips the model where its drafts do not pay, probes now and
then, and decides from past steps only. Verify costs come from the step-cost model (plan.draft_costs)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_ext.spec.draft_gate import DraftGate
from sglang_ext.spec.plan import draft_costs
from sglang_ext.spec.step_cost import StepCost

T_TOKEN, T_EXTRA = 0.05, 0.05  # a plain step per request; what a block adds to the verify


def test_drafts_until_measured_then_follows_cost_and_acceptance() -> None:
    gate = DraftGate(prior_accepted=1.0, ema=1.0)
    assert gate.decide("r", T_TOKEN, T_EXTRA) != "skip"  # the drafter not measured: draft (and measure)
    gate.observe_draft(drafted_rows=1, draft_s=0.05)
    # cost = 0.05 draft + 0.05 longer verify = 0.10 s; one accepted token saves 0.05 s
    gate.observe_model("r", 1)
    assert gate.decide("r", T_TOKEN, T_EXTRA) == "skip"
    gate.observe_model("good", 3)  # 3 * 0.05 = 0.15 s saved > 0.10 s cost
    assert gate.decide("good", T_TOKEN, T_EXTRA) != "skip"
    assert gate.decide("r", T_TOKEN, 0.0) != "skip"  # a verify the block makes no longer: 0.05 >= 0.05


def test_skipped_request_is_probed_less_and_less_often() -> None:
    gate = DraftGate(prior_accepted=0.0, ema=1.0, probe_every=4, max_probe_every=8)
    gate.observe_draft(drafted_rows=1, draft_s=0.05)
    decisions = [(gate.decide("chat", T_TOKEN, T_EXTRA) != "skip") for _ in range(28)]
    # probes after 4 skipped steps, then 8, then at the cap of 8
    assert [i for i, d in enumerate(decisions) if d] == [3, 11, 19, 27]
    gate.observe_model("chat", 5)  # the probe found a copyable stretch: draft again
    assert gate.decide("chat", T_TOKEN, T_EXTRA) != "skip"
    gate.observe_model("chat", 0)
    gate.observe_model("chat", 0)
    assert [(gate.decide("chat", T_TOKEN, T_EXTRA) != "skip") for _ in range(4)] == [False, False, False, True]  # interval reset
    gate.forget("chat")
    assert gate.expected("chat") == gate.global_acc


def test_the_confidence_expectation_keeps_a_paying_request_drafting() -> None:
    # Blocks of a request whose mean pays (1.1 accepted, the cost needs 0.6): half accept
    # nothing, a few accept several, and the confidence head expects about 1.1 for each. The
    # counts alone dip below the threshold after a few empty blocks and the request is skipped;
    # averaged with the head's expectation the estimate stays above it.
    counts = [0, 2, 0, 0, 0, 3, 0, 1, 0, 0, 4, 0, 0, 0, 2, 1]  # mean 0.81
    def skips(estimate: str) -> int:
        gate = DraftGate(prior_accepted=1.1, ema=0.3, estimate=estimate)  # type: ignore[arg-type]
        gate.observe_draft(drafted_rows=1, draft_s=0.01)
        n = 0
        for c in counts:
            n += gate.decide("r", T_TOKEN, 0.02) == "skip"  # cost 0.03 s: pays above 0.6 accepted
            gate.observe_model("r", c, expected=1.1)
        return n
    assert skips("accepted") >= 4
    assert skips("confidence") == 0
    # without an expectation (a drafter without a confidence head) the count is the sample
    gate = DraftGate(prior_accepted=1.0, ema=1.0)
    gate.observe_model("r", 0, expected=None)
    assert gate.expected("r") == 0.0
    gate.observe_model("r", 0, expected=2.0)
    assert gate.expected("r") == 1.0


def test_draft_time_is_an_ema_per_drafted_request() -> None:
    gate = DraftGate(time_ema=0.5)
    gate.observe_draft(drafted_rows=0, draft_s=1.0)  # nothing drafted: nothing learned
    assert gate.t_draft is None
    gate.observe_draft(drafted_rows=2, draft_s=0.2)
    gate.observe_draft(drafted_rows=1, draft_s=0.3)
    assert gate.t_draft == pytest.approx(0.5 * 0.1 + 0.5 * 0.3)


@pytest.mark.parametrize("ragged", [True, False])
def test_the_gate_prices_verify_with_the_one_step_cost_model(ragged: bool) -> None:
    """On the linear prior t(B) = 1 + 0.25 (B - 1): a block of 7 adds 7 positions (ragged) or
    pads every row to 8 (uniform, the cost shared by the 4 rows)."""
    sps = StepCost(None, prior_slope=0.25)
    w = SimpleNamespace(sps=sps, ragged=ragged, block=7, copy_block=7)
    t_token, t_extra = draft_costs(w, 4)
    assert t_token == pytest.approx(sps.step_seconds(4) / 4)
    if ragged:
        assert t_extra == pytest.approx(sps.step_seconds(11) - sps.step_seconds(4))
    else:
        assert t_extra == pytest.approx((sps.step_seconds(32) - sps.step_seconds(4)) / 4)
    assert t_extra > 0


def test_one_slow_drafter_call_does_not_price_drafting_out() -> None:
    """The first call in a process (kernel choice, the whole prompt projected) once cost 2.6 s
    against ~10 ms after; learned as is, the drafter never ran again in the server."""
    gate = DraftGate(time_ema=0.2, t_draft=0.01)  # seeded by the start-up timing
    gate.observe_draft(drafted_rows=1, draft_s=2.6)
    assert gate.t_draft == pytest.approx(0.8 * 0.01 + 0.2 * 0.03)  # counted at most 3x the estimate
    gate.observe_model("r", 1)
    assert gate.decide("r", T_TOKEN, 0.0) == "draft"
    # a drafter that really got slower is followed, a bounded step at a time
    for _ in range(40):
        gate.observe_draft(drafted_rows=1, draft_s=0.2)
    assert gate.t_draft == pytest.approx(0.2, rel=0.01)


def test_decide_names_probes_so_the_width_check_cannot_veto_them() -> None:
    gate = DraftGate(prior_accepted=0.0, ema=1.0, probe_every=2)
    assert gate.decide("r", T_TOKEN, T_EXTRA) == "probe"  # never measured: a probe measures
    gate.observe_draft(drafted_rows=1, draft_s=0.05)
    assert [gate.decide("r", T_TOKEN, T_EXTRA) for _ in range(4)] == ["skip", "probe", "skip", "skip"]


def test_time_drafter_times_a_warmed_steady_call() -> None:
    from sglang_ext.dspark.drafter import DSparkDrafter
    from sglang_ext.spec.draft_gate import time_drafter

    from toy import toy_config

    torch.manual_seed(0)
    d = DSparkDrafter(toy_config())
    d.attach_shared(torch.randn(48, 32), torch.randn(48, 32))
    t = time_drafter(d.eval(), "cpu", context=16, reps=2)
    assert 0.0 < t < 5.0


def test_pricing_the_drafter_call_only_keeps_a_request_whose_blocks_pay_when_cut() -> None:
    # a request whose blocks the head expects 0.4 accepted drafts from: with the whole block's
    # verify priced (0.01 draft + 0.05 verify against 0.05 per token) it is skipped; when the plan
    # cuts the verify from the confidences only the drafter call is priced, and it drafts
    for cost, want in (("block", "skip"), ("draft", "draft")):
        gate = DraftGate(prior_accepted=0.4, ema=1.0, t_draft=0.01, cost=cost)  # type: ignore[arg-type]
        assert gate.cuts_verify == (cost == "draft")
        assert gate.decide("r", T_TOKEN, T_EXTRA) == want
    gate = DraftGate(ema=1.0, t_draft=0.01, cost="draft")
    gate.observe_model("r", 0, expected=0.05, expected_block=0.1)  # 0.1 * 0.05 < 0.01: not even the call pays
    assert gate.decide("r", T_TOKEN, T_EXTRA) == "skip"


def test_the_block_estimate_is_the_heads_expectation_over_the_whole_block() -> None:
    # the verified count is cut where the plan cut the verify: the block's expectation is not
    gate = DraftGate(ema=1.0, estimate="block")
    gate.observe_model("r", 1, expected=0.8, expected_block=2.5)
    assert gate.expected("r") == 2.5
    gate.observe_model("r", 1, expected=0.8, expected_block=None)  # not known: the "confidence" rule
    assert gate.expected("r") == pytest.approx(0.9)


def test_auto_prices_the_drafter_call_alone_only_up_to_its_batch_size() -> None:
    gate = DraftGate(prior_accepted=0.4, ema=1.0, t_draft=0.01, cost="auto", cut_max_batch=1)
    gate.observe_model("r", 0, expected=0.2, expected_block=0.8)
    gate.begin_step(1)
    assert (gate.cost, gate.estimate, gate.cuts_verify) == ("draft", "block", True)
    assert gate.expected("r") == 0.8 and gate.decide("r", T_TOKEN, T_EXTRA) == "draft"
    gate.begin_step(8)
    assert (gate.cost, gate.estimate, gate.cuts_verify) == ("block", "confidence", False)
    assert gate.expected("r") == pytest.approx(0.1) and gate.decide("r", T_TOKEN, T_EXTRA) == "skip"
