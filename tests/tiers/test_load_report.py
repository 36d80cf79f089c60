"""Predictive admission: the scheduler's load report, the capacity model and gate rule (c)."""

from __future__ import annotations

import asyncio
import json

import pytest

from agentserve.profile import Tier

from sglang_ext.tiers.admission import Overloaded, TierGate
from sglang_ext.tiers.load_report import CapacityModel, LoadPublisher, report_path


class Clock:
    def __init__(self) -> None:
        self.t = 10.0

    def __call__(self) -> float:
        return self.t


def test_publisher_measures_period_per_batch_and_tau_per_tier(tmp_path) -> None:
    clk = Clock()
    path = tmp_path / "load.json"
    pub = LoadPublisher(path, every_s=0.0, ema=0.5, clock=clk)
    forward = {1: 0.03, 8: 0.06}
    pub.observe(["a"], ["interactive"], [1], lambda: forward)
    for _ in range(3):  # one stream, a step every 40 ms, 3 tokens a step
        clk.t += 0.04
        pub.observe(["a"], ["interactive"], [3], lambda: forward)
    clk.t += 5.0  # idle, then new streams: the gap is not a period
    pub.observe(["b", "c"], ["standard", "standard"], [1, 1], lambda: forward)
    clk.t += 0.1
    pub.observe(["b", "c"], ["standard", "standard"], [1, 1], lambda: forward)
    d = json.loads(path.read_text())
    assert d["count"] == {"1": 3, "2": 1}
    assert d["period"]["1"] == pytest.approx(0.04) and d["period"]["2"] == pytest.approx(0.1)
    assert d["tau"]["interactive"] == pytest.approx(3 - 2 * 0.5 ** 3) and d["tau"]["standard"] == pytest.approx(1.0)
    m = CapacityModel(path)
    assert m.predict("interactive", 1) == pytest.approx(d["tau"]["interactive"] / 0.04)
    # B = 2 has too few samples: the measured B = 1 period scaled by the forward-cost ratio
    assert m.period(2) == pytest.approx(0.04 * (0.03 + 0.03 / 7) / 0.03)


def test_publisher_keeps_the_step_period_without_prefills_and_each_requests_tau() -> None:
    clk = Clock()
    pub = LoadPublisher(None, ema=1.0, clock=clk)
    pub.observe(["a", "b"], ["i", "s"], [1, 1], dict)
    assert pub.request_tau("a") is None  # one step: not yet
    for stall in (0.0, 1.0, 0.0):  # 0.1 s steps, one with a 1 s prefill before it
        clk.t += 0.1 + stall
        pub.observe(["a", "b"], ["i", "s"], [3, 1], dict, stall_s=stall)
    assert pub.period[2] == pytest.approx(0.1) and pub.step_periods() == {2: pytest.approx(0.1)}
    clk.t += 1.1
    pub.observe(["a", "b"], ["i", "s"], [3, 1], dict, stall_s=1.0)
    assert pub.measured_periods()[2] == pytest.approx(1.1)  # what the streams waited
    assert pub.step_periods()[2] == pytest.approx(0.1)  # what a step costs
    assert pub.request_tau("a") == pytest.approx(13 / 5) and pub.request_tau("b") == pytest.approx(1.0)
    assert pub.plain_periods() == {}
    for _ in range(3):  # steps verifying no drafts: cheaper
        clk.t += 0.06
        pub.observe(["a", "b"], ["i", "s"], [1, 1], dict, plain=True)
    assert pub.plain_periods() == {2: pytest.approx(0.06)} and pub.step_periods()[2] == pytest.approx(0.06)


def test_prediction_plans_with_the_slowest_running_request_of_a_tier(tmp_path) -> None:
    clk = Clock()
    path = tmp_path / "load.json"
    pub = LoadPublisher(path, every_s=0.0, ema=0.5, clock=clk)
    forward = {2: 0.05}
    for _ in range(6):  # "copy" copies 4 tokens a step, "prose" gets 1
        clk.t += 0.05
        pub.observe(["copy", "prose"], ["interactive", "interactive"], [4, 1], lambda: forward)
    m = CapacityModel(path)
    m.refresh_s = 0.0
    assert m.data()["tau"]["interactive"] > 1.9  # the mean of 4s and 1s
    assert m.tau("interactive") == pytest.approx(1.0, abs=0.1)  # the request that would miss
    assert m.predict("interactive", 2) == pytest.approx(m.tau("interactive") / 0.05)
    clk.t += 0.05
    pub.observe(["copy"], ["interactive"], [4], lambda: forward)  # "prose" finished
    m._read_at = -1e9
    assert m.tau("interactive") == pytest.approx(4.0, abs=0.1)
    clk.t += 0.05
    pub.observe(["other"], ["batch"], [1], lambda: forward)  # no interactive request runs now
    m._read_at = -1e9
    assert m.tau("interactive") == pytest.approx(m.data()["tau"]["interactive"])


