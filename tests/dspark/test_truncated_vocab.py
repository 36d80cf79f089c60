"""A truncated (FR-Spec) draft vocabulary on the real drafter: full-vocabulary outputs, the token
map in the checkpoint, old checkpoints unchanged."""
from __future__ import annotations

import json
import os

import pytest
import torch

from sglang_ext.dspark.config import DSparkConfigError
from sglang_ext.dspark.drafter import DSparkDrafter
from sglang_ext.dspark.sampling import SamplingParams

from toy import toy_config

D2T = torch.tensor([3, 1, 4, 15, 9, 26, 5, 35, 8, 44, 7, 12, 0, 20, 33, 41])


def _make(seed: int = 0) -> tuple[DSparkDrafter, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    d = DSparkDrafter(toy_config(draft_vocab_size=16))
    d.set_token_map(D2T)
    emb, head = torch.randn(48, 32), torch.randn(48, 32)
    d.attach_shared(emb, head)
    return d, emb, head


def _block(d: DSparkDrafter, temp: float, seed: int = 1):  # type: ignore[no-untyped-def]
    ctx = d.new_context()
    d.append_context(ctx, torch.randn(6, 96, generator=torch.Generator().manual_seed(seed)), torch.arange(6))
    return d.draft_block([ctx, ctx], torch.tensor([2, 40]), torch.tensor([6, 6]), SamplingParams.make(temp, n=2),
                         torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temp", [0.0, 1.0])
def test_drafts_full_vocabulary_ids_with_q_zero_outside(temp: float) -> None:
    d, _, _ = _make()
    blk = _block(d, temp)
    assert blk.q_probs.shape == (2, 4, 48)
    assert bool(torch.isin(blk.tokens, D2T).all())
    outside = torch.ones(48, dtype=torch.bool)
    outside[D2T] = False
    assert float(blk.q_probs[..., outside].sum()) == 0.0
    assert torch.allclose(blk.q_probs.sum(-1), torch.ones(2, 4))
    assert bool((blk.q_probs.gather(-1, blk.tokens[..., None]) > 0).all())


def test_truncated_logits_equal_the_full_heads_rows() -> None:
    """The draft head is the target head's rows of the draft vocabulary, nothing else."""
    d, _, head = _make()
    h = torch.randn(3, 32)
    assert torch.allclose(d.lm_logits(h), h @ head[D2T].T, atol=1e-5)
    assert torch.equal(d.to_draft_ids(torch.tensor([4, 2, 41])), torch.tensor([2, -1, 15]))


def test_checkpoint_keeps_token_map_and_old_checkpoints_load(tmp_path) -> None:
    d, emb, head = _make()
    d.save_pretrained(str(tmp_path / "t"), dtype=torch.bfloat16)
    raw = json.load(open(os.path.join(tmp_path, "t", "config.json")))
    assert raw["draft_vocab_size"] == 16
    d2 = DSparkDrafter.from_pretrained(str(tmp_path / "t"))
    d2.attach_shared(emb, head)
    assert torch.equal(d2.token_map, D2T)
    assert d2.markov_head.markov_w2.weight.shape == (16, 8)
    d.to(torch.bfloat16).float()
    a, b = _block(d, 1.0), _block(d2, 1.0)
    assert torch.equal(a.tokens, b.tokens)
    # a full-vocabulary checkpoint has no map and writes no draft_vocab_size
    full = DSparkDrafter(toy_config())
    full.save_pretrained(str(tmp_path / "f"))
    assert "draft_vocab_size" not in json.load(open(os.path.join(tmp_path, "f", "config.json")))
    f2 = DSparkDrafter.from_pretrained(str(tmp_path / "f"))
    assert f2.token_map is None and f2.markov_head.markov_w2.weight.shape == (48, 8)


def test_bad_token_map_is_named() -> None:
    d, _, _ = _make()
    with pytest.raises(DSparkConfigError, match="distinct"):
        d.set_token_map(torch.zeros(16, dtype=torch.long))
    with pytest.raises(DSparkConfigError, match="vocab_size"):
        d.set_token_map(torch.arange(40, 56))
    with pytest.raises(DSparkConfigError, match="draft_vocab_size"):
        toy_config(draft_vocab_size=49)
