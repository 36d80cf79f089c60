"""Prefill pacing (sglang_ext/prefill_pacing.py): a less important prefill waits while it would
break a running promise, never a promised one, never longer than max_defer_s."""

from __future__ import annotations

from types import SimpleNamespace

from sglang_ext.prefill_pacing import PrefillPacer, around_prefill
from sglang_ext.tier_policy import TierInfo, TierPolicy


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def req(rid: str, tier: str, prompt: int, out: int = 0, max_new: int = 64) -> SimpleNamespace:
    sp = SimpleNamespace(custom_params={"__agentserve_tier": tier}, max_new_tokens=max_new)
    return SimpleNamespace(rid=rid, origin_input_ids=[1] * prompt, output_ids=[2] * out, sampling_params=sp,
                           prefix_indices=[])


def setup(defer_s: float = 10.0) -> tuple[PrefillPacer, Clock, SimpleNamespace]:
    clk = Clock()
    pol = TierPolicy({"interactive": TierInfo(12.0, 0), "batch": TierInfo(None, 2)}, clock=clk)
    pacer = PrefillPacer(pol, max_defer_s=defer_s, margin=0.1, clock=clk)
    inter = req("i", "interactive", 50, out=4)
    pol.achieved("i", 4, clk.t)  # its first decode step
    clk.t += 1.0
    inter.output_ids = [2] * 19  # 15 tokens in 1 s: 15 tok/s, 45 of 64 left
    return pacer, clk, inter


def test_a_long_low_tier_prefill_waits_a_short_one_goes() -> None:
    pacer, clk, inter = setup()
    assert not pacer.defer([inter], [req("b", "batch", 400)])  # no prefill rate measured yet
    pacer.observe_prefill(200, 1.0)  # 200 tok/s
    # 400 tokens stall 2 s: (15 + 45) / (1 + 3 + 2) = 10 tok/s < 13.2
    assert pacer.defer([inter], [req("b", "batch", 400)]) and pacer.deferred == 1
    # 20 tokens stall 0.1 s: 60 / 4.1 = 14.6 tok/s >= 13.2
    assert not pacer.defer([inter], [req("c", "batch", 20)])


def test_promised_prefills_and_long_waits_are_never_held() -> None:
    pacer, clk, inter = setup(defer_s=5.0)
    pacer.observe_prefill(200, 1.0)
    assert not pacer.defer([inter], [req("j", "interactive", 400)])  # a promise of its own
    assert not pacer.defer([req("x", "batch", 10, out=5)], [req("b", "batch", 400)])  # no promise running
    waiting = [req("b", "batch", 400)]
    assert pacer.defer([inter], waiting)
    clk.t += 5.0
    inter.output_ids = [2] * 20  # still behind
    assert not pacer.defer([inter], waiting)  # waited max_defer_s: it goes now


def test_hook_holds_back_or_calls_through() -> None:
    pacer, clk, inter = setup()
    pacer.observe_prefill(200, 1.0)
    batch = SimpleNamespace(reqs=[inter])
    sched = SimpleNamespace(draft_worker=SimpleNamespace(pacer=pacer), chunked_req=None,
                            waiting_queue=[req("b", "batch", 400)])
    calls = []

    def original(s, *a, **k):
        calls.append(1)
        return "prefill", k["running_batch"]

    assert around_prefill(original, sched, prefill_delayer_single_pass=None, running_batch=batch) == (None, batch)
    sched.waiting_queue = [req("j", "interactive", 400)]
    assert around_prefill(original, sched, prefill_delayer_single_pass=None, running_batch=batch) == ("prefill", batch)
    sched.chunked_req = object()  # a chunked prefill under way always continues
    sched.waiting_queue = [req("b2", "batch", 400)]
    around_prefill(original, sched, prefill_delayer_single_pass=None, running_batch=batch)
    sched.chunked_req, sched.draft_worker = None, SimpleNamespace(pacer=None)  # plain servers
    around_prefill(original, sched, prefill_delayer_single_pass=None, running_batch=batch)
    assert len(calls) == 3
