"""Prefill pacing (sglang_ext/tiers/pacing.py): promised tiers are prefilled first; a prefill
waits while its stall would break a running promise that waiting can save, never longer than
max_defer_s; SGLang sees the requests that may go, and the held ones come back after."""

from __future__ import annotations

import json
from types import SimpleNamespace

from sglang_ext.tiers.pacing import PrefillPacer, around_prefill, uncached_tokens
from agentserve.profile import Tier
from sglang_ext.tiers.policy import TierPolicy


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def req(rid: str, tier: str, prompt: int, out: int = 0, max_new: int = 64, cached: int = 0) -> SimpleNamespace:
    sp = SimpleNamespace(custom_params={"__agentserve_tier": tier}, max_new_tokens=max_new)
    return SimpleNamespace(rid=rid, origin_input_ids=[1] * prompt, output_ids=[2] * out, sampling_params=sp,
                           num_matched_prefix_tokens=cached)


TIERS = {"interactive": Tier(name="interactive", target_tokens_per_s=12.0, priority=0),
         "standard": Tier(name="standard", target_tokens_per_s=6.0, priority=1), "batch": Tier(name="batch", priority=2)}


def setup(defer_s: float = 10.0, periods: dict[int, float] | None = None) -> tuple[PrefillPacer, Clock, SimpleNamespace]:
    clk = Clock()
    pol = TierPolicy(dict(TIERS), clock=clk)
    flat = {b: 0.1 for b in range(1, 9)}  # unless a test says otherwise, a step costs the same at any B
    pacer = PrefillPacer(pol, max_defer_s=defer_s, margin=0.1, clock=clk, periods=lambda: dict(periods or flat))
    inter = req("i", "interactive", 50, out=4)
    pol.achieved("i", 4, clk.t)  # its first decode step
    clk.t += 1.0
    inter.output_ids = [2] * 19  # 15 tokens in 1 s: 15 tok/s, 45 of 64 left
    return pacer, clk, inter


def rids(xs: list) -> list[str]:
    return [x.rid for x in xs]


def test_a_long_low_tier_prefill_waits_a_short_one_goes() -> None:
    pacer, clk, inter = setup()
    go, held = pacer.plan([inter], [req("b", "batch", 400)])
    assert rids(go) == ["b"] and held == []  # no prefill rate measured yet: nothing is held
    pacer.observe_prefill(200, 1.0)  # 200 tok/s
    # 400 tokens stall 2 s: (15 + 45) / (1 + 3 + 2) = 10 tok/s < 13.2
    go, held = pacer.plan([inter], [req("b", "batch", 400)])
    assert go == [] and rids(held) == ["b"] and pacer.deferred == 1
    # 20 tokens stall 0.1 s: 60 / 4.1 = 14.6 tok/s >= 13.2
    go, held = pacer.plan([inter], [req("c", "batch", 20)])
    assert rids(go) == ["c"] and held == []


def test_the_stall_is_the_uncached_part_and_adds_up_in_order() -> None:
    pacer, clk, inter = setup()
    pacer.observe_prefill(200, 1.0)
    assert uncached_tokens(req("x", "batch", 400, out=3, cached=380)) == 23
    # 400 tokens, 380 cached: a 0.1 s stall, like a 20-token prompt
    assert rids(pacer.plan([inter], [req("b", "batch", 400, cached=380)])[0]) == ["b"]
    # 20-token prompts stall 0.1 s each: five make 0.5 s, 60 / 4.5 = 13.3 >= 13.2; a sixth
    # would make 0.6 s, 60 / 4.6 = 13.04 < 13.2 -> it waits, and so does the one after it
    waiting = [req(f"b{k}", "batch", 20) for k in range(7)]
    go, held = pacer.plan([inter], waiting)
    assert rids(go) == ["b0", "b1", "b2", "b3", "b4"] and rids(held) == ["b5", "b6"]