def test_capacity_model_extrapolates_and_knows_nothing_without_a_report(tmp_path) -> None:
    assert CapacityModel(tmp_path / "missing.json").predict("x", 4) is None
    m = CapacityModel.from_report({"period": {"1": 0.03, "4": 0.05}, "count": {"1": 9, "4": 9},
                                   "tau": {"interactive": 1.5}, "tau_all": 1.2, "forward": {"1": 0.03, "4": 0.04}})
    assert m.period(4) == pytest.approx(0.05)
    assert m.period(8) == pytest.approx(0.05 * (0.04 + 4 * 0.01 / 3) / 0.04)  # forward extrapolated linearly
    assert m.predict("interactive", 4) == pytest.approx(1.5 / 0.05)
    assert m.tau("unknown-tier") == 1.2
    assert report_path(31) is None or report_path(31).name == "agentserve-load-31.json"


TIERS = [Tier(**t) for t in [{"name": "interactive", "target_tokens_per_s": 20.0, "priority": 0},
         {"name": "standard", "target_tokens_per_s": 10.0, "priority": 1, "on_overload": "queue", "queue_timeout_s": 0.3},
         {"name": "batch", "priority": 2, "on_overload": "reject", "min_share": 0}]]  # rule (c) alone: no share floor


def test_gate_holds_back_what_would_break_a_promise_before_it_breaks() -> None:
    # period(B) = 20 ms + 10 ms x B; interactive emits 1.2 tokens a step, standard 1.0
    report = {"period": {str(b): 0.02 + 0.01 * b for b in range(1, 9)}, "count": {str(b): 9 for b in range(1, 9)},
              "tau": {"interactive": 1.2, "standard": 1.0, "batch": 1.0}, "forward": {}}
    cap = CapacityModel.from_report(report)

    async def run() -> None:
        gate = TierGate(TIERS, capacity=cap, margin=0.1)
        assert gate.blocked_by("batch") is None  # idle server: always admitted
        for _ in range(3):
            await gate.admit("interactive")
        # 3 running, one more makes B = 4: interactive predicted 1.2 / 0.06 = 20 tok/s < 22 (20 + 10 %): lower tiers wait
        reason = gate.blocked_by("standard")
        assert reason is not None and "tier 'interactive' is predicted at 20.0 tok/s" in reason
        with pytest.raises(Overloaded) as e:
            await gate.admit("batch")
        assert e.value.status == 429 and "predicted" in e.value.message
        # the same tier waits too, rather than slowing the three running ones below target
        assert "tier 'interactive'" in (gate.blocked_by("interactive") or "")
        await gate.release("interactive", 25.0)
        assert gate.blocked_by("standard") is None  # 2 running, B = 3: 1.2 / 0.05 = 24 >= 22
        await gate.admit("standard")
        # a promised request is not held back behind less important work that caused the miss
        assert gate.blocked_by("interactive") is None
        assert gate.blocked_by("batch") is not None

    asyncio.run(run())


def test_gate_without_a_report_is_the_reactive_gate() -> None:
    async def run() -> None:
        gate = TierGate(TIERS, capacity=CapacityModel(None))
        for _ in range(8):
            await gate.admit("interactive")
        assert gate.blocked_by("batch") is None

    asyncio.run(run())


def test_a_promise_already_broken_at_this_load_does_not_serialise_its_own_tier() -> None:
    # a slow machine: even one interactive request is predicted at 1.2 / 0.08 = 15 < 20 tok/s
    report = {"period": {str(b): 0.07 + 0.01 * b for b in range(1, 9)}, "count": {str(b): 9 for b in range(1, 9)},
              "tau": {"interactive": 1.2, "standard": 1.0}, "forward": {}}

    async def run() -> None:
        gate = TierGate(TIERS, capacity=CapacityModel.from_report(report))
        await gate.admit("interactive")
        assert gate.blocked_by("interactive") is None  # holding it back would not give the target back
        assert "predicted" in (gate.blocked_by("standard") or "")  # but less important work waits

    asyncio.run(run())


