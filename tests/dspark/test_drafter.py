from __future__ import annotations

import pytest
import torch

from sglang_ext.dspark.config import DSparkConfigError
from sglang_ext.dspark.drafter import DSparkDrafter
from sglang_ext.dspark.sampling import SamplingParams

from toy import toy_config


def _make(kind: str = "vanilla", seed: int = 0) -> DSparkDrafter:
    cfg = toy_config(markov_head_type=kind)
    torch.manual_seed(seed)
    d = DSparkDrafter(cfg)
    d.attach_shared(torch.randn(48, 32), torch.randn(48, 32))
    return d


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_serving_path_matches_training_path(kind: str) -> None:
    d = _make(kind)
    g = torch.Generator().manual_seed(0)
    th = torch.randn(1, 12, 96, generator=g)
    ids = torch.randint(0, 40, (1, 12), generator=g)
    h_train = d.forward_train(th, ids, torch.tensor([[3, 7]]))
    ctx_a, ctx_b = d.new_context(), d.new_context()
    d.append_context(ctx_a, th[0, :5], torch.arange(5))
    d.append_context(ctx_a, [th[0, 5:7, :32], th[0, 5:7, 32:64], th[0, 5:7, 64:]], torch.arange(5, 7))
    d.append_context(ctx_b, th[0, :3], torch.arange(3))
    blk = d.draft_block([ctx_a, ctx_b], ids[0, [7, 3]], torch.tensor([7, 3]), SamplingParams.make(0.0, n=2))
    assert torch.allclose(blk.hidden[0], h_train[0, 1], atol=1e-5)
    assert torch.allclose(blk.hidden[1], h_train[0, 0], atol=1e-5)
    # batch composition does not change a request's draft (padding is masked)
    solo = d.draft_block([ctx_b], ids[0, [3]], torch.tensor([3]), SamplingParams.make(0.0, n=1))
    assert torch.equal(solo.tokens[0], blk.tokens[1])
    assert torch.allclose(solo.q_probs[0], blk.q_probs[1], atol=1e-6)
    # greedy q is one-hot at the drafted token; confidences in (0,1)
    assert torch.equal(blk.q_probs.argmax(-1), blk.tokens)
    assert torch.all(blk.q_probs.sum(-1) == 1)
    assert blk.confidences is not None and bool(((blk.confidences > 0) & (blk.confidences < 1)).all())


def test_truncate_then_append_equals_fresh() -> None:
    d = _make()
    th = torch.randn(10, 96)
    ctx = d.new_context()
    d.append_context(ctx, th[:8], torch.arange(8))
    ctx.truncate(5)
    d.append_context(ctx, th[5:7], torch.arange(5, 7))
    fresh = d.new_context()
    d.append_context(fresh, th[:7], torch.arange(7))
    for li in range(2):
        assert torch.allclose(ctx.keys(li), fresh.keys(li), atol=1e-5)
        assert torch.allclose(ctx.values(li), fresh.values(li), atol=1e-5)
    with pytest.raises(ValueError):
        ctx.truncate(99)
    sp = SamplingParams.make(1.0, n=1)
    a = d.draft_block([ctx], torch.tensor([4]), torch.tensor([7]), sp, torch.Generator().manual_seed(1))
    b = d.draft_block([fresh], torch.tensor([4]), torch.tensor([7]), sp, torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens)


def test_sequential_head_changes_distribution_and_q_is_exact() -> None:
    d = _make()
    with torch.no_grad():
        d.markov_head.markov_w2.weight.mul_(20)
    ctx = d.new_context()
    d.append_context(ctx, torch.randn(4, 96), torch.arange(4))
    sp = SamplingParams.make(1.0, 0.9, 10, n=1)
    blk = d.draft_block([ctx], torch.tensor([1]), torch.tensor([4]), sp, torch.Generator().manual_seed(0))
    par = d.draft_block([ctx], torch.tensor([1]), torch.tensor([4]), sp, torch.Generator().manual_seed(0),
                        use_sequential_head=False)
    assert not torch.allclose(blk.q_probs[0, 1], par.q_probs[0, 1])
    # q rows respect top-k: at most 10 non-zeros, and every drafted token has q > 0
    assert int((blk.q_probs[0] > 0).sum(-1).max()) <= 10
    assert bool((blk.q_probs[0].gather(-1, blk.tokens[0][:, None]) > 0).all())


def test_attach_shared_shapes() -> None:
    d = DSparkDrafter(toy_config())
    d.attach_shared(torch.randn(64, 32))  # engine-padded vocab: extra rows dropped, tied head
    assert d.embed_weight.shape == (48, 32) and d.lm_head_weight.shape == (48, 32)
    with pytest.raises(DSparkConfigError, match="embed_tokens"):
        d.attach_shared(torch.randn(48, 16))
    # shared weights are not part of the module's parameters / state dict
    assert "embed_tokens.weight" not in d.state_dict()