def test_requests_let_in_slow_the_rest_of_a_promised_answer() -> None:
    # 15 tok/s alone, 45 tokens left; B = 2 steps 1.5x as long as B = 1 (measured)
    pacer, clk, inter = setup(periods={1: 0.1, 2: 0.15, 3: 0.2})
    pacer.observe_prefill(200, 1.0)
    # a 20-token prompt stalls 0.1 s, but then decodes alongside: 60 / (1 + 3 x 1.5 + 0.1) = 10.9 < 13.2
    go, held = pacer.plan([inter], [req("c", "batch", 20)])
    assert go == [] and rids(held) == ["c"]
    flat, _, inter2 = setup()
    flat.observe_prefill(200, 1.0)
    assert rids(flat.plan([inter2], [req("c", "batch", 20)])[0]) == ["c"]  # 60 / 4.1 = 14.6 with a flat cost


def test_promised_tiers_go_first_and_hold_less_important_work_in_the_same_round() -> None:
    pacer, clk, inter = setup()
    pacer.observe_prefill(200, 1.0)
    waiting = [req("b", "batch", 10), req("s", "standard", 10), req("j", "interactive", 10)]
    assert rids(pacer.order(waiting)) == ["j", "s", "b"]
    # nothing running: the interactive request goes; what would delay its first steps waits
    go, held = pacer.plan([], waiting)
    assert rids(go) == ["j"] and rids(held) == ["s", "b"]
    # two of a tier arriving together are prefilled together; a new one without a speed yet
    # does not hold back the next of its tier, only less important work
    go, held = pacer.plan([], [req("j1", "interactive", 400), req("b", "batch", 10), req("j2", "interactive", 400)])
    assert rids(go) == ["j1", "j2"] and rids(held) == ["b"]
    # one already decoding, even without a speed yet, holds the next of its tier back: its
    # answer first, then the other's (interleaved, both would stall)
    fresh = req("k", "interactive", 50, out=1)
    go, held = pacer.plan([fresh], [req("j3", "interactive", 400), req("s", "standard", 10)])
    assert go == [] and rids(held) == ["j3", "s"]
    # a running request of a tier without a target holds nothing back (nor is the cache matched)
    matched: list[list[str]] = []
    go, held = pacer.plan([req("x", "batch", 10, out=5)], [req("b", "batch", 400)], match=lambda rs: matched.append(rids(rs)))
    assert rids(go) == ["b"] and held == [] and matched == []
    pacer.plan([inter], [req("b", "batch", 400)], match=lambda rs: matched.append(rids(rs)))
    assert matched == [["b"]]  # a promise is running: the stall is measured on fresh cache hits


def test_same_tier_waits_for_a_running_promise_more_important_never_does() -> None:
    pacer, clk, inter = setup()
    pacer.observe_prefill(200, 1.0)
    go, held = pacer.plan([inter], [req("j", "interactive", 400)])  # same tier: 2 s would break it
    assert go == [] and rids(held) == ["j"]
    std = req("s0", "standard", 50, out=4)
    pacer.policy.achieved("s0", 4, clk.t)
    clk.t += 1.0
    std.output_ids = [2] * 10  # 6 tok/s, far behind 6.6 with the stall
    go, held = pacer.plan([std], [req("j", "interactive", 400)])
    assert rids(go) == ["j"]  # an interactive prefill never waits for a standard stream