def test_publisher_reports_the_streams_behind_target(tmp_path) -> None:
    pub = LoadPublisher(tmp_path / "r.json", every_s=0.0)
    pub.observe(["a", "b"], ["interactive", "batch"], [1, 1], lambda: {}, behind={"interactive": 1})
    cap = CapacityModel(tmp_path / "r.json")
    assert cap.behind("interactive") == 1 and cap.behind("batch") == 0
    pub.observe(["a", "b"], ["interactive", "batch"], [1, 1], lambda: {})  # not tier-aware: unknown
    cap._read_at = -1e9
    assert cap.behind("interactive") is None


def test_publisher_reports_each_requests_tau_running_and_finished(tmp_path) -> None:
    clk = Clock()
    path = tmp_path / "load.json"
    pub = LoadPublisher(path, every_s=0.0, ema=0.5, clock=clk)
    for _ in range(4):  # "copy" emits 6 tokens a step, "prose" 1, "std" 2
        clk.t += 0.1
        pub.observe(["copy", "prose", "std"], ["interactive", "interactive", "standard"], [6, 1, 2], lambda: {})
    d = json.loads(path.read_text())
    assert d["tau_recent"] == {}  # nothing finished yet
    assert sorted(d["tau_running"]["interactive"]) == pytest.approx([1.0, 6.0], abs=0.6)
    clk.t += 0.1
    pub.observe(["copy"], ["interactive"], [6], lambda: {})  # "prose" and "std" finished
    d = json.loads(path.read_text())
    assert d["tau_recent"] == {"interactive": [1.0], "standard": [2.0]}  # τ over the whole request
    assert d["tau_running"] == {"interactive": [pytest.approx(6.0, abs=0.6)]}
    clk.t += 0.1
    pub.observe(["next"], ["interactive"], [3], lambda: {})
    assert json.loads(path.read_text())["tau_recent"]["interactive"] == [1.0, 6.0]


def _report(tau_running: dict, tau_recent: dict) -> dict:
    # period(B) = 30 ms + 20 ms x B: 50 ms at B = 1, 90 ms at 3, 190 ms at 8
    return {"period": {str(b): 0.03 + 0.02 * b for b in range(1, 9)}, "count": {str(b): 9 for b in range(1, 9)},
            "tau": {"interactive": 4.0, "standard": 1.0}, "tau_min": {"interactive": min(tau_running["interactive"])},
            "tau_running": tau_running, "tau_recent": tau_recent, "forward": {}}


def test_capacity_model_predicts_a_tiers_attainment_from_each_requests_tau() -> None:
    m = CapacityModel.from_report(_report({"interactive": [6.0, 6.0]}, {"interactive": [1.0, 2.0, 6.0, 8.0]}))
    # 22 tok/s at B = 3 (90 ms) needs τ >= 1.98: 1.0 misses; at B = 8 (190 ms) τ >= 4.18: 1.0 and 2.0 miss
    assert m.attainment("interactive", 3, 22.0) == pytest.approx(5 / 6)
    assert m.attainment("interactive", 8, 22.0) == pytest.approx(4 / 6)
    assert m.attainment("standard", 3, 5.0) is None  # no request of the tier known: no prediction
    assert CapacityModel.from_report(_report({"interactive": [6.0]}, {"interactive": [1.0, 2.0]})).attainment(
        "interactive", 3, 22.0) is None  # 3 samples are too few


