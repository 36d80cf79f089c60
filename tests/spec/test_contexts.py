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
