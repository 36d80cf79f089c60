"""The cost-aware drafting gate: skips the model where its drafts do not pay, probes now and
then, and decides from past steps only."""

from __future__ import annotations

from sglang_ext.spec.draft_gate import DraftGate


def _measured(gate: DraftGate, draft_s: float) -> None:
    gate.observe_times(width=8, rows=1, verify_s=0.10, drafted_rows=1, draft_s=draft_s)
    gate.observe_times(width=1, rows=1, verify_s=0.05, drafted_rows=0, draft_s=0.0)


def test_drafts_until_measured_then_follows_cost_and_acceptance() -> None:
    gate = DraftGate(prior_accepted=1.0, ema=1.0)
    assert gate.pays("r")  # nothing measured: draft (and measure)
    _measured(gate, draft_s=0.05)
    # cost = 0.05 draft + (0.10 - 0.05) wider verify = 0.10 s; one accepted token saves 0.05 s
    gate.observe_model("r", 1)
    assert not gate.pays("r")
    gate.observe_model("good", 3)  # 3 * 0.05 = 0.15 s saved > 0.10 s cost
    assert gate.pays("good")


def test_skipped_request_is_probed_less_and_less_often() -> None:
    gate = DraftGate(prior_accepted=0.0, ema=1.0, probe_every=4, max_probe_every=8)
    _measured(gate, draft_s=0.05)
    decisions = [gate.pays("chat") for _ in range(28)]
    # probes after 4 skipped steps, then 8, then at the cap of 8
    assert [i for i, d in enumerate(decisions) if d] == [3, 11, 19, 27]
    gate.observe_model("chat", 5)  # the probe found a copyable stretch: draft again
    assert gate.pays("chat")
    gate.observe_model("chat", 0)
    gate.observe_model("chat", 0)
    assert [gate.pays("chat") for _ in range(4)] == [False, False, False, True]  # interval reset to 4
    gate.forget("chat")
    assert gate.expected("chat") == gate.global_acc


def test_unmeasured_width_one_uses_the_prior_cost_shape() -> None:
    gate = DraftGate(prior_accepted=2.0, ema=1.0, prior_slope=1 / 7)
    gate.observe_times(width=8, rows=2, verify_s=0.2, drafted_rows=2, draft_s=0.02)
    # t(8) = 0.1 per request -> t(1) = 0.05 by the prior; cost 0.01 + 0.05 = 0.06 < 2 * 0.05
    assert gate.w_wide == 8.0
    assert gate.t_one is None and gate.pays("r")
