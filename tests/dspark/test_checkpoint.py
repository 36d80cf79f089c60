from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from sglang_ext.dspark.config import DSparkConfig, DSparkConfigError
from sglang_ext.dspark.drafter import DSparkDrafter
from sglang_ext.dspark.sampling import SamplingParams

from toy import toy_config


def _drafter(cfg: DSparkConfig, seed: int = 0) -> tuple[DSparkDrafter, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    d = DSparkDrafter(cfg)
    for p in d.parameters():  # non-trivial norms too
        p.data.add_(0.05 * torch.randn_like(p))
    emb = torch.randn(cfg.vocab_size, cfg.hidden_size)
    head = torch.randn(cfg.vocab_size, cfg.hidden_size)
    d.attach_shared(emb, head)
    return d, emb, head


def _outputs(d: DSparkDrafter, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    cfg = d.config
    th = torch.randn(9, len(cfg.target_layer_ids) * cfg.hidden_size, generator=g)
    ctx = d.new_context()
    d.append_context(ctx, th, torch.arange(9))
    blk = d.draft_block([ctx], torch.tensor([5]), torch.tensor([9]), SamplingParams.make(1.0, n=1),
                        torch.Generator().manual_seed(3))
    return blk.tokens, blk.q_probs, blk.confidence_logits


DEEPSPEC_NAMES_VANILLA = {
    "fc.weight", "hidden_norm.weight", "norm.weight",
    "markov_head.markov_w1.weight", "markov_head.markov_w2.weight",
    "confidence_head.proj.weight", "confidence_head.proj.bias",
}
LAYER_NAMES = [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
]


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_round_trip(tmp_path, kind: str) -> None:
    cfg = toy_config(markov_head_type=kind)
    d, emb, head = _drafter(cfg)
    d.save_pretrained(str(tmp_path), dtype=torch.float32)
    names = set(d.state_dict())
    expected = set(DEEPSPEC_NAMES_VANILLA) | {f"layers.{i}.{n}" for i in range(2) for n in LAYER_NAMES}
    if kind == "rnn":
        expected |= {"markov_head.joint_proj.weight", "markov_head.joint_proj.bias"}
    if kind == "gated":
        expected |= {"markov_head.gate_proj.weight", "markov_head.gate_proj.bias"}
    assert names == expected
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    assert shapes["fc.weight"] == (32, 3 * 32)
    assert shapes["markov_head.markov_w1.weight"] == (48, 8)
    assert shapes["markov_head.markov_w2.weight"] == (48, 8)
    assert shapes["confidence_head.proj.weight"] == (1, 32 + 8)
    d2 = DSparkDrafter.from_pretrained(str(tmp_path))
    d2.attach_shared(emb, head)
    for a, b in zip(_outputs(d), _outputs(d2)):
        assert torch.equal(a, b)
    raw = json.load(open(os.path.join(tmp_path, "config.json")))
    assert raw["architectures"] == ["Qwen3DSparkModel"]
    assert raw["dflash_config"]["mask_token_id"] == cfg.mask_token_id


def test_bf16_ship_has_no_shared_weights(tmp_path) -> None:
    cfg = toy_config()
    d, emb, head = _drafter(cfg)
    path = d.save_pretrained(str(tmp_path))
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys)
    assert "embed_tokens.weight" not in keys and "lm_head.weight" not in keys


def test_deepseek_style_file_with_embed_and_lm_head_loads(tmp_path) -> None:
    """A file written independently with DeepSpec's names/shapes (incl. embed_tokens/lm_head,
    nested dflash_config) loads unchanged and uses its own embedding/LM head."""
    cfg = toy_config()
    d, _, _ = _drafter(cfg)
    sd = {k: v.clone().to(torch.bfloat16) for k, v in d.state_dict().items()}
    emb = torch.randn(48, 32).to(torch.bfloat16)
    head = torch.randn(48, 32).to(torch.bfloat16)
    sd["embed_tokens.weight"] = emb
    sd["lm_head.weight"] = head
    save_file(sd, os.path.join(tmp_path, "model.safetensors"))
    raw = cfg.to_dict()
    for k in ("mask_token_id", "target_layer_ids", "block_size", "markov_rank"):
        raw.pop(k)  # only nested, as in published drafts
    raw.pop("num_target_layers")
    raw["dflash_config"] = {"mask_token_id": 47, "target_layer_ids": [0, 2, 3], "block_size": 4,
                            "markov_rank": 8, "num_target_layers": 4}
    json.dump(raw, open(os.path.join(tmp_path, "config.json"), "w"))
    d2 = DSparkDrafter.from_pretrained(str(tmp_path))
    assert torch.equal(d2.embed_weight, emb.float()) and torch.equal(d2.lm_head_weight, head.float())
    ref = DSparkDrafter(cfg)
    ref.load_state_dict({k: v.float() for k, v in sd.items() if "embed" not in k and "lm_head" not in k})
    ref.attach_shared(emb.float(), head.float())
    for a, b in zip(_outputs(ref), _outputs(d2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("field,value,needle", [
    ("markov_head_type", "lstm", "markov_head_type"),
    ("mask_token_id", 999, "mask_token_id"),
    ("target_layer_ids", [0, 9], "target_layer_ids"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("architectures", ["LlamaForCausalLM"], "architectures"),
    ("markov_rank", 0, "markov_rank"),
    ("block_size", -1, "block_size"),
])
def test_bad_config_names_field(tmp_path, field: str, value: object, needle: str) -> None:
    raw = toy_config().to_dict()
    raw[field] = value
    raw["dflash_config"].pop(field, None)
    with pytest.raises(ValueError, match=needle):
        DSparkConfig.from_dict(raw)


def test_missing_field_and_bad_weight_shape(tmp_path) -> None:
    raw = toy_config().to_dict()
    del raw["markov_rank"]
    del raw["dflash_config"]["markov_rank"]
    with pytest.raises(DSparkConfigError, match="markov_rank"):
        DSparkConfig.from_dict(raw)
    cfg = toy_config()
    d, _, _ = _drafter(cfg)
    d.save_pretrained(str(tmp_path))
    cfg2 = toy_config(markov_rank=16)
    cfg2.save(str(tmp_path))
    with pytest.raises(DSparkConfigError, match="has shape .* expected"):
        DSparkDrafter.from_pretrained(str(tmp_path))
