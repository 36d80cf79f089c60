"""Lazy drafter contexts (sglang_ext.spec.contexts): buffered rows, projected together, give
the same K/V as projecting each step's rows at once, through trims (re-prefill, retraction)."""

from __future__ import annotations

import torch

from sglang_ext.spec.contexts import LazyContexts
from sglang_ext.dspark.drafter import DSparkDrafter
from sglang_ext.dspark.sampling import SamplingParams

from toy import toy_config


def _drafter() -> DSparkDrafter:
    torch.manual_seed(0)
    d = DSparkDrafter(toy_config())
    d.attach_shared(torch.randn(48, 32), torch.randn(48, 32))
    return d.eval()


def _same(a, b, layers: int = 2) -> None:
    assert torch.equal(a.pos(), b.pos())
    for li in range(layers):
        assert torch.allclose(a.keys(li), b.keys(li), atol=1e-5)
        assert torch.allclose(a.values(li), b.values(li), atol=1e-5)


def test_lazy_equals_eager_through_trims() -> None:
    d = _drafter()
    th = torch.randn(40, 96, generator=torch.Generator().manual_seed(1))
    lazy = LazyContexts(d, "cpu", max_pending=8)
    eager = d.new_context()
    # prefill 10 rows, then 1-3 rows per step, a retraction back to 14, more steps
    steps = [(0, 10), (10, 11), (11, 13), (13, 14), (14, 17)]
    for a, b in steps:
        lazy.append("r", th[a:b], a)
        d.append_context(eager, th[a:b], torch.arange(a, b))
    assert lazy.pending_rows("r") > 0  # nothing projected yet beyond the flush threshold
    lazy.trim("r", 14)
    eager.truncate(14)
    for a, b in [(14, 16), (16, 19), (19, 20)]:
        lazy.append("r", th[a:b], a)
        d.append_context(eager, th[a:b], torch.arange(a, b))
    # appending at a position already held redoes it (re-prefill of the tail)
    lazy.append("r", th[18:21], 18)
    eager.truncate(18)
    d.append_context(eager, th[18:21], torch.arange(18, 21))
    ctx = lazy.get("r")
    assert lazy.pending_rows("r") == 0
    _same(ctx, eager)
    # and the drafts from both are the same
    sp = SamplingParams.make(0.0, n=1)
    x = d.draft_block([ctx], torch.tensor([5]), torch.tensor([21]), sp)
    y = d.draft_block([eager], torch.tensor([5]), torch.tensor([21]), sp)
    assert torch.equal(x.tokens, y.tokens)


def test_buffer_is_bounded_and_forget_frees() -> None:
    d = _drafter()
    lazy = LazyContexts(d, "cpu", max_pending=4)
    for p in range(11):
        lazy.append("a", torch.randn(1, 96), p)
        assert lazy.pending_rows("a") < 4
    assert lazy.get("a").length == 11
    lazy.append("b", torch.randn(100, 96), 0)  # a long prefill is projected at once
    assert lazy.pending_rows("b") == 0 and "b" in lazy
    lazy.forget("a")
    assert "a" not in lazy
    lazy.clear()
    assert "b" not in lazy


def test_a_cached_prefix_is_seeded_from_the_request_that_computed_it() -> None:
    """An ended request's context seeds the next prompt that shares its tokens (its prefill
    starts past the radix-cached prefix): the seeded positions equal what running the whole
    prompt would have given, only up to where the tokens agree."""
    d = _drafter()
    th = torch.randn(60, 96, generator=torch.Generator().manual_seed(2))
    toks = list(range(100, 160))
    lazy = LazyContexts(d, "cpu", max_pending=8, keep_tokens=1000)
    lazy.append("turn1", th[:30], 0)   # prompt 0..29
    lazy.append("turn1", th[30:40], 30)  # decoded 30..39
    lazy.keep("turn1", toks[:40])
    assert "turn1" not in lazy and lazy.kept_positions == 40
    # turn 2 shares 35 tokens, then differs; the radix cache holds 38 of its tokens (say)
    turn2 = toks[:35] + [7, 7, 7] + toks[38:50]
    assert lazy.seed("turn2", turn2, 38) == 35
    whole = d.new_context()
    d.append_context(whole, th[:35], torch.arange(35))
    _same(lazy.get("turn2"), whole)
    # its prefill appends from 38 on: a hole at 35..37, nothing wrong
    lazy.append("turn2", th[38:50], 38)
    assert lazy.get("turn2").pos().tolist() == list(range(35)) + list(range(38, 50))
    # a running request seeds too; too short a shared prefix seeds nothing
    # (turn2 holds 0..34 and 38..49: the 42 of them below 45)
    assert lazy.seed("turn3", turn2[:45], 45, running=[("turn2", turn2)]) == 42
    assert lazy.get("turn3").pos().tolist() == list(range(35)) + list(range(38, 45))
    assert lazy.seed("other", [1] * 40, 40) == 0 and "other" not in lazy


def test_kept_contexts_are_bounded_oldest_first() -> None:
    d = _drafter()
    lazy = LazyContexts(d, "cpu", keep_tokens=50)
    for i in range(4):
        lazy.append(f"r{i}", torch.randn(20, 96), 0)
        lazy.keep(f"r{i}", [i] * 20)
    assert lazy.kept_positions == 40  # r0 and r1 evicted when r2, r3 arrived (60, 80 > 50)
    assert lazy.seed("x", [0] * 20, 20) == 0  # r0 is gone
    assert lazy.seed("y", [3] * 20, 20) == 20
    off = LazyContexts(d, "cpu", keep_tokens=0)
    off.append("a", torch.randn(20, 96), 0)
    off.keep("a", [0] * 20)
    assert off.kept_positions == 0 and off.seed("b", [0] * 20, 20) == 0