def test_attainment_plan_holds_back_for_the_answers_to_come_not_for_a_lost_one() -> None:
    async def running(gate: TierGate, n_inter: int, n_batch: int) -> TierGate:
        gate.tiers["interactive"].running += n_inter  # admitted earlier
        gate.tiers["batch"].running += n_batch
        return gate

    async def run() -> None:
        # Both running interactive requests copy 6 tokens a step; the tier's recent answers were
        # prose (τ 2.5). With 4 running, one more makes B = 5 (130 ms): the 4 prose answers fall
        # from 2.5 / 0.11 = 22.7 to 19.2 tok/s, below 22 (20 + 10 %), and batch is held back.
        cap = CapacityModel.from_report(_report({"interactive": [6.0, 6.0]}, {"interactive": [2.5, 2.5, 2.5, 2.5]}))
        gate = await running(TierGate(TIERS, capacity=cap), 2, 1)
        assert gate.blocked_by("batch") is None  # B = 4: every answer still at 22.7 tok/s
        gate.tiers["batch"].running += 1
        reason = gate.blocked_by("batch")
        assert reason is not None and "keep 33% of its requests" in reason and "against 100% with 4" in reason
        # A running request whose text never drafts (τ 1: 1 / 0.07 = 14 < 22 with B = 2) misses at
        # every batch size: the attainment plan does not hold other tiers back for it while the
        # other requests keep their speed.
        cap = CapacityModel.from_report(_report({"interactive": [1.0, 8.0]}, {"interactive": [8.0, 8.0, 8.0]}))
        gate = await running(TierGate(TIERS, capacity=cap), 2, 0)
        assert gate.blocked_by("batch") is None  # 4 of 5 keep 22 tok/s at B = 3 as at B = 2
        gate.tiers["batch"].running += 4
        assert gate.blocked_by("batch") is None  # B = 7 (170 ms): τ 8 gives 47 tok/s, still 4 of 5
        # the mean-τ prediction is the fallback while a tier has fewer than 4 known requests
        few = CapacityModel.from_report(_report({"interactive": [1.0, 8.0]}, {}))
        gate = await running(TierGate(TIERS, capacity=few), 2, 0)
        assert "predicted at" in (gate.blocked_by("batch") or "")

    asyncio.run(run())


def test_per_agent_tau_and_sources_reach_the_http_side_after_the_last_step(tmp_path) -> None:
    """The agent table's τ and copy share come through the load report (the one channel from
    the scheduler); a step that is not due to be written is written shortly after anyway."""
    import time as _time

    path = tmp_path / "r.json"
    pub = LoadPublisher(path, every_s=0.2)
    cap = CapacityModel(path, refresh_s=0.0)
    pub.observe_agents(["alice", "bob"], [5, 1], [4, 0], ["session", "model"])
    pub.observe(["r1", "r2"], ["t", "t"], [5, 1], lambda: {})  # due: written now
    assert cap.agent_spec()["alice"] == {"accept_length": 5.0, "copy_share": 1.0,
                                         "source_share": {"session": 1.0, "shared": 0.0, "radix": 0.0, "model": 0.0}}
    assert cap.agent_spec()["bob"]["copy_share"] is None  # nothing accepted yet
    pub.observe_agents(["alice", "bob"], [3, 3], [2, 2], ["shared", "model"])
    pub.observe(["r1", "r2"], ["t", "t"], [3, 3], lambda: {})  # not due: the trailing write carries it
    deadline = _time.monotonic() + 5
    while cap.agent_spec()["alice"]["accept_length"] == 5.0 and _time.monotonic() < deadline:
        _time.sleep(0.05)
    alice = cap.agent_spec()["alice"]
    assert alice["accept_length"] == 4.0 and alice["source_share"]["shared"] == pytest.approx(2 / 6)
    assert cap.agent_spec()["bob"] == {"accept_length": 2.0, "copy_share": 0.0,
                                       "source_share": {"session": 0.0, "shared": 0.0, "radix": 0.0, "model": 1.0}}
    assert CapacityModel(tmp_path / "none.json").agent_spec() == {}


def test_a_tier_admitting_at_plain_speed_starts_only_what_plain_decoding_keeps_on_target() -> None:
    # period(B) = 20 ms + 10 ms x B; the tier copies 4 tokens a step (τ 4), target 20 tok/s (+10 %):
    # priced at its τ, B = 4 makes 4 / 0.06 = 67 tok/s; at plain speed only B <= 2 (1 / 0.04 = 25)
    report = {"period": {str(b): 0.02 + 0.01 * b for b in range(1, 9)}, "count": {str(b): 9 for b in range(1, 9)},
              "tau": {"interactive": 4.0}, "forward": {}}
    strict = Tier(name="interactive", target_tokens_per_s=20.0, admit_at="plain_speed")

    async def run(tier: Tier) -> int:
        gate = TierGate([tier], capacity=CapacityModel.from_report(report), margin=0.1)
        n = 0
        while n < 8 and gate.blocked_by("interactive") is None:
            await gate.admit("interactive")
            n += 1
        return n

    assert asyncio.run(run(TIERS[0].model_copy(update={"target_tokens_per_s": 20.0}))) == 8
    assert asyncio.run(run(strict)) == 2
    gate = TierGate([strict], capacity=CapacityModel.from_report(report), margin=0.1)
    asyncio.run(gate.admit("interactive"))
    asyncio.run(gate.admit("interactive"))
    assert "admit_at: plain_speed" in (gate.blocked_by("interactive") or "")