def test_only_a_promise_that_waiting_can_save_holds_others() -> None:
    # 2 tok/s at 8 running, x4 alone: (4 + 56) / (2 + 56 / 8) = 6.7 < 13.2 -> not held for it
    pacer, clk, inter = setup(periods={8: 0.4, 1: 0.1})
    pacer.observe_prefill(200, 1.0)
    slow = req("i", "interactive", 50, out=4)
    pacer.policy._start["i"] = (clk.t - 2.0, 4)
    slow.output_ids = [2] * 8  # 4 tokens in 2 s
    others = [req(f"b{k}", "batch", 10, out=3) for k in range(7)]
    assert rids(pacer.plan([slow, *others], [req("b", "batch", 400)])[0]) == ["b"]
    # 4.5 tok/s at 8 running, x4 alone: (9 + 51) / (2 + 51 / 18) = 12.4 -- under target + margin
    # (13.2) but over the target itself (12): it can still keep its promise, so it is held for
    slow.output_ids = [2] * 13
    go, held = pacer.plan([slow, *others], [req("b", "batch", 400)])
    assert go == [] and rids(held) == ["b"]
    # 10 tok/s at 8 running, x4 alone (measured periods): (20 + 40) / (2 + 40 / 40) = 20 -> saved
    slow.output_ids = [2] * 24
    go, held = pacer.plan([slow, *others], [req("b", "batch", 400)])
    assert go == [] and rids(held) == ["b"]


def test_nothing_waits_longer_than_three_times_max_defer() -> None:
    pacer, clk, inter = setup(defer_s=5.0)
    pacer.observe_prefill(200, 1.0)
    fresh = req("k", "interactive", 50, out=1)  # decoding, no speed yet: counts as exactly on target
    waiting = [req("b", "batch", 400)]
    assert pacer.plan([fresh], waiting)[1]
    clk.t += 5.0  # overdue, but it would stall an answer already decoding
    assert pacer.plan([fresh], waiting)[1]
    clk.t += 9.9
    assert pacer.plan([fresh], waiting)[1]
    clk.t += 0.1
    assert rids(pacer.plan([fresh], waiting)[0]) == ["b"]  # waited 3 x max_defer_s: it goes now
    late = [req(f"l{k}", "batch", 400) for k in range(3)]
    assert pacer.plan([fresh], late)[1]
    clk.t += 15.0  # all three past the limit: one goes per decode step, not all three into one stall
    assert pacer.plan([fresh], late)[1] == late  # "b" went before this decode step
    pacer.decode_step()
    go, held = pacer.plan([fresh], late)
    assert rids(go) == ["l0"] and rids(held) == ["l1", "l2"]
    # SGLang runs prefill rounds back to back: the next one waits for a decode step
    assert pacer.plan([fresh], late[1:])[0] == []
    pacer.decode_step()
    assert rids(pacer.plan([fresh], late[1:])[0]) == ["l1"]


def test_overdue_requests_wait_for_a_measured_answer_up_to_the_hard_limit() -> None:
    pacer, clk, inter = setup(defer_s=5.0)
    pacer.observe_prefill(200, 1.0)

    def answering() -> SimpleNamespace:  # a measured answer: 15 tok/s for 1 s, 45 tokens left
        pacer.policy._start["i"] = (clk.t - 1.0, 4)
        return inter

    b = req("b", "batch", 400)  # a 2 s stall: the answer would fall to 10 tok/s
    assert pacer.plan([answering()], [b])[1] == [b]
    clk.t += 5.0  # overdue, but it would break an answer decoding: still held
    pacer.decode_step()
    assert pacer.plan([answering()], [b])[1] == [b]
    # with the next promise's prefill (no speed yet; the stall comes before its first decode
    # step) it goes
    go, held = pacer.plan([], [req("j", "interactive", 50), b])
    assert rids(go) == ["j", "b"] and held == []
    clk.t += 9.9  # 14.9 s < 3 x 5 s: held for an answer decoding
    pacer.decode_step()
    assert pacer.plan([answering()], [b])[1] == [b]
    clk.t += 0.1  # 15 s: it goes whatever it stalls
    pacer.decode_step()
    assert rids(pacer.plan([answering()], [b])[0]) == ["b"]


