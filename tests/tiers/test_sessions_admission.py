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
from sglang_ext.tiers.policy import TierPolicy


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
    assert e.value.status == 403 and e.value.param == "x-session-id" and "another agent" in e.value.message
    assert "agent-a" not in e.value.message  # whose it is is not for another agent to learn
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
    # the two that expired and the one closed, each once, for the scheduler's draft index
    ended = store.take_ended()
    assert sorted(ended) == sorted([a.id, b.id, c.id]) and store.take_ended() == []
    store.give_back(ended)  # the request that carried them was refused: they go with the next one
    assert store.take_ended() == ended


TIERS = [Tier(**t) for t in [{"name": "interactive", "target_tokens_per_s": 10.0, "priority": 0, "max_concurrency": 1, "on_overload": "reject"},
         {"name": "standard", "target_tokens_per_s": 5.0, "priority": 1, "on_overload": "queue", "queue_timeout_s": 0.3},
         {"name": "batch", "priority": 2, "min_share": 0}]]  # share floors: test_no_tier_starves


def test_gate_rejects_over_max_concurrency_and_names_the_tier() -> None:
    async def run() -> None:
        gate = TierGate(TIERS)
        assert await gate.admit("interactive") is False
        with pytest.raises(Overloaded) as e:
            await gate.admit("interactive")
        assert e.value.status == 429 and "max_concurrency 1" in e.value.message and not e.value.timed_out
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
        assert "tier 'interactive' is below its promise (attainment 0%)" in gate.blocked_by("standard")
        assert gate.blocked_by("batch") is not None
        # standard queues, then times out with 429 naming why (a refusal, not a server error)
        with pytest.raises(Overloaded) as e:
            await gate.admit("standard")
        assert e.value.status == 429 and "queue_timeout_s" in e.value.message and e.value.timed_out
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
    pol = TierPolicy({t.name: t for t in TIERS}, clock=clk)
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


def test_a_tiers_own_overload_queues_its_new_requests_and_learns_back() -> None:
    """32 agents in one tier: when its requests miss under their own load, the next ones wait
    (queue) or are refused (reject), named as the tier's own load; met requests raise the limit."""
    async def run() -> None:
        tiers = [Tier(name="standard", target_tokens_per_s=10.0, priority=1, queue_timeout_s=0.2),
                 Tier(name="strict", target_tokens_per_s=10.0, priority=1, on_overload="reject")]
        gate = TierGate(tiers)
        for _ in range(8):
            assert await gate.admit("standard") is False  # nothing learned yet: all admitted
        await gate.release("standard", 6.0)  # missed with 8 running: the limit becomes 6
        st = gate.tiers["standard"]
        assert st.limit == 6 and st.running == 7
        assert "as many as keep its promise" in gate.blocked_by("standard")
        with pytest.raises(Overloaded) as e:
            await gate.admit("standard")  # queued, then 429 after queue_timeout_s
        assert e.value.status == 429 and "learned limit 6.0" in e.value.message
        await gate.release("standard", 12.0)  # met with 7 running: +1/6
        assert st.limit == pytest.approx(6 + 1 / 6) and gate.blocked_by("standard") is None
        assert st.counts["held_by_own_load"] == 1 and st.counts["queued"] == 1 and st.counts["timed_out"] == 1
        # a reject tier answers 429 at once for the same reason
        for _ in range(3):
            await gate.admit("strict")
        await gate.release("strict", 1.0)  # 3 running: limit 2
        with pytest.raises(Overloaded) as e:
            await gate.admit("strict")
        assert e.value.status == 429 and "tier 'strict' has 2 running" in e.value.message
        # a miss with one request of the tier running is not its own load: the limit is forgotten
        await gate.release("strict", 1.0)
        await gate.release("strict", 1.0)
        assert gate.tiers["strict"].limit is None and gate.blocked_by("strict") is None

    asyncio.run(run())


