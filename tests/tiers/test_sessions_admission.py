"""Sessions, tier admission and tier-aware scheduler inputs, without a server."""

from __future__ import annotations

import asyncio

import pytest

from agentserve.profile import Tier
import torch

from sglang_ext.tiers.admission import Overloaded, TierGate
from sglang_ext.http.middleware import tag_request
from sglang_ext.dspark.scheduler import SchedulerInput, schedule_algorithm1
from sglang_ext.http.sessions import SessionError, SessionStore
from sglang_ext.tiers.policy import TierInfo, TierPolicy


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_session_lifecycle_expiry_and_limits() -> None:
    clk = Clock()
    store = SessionStore(ttl_s=60, max_sessions=2, clock=clk)
    a = store.open("agent-a")
    store.use(a.id, "agent-a")
    assert store.get(a.id).requests == 1
    with pytest.raises(SessionError) as e:
        store.use(a.id, "agent-b")
    assert e.value.status == 403 and e.value.param == "x-session-id" and "agent-a" in e.value.message
    b = store.open("agent-b", ttl_s=10)
    with pytest.raises(SessionError) as e:
        store.open("agent-c")
    assert e.value.status == 429 and "max_sessions" in e.value.message
    with pytest.raises(SessionError) as e:
        store.open("agent-c", ttl_s=3600)
    assert e.value.param == "ttl_s"
    clk.t += 30  # b idles past its own 10 s; a is renewed by use
    store.use(a.id, "agent-a")
    with pytest.raises(SessionError) as e:
        store.use(b.id, "agent-b")
    assert e.value.status == 404 and "expired" in e.value.message
    clk.t += 61
    with pytest.raises(SessionError):
        store.get(a.id)
    assert len(store) == 0 and store.expired_total == 2
    c = store.open("agent-c")
    assert store.close(c.id).id == c.id
    with pytest.raises(SessionError):
        store.close(c.id)


TIERS = [Tier(**t) for t in [{"name": "interactive", "target_tokens_per_s": 10.0, "priority": 0, "max_concurrency": 1, "on_overload": "reject"},
         {"name": "standard", "target_tokens_per_s": 5.0, "priority": 1, "on_overload": "queue", "queue_timeout_s": 0.3},
         {"name": "batch", "priority": 2}]]


def test_gate_rejects_over_max_concurrency_and_names_the_tier() -> None:
    async def run() -> None:
        gate = TierGate(TIERS)
        assert await gate.admit("interactive") is False
        with pytest.raises(Overloaded) as e:
            await gate.admit("interactive")
        assert e.value.status == 429 and "max_concurrency 1" in e.value.message
        await gate.release("interactive", 12.0)
        assert await gate.admit("interactive") is False
        snap = {t["name"]: t for t in gate.snapshot()}
        assert snap["interactive"]["admitted"] == 2 and snap["interactive"]["rejected"] == 1
        assert await gate.admit(None) is False and await gate.admit("unknown") is False  # untiered: no gate

    asyncio.run(run())


def test_gate_protects_a_tier_below_its_target_and_queues_in_priority_order() -> None:
    async def run() -> None:
        clk = Clock()
        gate = TierGate(TIERS, clock=clk)
        await gate.admit("interactive")
        await gate.release("interactive", 4.0)  # missed its 10 tok/s target
        await gate.admit("interactive")  # one interactive request running, attainment 0%
        assert "below its 10 tok/s target" in gate.blocked_by("standard")
        assert gate.blocked_by("batch") is not None
        # standard queues, then times out with 503 naming why
        with pytest.raises(Overloaded) as e:
            await gate.admit("standard")
        assert e.value.status == 503 and "queue_timeout_s" in e.value.message
        # a queued standard request starts once the interactive request has finished
        waiter = asyncio.create_task(gate.admit("standard"))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await gate.release("interactive", 11.0)
        assert await asyncio.wait_for(waiter, 1.0) is True
        # attainment recovers once the window forgets the slow request
        clk.t += 120
        await gate.admit("interactive")
        assert gate.blocked_by("standard") is None
        snap = {t["name"]: t for t in gate.snapshot()}
        assert snap["standard"]["queued"] == 2 and snap["standard"]["timed_out"] == 1 and snap["standard"]["admitted"] == 1

    asyncio.run(run())


def test_tags_go_into_custom_params() -> None:
    tags = {"__agentserve_agent": "a", "__agentserve_tier": "t", "__agentserve_session": ""}
    chat = {"messages": [], "custom_params": {"mine": 1}}
    tag_request("/v1/chat/completions", chat, tags)
    assert chat["custom_params"] == {"mine": 1, **tags}
    gen = {"text": "x"}
    tag_request("/generate", gen, tags)
    assert gen["sampling_params"]["custom_params"] == tags
    batch = {"text": ["x", "y"], "sampling_params": [{}, {"temperature": 0}]}
    tag_request("/generate", batch, tags)
    assert all(sp["custom_params"] == tags for sp in batch["sampling_params"])


def test_tier_policy_weights_and_caps_follow_past_speed_only() -> None:
    clk = Clock()
    pol = TierPolicy({"interactive": TierInfo(10.0, 0), "standard": TierInfo(5.0, 1), "batch": TierInfo(None, 2)}, clock=clk)
    rids, tiers = ["i", "s", "b"], ["interactive", "standard", "batch"]
    w, cap = pol.inputs(rids, tiers, [0, 0, 0])  # first step: no speed known yet
    assert w.tolist() == [4.0, 2.0, 1.0] and cap is None
    clk.t += 2.0  # interactive made 8 tokens in 2 s: 4 tok/s, behind its 10 tok/s
    w, cap = pol.inputs(rids, tiers, [8, 20, 20])
    assert w[0] == pytest.approx(4.0 * 2.5) and w[1] == 2.0
    assert cap.tolist() == [1 << 30, 0, 0]  # less important tiers verify no drafts this step
    # the cap keeps the verified batch small: lower tiers get l = 0 whatever their confidences
    conf = torch.full((3, 4), 0.9)
    lens = schedule_algorithm1(SchedulerInput(conf, weight=w, max_len=torch.minimum(torch.full((3,), 4), cap)), lambda b: 1.0 / (1 + 0.05 * b))
    assert lens[1] == 0 and lens[2] == 0 and lens[0] > 0
    clk.t += 1.0
    w, cap = pol.inputs(rids, tiers, [40, 30, 30])  # 40 tokens in 3 s: above target
    assert cap is None and w.tolist() == [4.0, 2.0, 1.0]
    pol.forget("i")
    assert "i" not in pol._start
    assert TierPolicy({}).inputs(rids, tiers, [1, 2, 3]) == (None, None)