def test_hook_shows_sglang_what_may_go_and_keeps_what_is_held() -> None:
    pacer, clk, inter = setup()
    pacer.observe_prefill(200, 1.0)
    batch = SimpleNamespace(reqs=[inter])
    seen: list[list[str]] = []

    def original(s, *a, **k):
        seen.append(rids(s.waiting_queue))
        s.waiting_queue = s.waiting_queue[1:]  # SGLang took the first one
        return "prefill", k["running_batch"]

    sched = SimpleNamespace(draft_worker=SimpleNamespace(pacer=pacer), chunked_req=None,
                            waiting_queue=[req("b", "batch", 400)])
    assert around_prefill(original, sched, prefill_delayer_single_pass=None, running_batch=batch) == (None, batch)
    assert rids(sched.waiting_queue) == ["b"] and seen == []  # all held: SGLang not asked
    sched.waiting_queue = [req("b", "batch", 400), req("c", "batch", 10), req("d", "batch", 10)]
    assert around_prefill(original, sched, prefill_delayer_single_pass=None, running_batch=batch) == ("prefill", batch)
    assert seen[-1] == ["c", "d"] and rids(sched.waiting_queue) == ["d", "b"]
    # a chunked prefill under way always continues; SGLang fills its chunk only with what may go
    sched.chunked_req = req("ch", "batch", 2000)
    around_prefill(original, sched, prefill_delayer_single_pass=None, running_batch=batch)
    assert seen[-1] == ["d"] and rids(sched.waiting_queue) == ["b"]
    assert around_prefill(original, sched, prefill_delayer_single_pass=None, running_batch=batch) == ("prefill", batch)
    assert seen[-1] == [] and rids(sched.waiting_queue) == ["b"]  # all held, the chunk goes on alone
    # a promised request in the chunk: what would delay its first steps waits
    sched.chunked_req, batch.reqs = req("cj", "interactive", 2000), []
    sched.waiting_queue = [req("e", "batch", 10)]
    around_prefill(original, sched, prefill_delayer_single_pass=None, running_batch=batch)
    assert seen[-1] == [] and rids(sched.waiting_queue) == ["e"]
    sched.chunked_req, sched.draft_worker = None, SimpleNamespace(pacer=None)  # plain servers
    sched.waiting_queue = [req("b", "batch", 400), req("j", "interactive", 10)]
    around_prefill(original, sched, prefill_delayer_single_pass=None, running_batch=batch)
    assert seen[-1] == ["b", "j"] and len(seen) == 5  # SGLang's own order


def test_a_failing_plan_falls_back_to_sglang() -> None:
    pacer, clk, inter = setup()
    pacer.observe_prefill(200, 1.0)
    pacer.plan = None  # type: ignore[assignment]  # calling it raises
    sched = SimpleNamespace(draft_worker=SimpleNamespace(pacer=pacer), chunked_req=None,
                            waiting_queue=[req("b", "batch", 400)])
    out = around_prefill(lambda s, *a, **k: ("prefill", k["running_batch"]), sched,
                         prefill_delayer_single_pass=None, running_batch=SimpleNamespace(reqs=[inter]))
    assert out[0] == "prefill" and rids(sched.waiting_queue) == ["b"]


def test_a_promise_slowed_by_its_own_tier_is_held_for() -> None:
    # x: 8 tok/s at B = 2 beside a fast answer of its tier, 36 tokens left; a step at B = 1 takes
    # half as long (measured), so alone it would make 16: (8 + 36) / (1 + 36 / 16) = 13.5 >= 12
    pacer, clk, _ = setup(periods={1: 0.07, 2: 0.14, 3: 0.14})
    pacer.observe_prefill(200, 1.0)
    x, y = req("x", "interactive", 50, max_new=48), req("y", "interactive", 50, max_new=48)
    pacer.policy._start.update({"x": (clk.t - 1.0, 4), "y": (clk.t - 1.0, 4)})
    x.output_ids, y.output_ids = [2] * 12, [2] * 44  # y: 40 tok/s, 4 tokens left
    # a 0.1 s prefill: y keeps its slack, x (44 / (1 + 4.5 + 0.1) = 7.9) would fall further behind
    go, held = pacer.plan([x, y], [req("c", "batch", 20)])
    assert go == [] and rids(held) == ["c"]
    # 4 tok/s, 40 tokens left: (4 + 40) / (1 + 40 / 8) = 7.3 even alone: nothing waits for x
    x.output_ids = [2] * 8
    assert rids(pacer.plan([x, y], [req("c", "batch", 20)])[0]) == ["c"]