def test_time_to_first_token_counts_the_queue_wait() -> None:
    async def run() -> None:
        clk = Clock()
        tiers = [Tier(name="chat", target_tokens_per_s=5.0, target_ttft_s=1.0, priority=0),
                 Tier(name="batch", priority=1, min_share=0)]
        gate = TierGate(tiers, clock=clk)
        await gate.admit("chat")
        # fast decode but a first token after 1.5 s, 1.2 s of it queued here: missed, and the
        # tier's limit is not taught (the server's own part, 0.3 s, kept the promise)
        await gate.release("chat", 50.0, ttft_s=1.5, waited_s=1.2)
        chat = gate.tiers["chat"]
        assert chat.attainment(clk(), 60) == 0.0 and chat.limit is None
        await gate.admit("chat")
        assert "attainment 0%" in gate.blocked_by("batch")  # lower tiers wait for the promise
        await gate.release("chat", 50.0, ttft_s=0.4)
        assert chat.attainment(clk(), 60) == 0.5
        snap = {t["name"]: t for t in gate.snapshot()}
        assert snap["chat"]["target_ttft_s"] == 1.0 and snap["chat"]["attainment"] == 0.5

    asyncio.run(run())


def test_the_queue_serves_the_most_urgent_first_and_a_late_start_counts() -> None:
    async def run() -> None:
        tiers = [Tier(name="a", target_tokens_per_s=5.0, priority=0, max_concurrency=1),
                 Tier(name="fast", target_ttft_s=0.05, priority=1, max_concurrency=1),
                 Tier(name="slow", target_ttft_s=30.0, priority=1)]
        gate = TierGate(tiers)
        await gate.admit("a")
        await gate.release("a", 1.0)  # tier a is below its promise: priority-1 tiers wait
        await gate.admit("a")
        order: list[str] = []

        async def wait(tier: str) -> None:
            await gate.admit(tier)
            order.append(tier)

        slow = asyncio.create_task(wait("slow"))
        await asyncio.sleep(0.01)
        fast = asyncio.create_task(wait("fast"))  # arrived later, due sooner
        await asyncio.sleep(0.1)
        assert order == []
        gate.tiers["a"].recent.clear()  # a's miss ages out of the window
        await gate.release("a", 9.0)
        await asyncio.wait_for(asyncio.gather(slow, fast), 2.0)
        assert order == ["fast", "slow"]
        assert gate.tiers["fast"].counts["late"] == 1  # waited past its 50 ms: runs, counts as missed

    asyncio.run(run())


def test_no_tier_starves_best_effort_keeps_its_minimum_share() -> None:
    async def run() -> None:
        clk = Clock()
        tiers = [Tier(name="gold", target_tokens_per_s=10.0, priority=0),
                 Tier(name="batch", priority=2, queue_timeout_s=5.0)]  # best effort: 5 % floor by default
        gate = TierGate(tiers, clock=clk, window_s=60.0)
        await gate.admit("gold")
        await gate.release("gold", 1.0)  # gold misses: batch is held back...
        for _ in range(19):
            await gate.admit("gold")
        assert gate.share(gate.tiers["batch"], clk()) == 0.0
        assert gate.blocked_by("batch") is None  # ...except for its floor: 0 of 20 admissions < 5 %
        await gate.admit("batch")
        # 1 of 21 (4.8 %) is still under the floor; at 1 of 20 (5 %) it waits for gold again
        gate.tiers["gold"].starts.popleft()
        assert "below its promise" in gate.blocked_by("batch")
        clk.t += 61  # a new window: nobody admitted, the floor lets batch start
        gate.tiers["gold"].recent.append((clk(), False))
        assert gate.blocked_by("batch") is None
        snap = {t["name"]: t for t in gate.snapshot()}
        assert snap["batch"]["min_share"] == 0.05 and snap["gold"]["min_share"] == 0.0

    asyncio.run(run())


def test_a_promised_lower_tier_keeps_its_minimum_share_too() -> None:
    # behind a top tier whose first answers missed (a cold server), a promised 6 tok/s tier
    # finished nothing in two minutes at 8 clients; the shipped profiles give it min_share 0.05
    async def run() -> None:
        clk = Clock()
        tiers = [Tier(name="gold", target_tokens_per_s=12.0, priority=0),
                 Tier(name="silver", target_tokens_per_s=6.0, priority=1, min_share=0.05),
                 Tier(name="held", target_tokens_per_s=6.0, priority=1)]  # a promised tier: no floor by default
        gate = TierGate(tiers, clock=clk, window_s=60.0)
        await gate.admit("gold")
        await gate.release("gold", 1.0)  # gold misses
        for _ in range(19):
            await gate.admit("gold")
        assert gate.blocked_by("silver") is None  # 0 of 20 admissions < 5 %
        assert "below its promise" in gate.blocked_by("held")

    asyncio.run(run())
