"""A tiny DSpark drafter config for tests that need a real drafter without a real checkpoint."""

from __future__ import annotations

from sglang_ext.dspark.config import DSparkConfig


def toy_config(**kw: object) -> DSparkConfig:
    base = dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=64, num_hidden_layers=2, vocab_size=48, rms_norm_eps=1e-6,
        rope_theta=10000.0, block_size=4, mask_token_id=47, target_layer_ids=[0, 2, 3],
        num_target_layers=4, markov_rank=8, markov_head_type="vanilla",
    )
    base.update(kw)
    return DSparkConfig(**base).validate()  # type: ignore[arg-type]