def test_tokens_per_step_tell_what_a_request_makes_alone() -> None:
    # x: 5 tok/s so far at B = 3 (it was stalled), 1.1 tokens per step; a step takes 0.06 s at
    # B = 1 and 0.15 s at B = 3 (prefills left out). Alone it makes 1.1 / 0.06 = 18.3 tok/s:
    # (5 + 39) / (1 + 39 / 18.3) = 14.1 >= 12, so it is held for; from its speed so far
    # (5 x 0.15 / 0.06 = 12.5: 44 / (1 + 39 / 12.5) = 10.7) it would look lost
    periods = {1: 0.06, 3: 0.15}
    clk = Clock()
    pol = TierPolicy(dict(TIERS), clock=clk)
    taus = {"x": 1.1}
    pacer = PrefillPacer(pol, max_defer_s=10.0, margin=0.1, clock=clk, periods=lambda: periods, tau=taus.get)
    pacer.observe_prefill(200, 1.0)
    x = req("x", "interactive", 50, out=9, max_new=48)
    pol._start["x"] = (clk.t - 1.0, 4)
    running = [x, req("b1", "batch", 10, out=3), req("b2", "batch", 10, out=3)]
    go, held = pacer.plan(running, [req("c", "batch", 20)])
    assert go == [] and rids(held) == ["c"]
    taus.clear()  # no tokens per step known: its speed so far decides
    assert rids(pacer.plan(running, [req("c", "batch", 20)])[0]) == ["c"]


def test_a_request_whose_drafts_do_not_pay_gets_plain_decodings_speed_alone() -> None:
    # x: 1.0 token per step, 8.3 tok/s so far at B = 2 beside wide verifies, 28 tokens left. The
    # mean step at B = 1 (mostly wide verifies) takes 0.1 s: 10 tok/s, lost; but a plain step at
    # B = 1 takes 0.055 s: 18 tok/s, (10 + 28) / (1.2 + 28 / 18) = 13.8 >= 12, so it is held for
    clk = Clock()
    pol = TierPolicy(dict(TIERS), clock=clk)
    plain: dict[int, float] = {}
    pacer = PrefillPacer(pol, max_defer_s=10.0, margin=0.1, clock=clk, periods=lambda: {1: 0.1, 2: 0.12},
                         tau={"x": 1.0}.get, plain_periods=lambda: plain)
    pacer.observe_prefill(200, 1.0)
    x = req("x", "interactive", 50, out=14, max_new=42)
    pol._start["x"] = (clk.t - 1.2, 4)
    running = [x, req("b1", "batch", 10, out=3)]
    assert rids(pacer.plan(running, [req("c", "batch", 20)])[0]) == ["c"]  # looks lost
    plain[1] = 0.055
    go, held = pacer.plan(running, [req("c", "batch", 20)])
    assert go == [] and rids(held) == ["c"]


def test_with_a_step_trace_each_plan_writes_its_decisions(tmp_path, monkeypatch) -> None:
    from sglang_ext.spec import stats as worker_metrics

    path = tmp_path / "trace.jsonl"
    monkeypatch.setattr(worker_metrics, "_trace_path", str(path))
    pacer, clk, inter = setup()
    pacer.observe_prefill(200, 1.0)
    pacer.plan([inter], [req("b", "batch", 400), req("c", "batch", 10)])
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert line["kind"] == "pace" and line["running"] == ["i"] and line["promises"][0][-1] == "i"
    assert [(w[0], w[-1]) for w in line["waiting"]] == [("b", "held"), ("c", "go")]
    assert line["waiting"][0][3] == [True]  # it would break the answer decoding
