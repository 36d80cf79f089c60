"""DSpark draft-checkpoint configuration.

Mirrors the ``config.json`` written by DeepSeek's DeepSpec ``save_pretrained`` and read by
SGLang's DSPARK loader: the draft's own transformer fields (Qwen3 style), the DSpark fields
(block size, mask token, target layers, sequential / confidence heads) and the number of
layers of the *target* model.  Published checkpoints nest some DSpark fields under
``dflash_config``; both spellings are accepted and we write both so either reader is happy.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
# Architectures we can load.  The draft backbone is Qwen3-style (q/k norm) in both; the Llama
# name only records that the target is Llama-family (same weights, same math).
SUPPORTED_ARCHITECTURES = ("Qwen3DSparkModel", "LlamaDSparkModel")
# Fields that DeepSpec / SGLang may also nest under these keys.
_NESTED_KEYS = ("dflash_config", "dspark_config")
_NESTED_FIELDS = (
    "block_size",
    "mask_token_id",
    "target_layer_ids",
    "num_target_layers",
    "markov_rank",
    "markov_head_type",
    "enable_confidence_head",
    "confidence_head_with_markov",
)


class DSparkConfigError(ValueError):
    """A checkpoint config is invalid; the message names the field and what was expected."""


@dataclass
class DSparkConfig:
    # --- draft backbone (Qwen3-style decoder layers) ---
    hidden_size: int = 576
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    num_hidden_layers: int = 1  # draft layers
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    vocab_size: int = 49152
    max_position_embeddings: int = 8192
    hidden_act: str = "silu"
    attention_bias: bool = False
    use_qk_norm: bool = True  # Qwen3-style q_norm/k_norm; always present in DeepSpec drafts
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    model_type: str = "qwen3"
    architectures: list[str] = field(default_factory=lambda: ["Qwen3DSparkModel"])
    # --- DSpark ---
    block_size: int = 7  # gamma: anchor + (gamma-1) masks -> gamma draft tokens
    mask_token_id: int = 0
    target_layer_ids: list[int] = field(default_factory=lambda: [1, 8, 15, 22, 28])
    num_target_layers: int = 30  # layers of the TARGET model
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    # FR-Spec style truncated draft vocabulary: the LM head and the Markov output cover the K most
    # frequent target tokens (the checkpoint's `d2t` map); 0 = the full vocabulary.
    draft_vocab_size: int = 0
    # Unknown keys from the file are kept so a load/save round trip is lossless.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ helpers
    @property
    def num_context_features(self) -> int:
        return len(self.target_layer_ids)

    def validate(self) -> "DSparkConfig":
        def bad(name: str, expected: str) -> DSparkConfigError:
            return DSparkConfigError(
                f"invalid DSpark config field '{name}': expected {expected}, "
                f"got {getattr(self, name)!r}"
            )

        for name in (
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "num_hidden_layers",
            "vocab_size",
            "block_size",
            "num_target_layers",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "a positive integer")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise bad(
                "num_key_value_heads",
                f"a divisor of num_attention_heads={self.num_attention_heads}",
            )
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise bad("rms_norm_eps", "a positive float")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise bad("rope_theta", "a positive float")
        if not isinstance(self.architectures, list) or not any(
            a in SUPPORTED_ARCHITECTURES for a in self.architectures
        ):
            raise bad("architectures", f"a list containing one of {list(SUPPORTED_ARCHITECTURES)}")
        if not (
            isinstance(self.mask_token_id, int) and 0 <= self.mask_token_id < self.vocab_size
        ):
            raise bad("mask_token_id", f"an integer in [0, vocab_size={self.vocab_size})")
        if (
            not isinstance(self.target_layer_ids, list)
            or not self.target_layer_ids
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in self.target_layer_ids)
        ):
            raise bad("target_layer_ids", "a non-empty list of integers")
        if any(x < 0 or x >= self.num_target_layers for x in self.target_layer_ids):
            # "output of layer l" is hidden_states[l+1]; l must name a real target layer.
            raise bad(
                "target_layer_ids",
                f"layer indices in [0, num_target_layers={self.num_target_layers})",
            )
        if not isinstance(self.markov_rank, int) or self.markov_rank < 1:
            raise bad("markov_rank", "a positive integer (the Markov head is the core of DSpark)")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise bad("markov_head_type", f"one of {list(MARKOV_HEAD_TYPES)}")
        if not isinstance(self.enable_confidence_head, bool):
            raise bad("enable_confidence_head", "a boolean")
        if not isinstance(self.confidence_head_with_markov, bool):
            raise bad("confidence_head_with_markov", "a boolean")
        if (not isinstance(self.draft_vocab_size, int) or isinstance(self.draft_vocab_size, bool)
                or not 0 <= self.draft_vocab_size <= self.vocab_size):
            raise bad("draft_vocab_size", f"an integer in [0, vocab_size={self.vocab_size}] (0 = full vocabulary)")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "'silu'")
        return self

    # --------------------------------------------------------------- (de)serialise
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DSparkConfig":
        if not isinstance(raw, dict):
            raise DSparkConfigError(f"DSpark config must be a JSON object, got {type(raw).__name__}")
        merged = dict(raw)
        for nk in _NESTED_KEYS:
            nested = raw.get(nk)
            if isinstance(nested, dict):
                for k in _NESTED_FIELDS:
                    if k in nested and k not in raw:
                        merged[k] = nested[k]
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: merged[k] for k in known if k in merged}
        if "head_dim" not in merged and "hidden_size" in merged and "num_attention_heads" in merged:
            kwargs["head_dim"] = int(merged["hidden_size"]) // int(merged["num_attention_heads"])
        if "num_key_value_heads" not in merged and "num_attention_heads" in merged:
            kwargs["num_key_value_heads"] = merged["num_attention_heads"]
        required = ("block_size", "mask_token_id", "target_layer_ids", "markov_rank", "vocab_size",
                    "hidden_size", "num_attention_heads", "num_hidden_layers")
        for name in required:
            if name not in kwargs:
                raise DSparkConfigError(f"DSpark config is missing required field '{name}'")
        extra = {k: v for k, v in raw.items() if k not in known}
        if "target_layer_ids" in kwargs and isinstance(kwargs["target_layer_ids"], tuple):
            kwargs["target_layer_ids"] = list(kwargs["target_layer_ids"])
        if "num_target_layers" not in kwargs and isinstance(kwargs.get("target_layer_ids"), list):
            kwargs["num_target_layers"] = max(kwargs["target_layer_ids"]) + 2
        if isinstance(kwargs.get("markov_head_type"), str):
            kwargs["markov_head_type"] = kwargs["markov_head_type"].lower()
        cfg = cls(**kwargs, extra=extra)
        return cfg.validate()

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if not d["draft_vocab_size"]:
            del d["draft_vocab_size"]  # full vocabulary: the file stays as DeepSpec writes it
        out = dict(self.extra)
        out.update(d)
        # Also write the nested spelling that published DSpark drafts use.
        nested = dict(out.get("dflash_config") or {})
        nested.update({k: d[k] for k in ("block_size", "mask_token_id", "target_layer_ids",
                                          "num_target_layers", "markov_rank", "markov_head_type")})
        out["dflash_config"] = nested
        return out

    @classmethod
    def from_json_file(cls, path: str) -> "DSparkConfig":
        with open(path, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise DSparkConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(raw)

    @classmethod
    def from_pretrained(cls, directory: str) -> "DSparkConfig":
        return cls.from_json_file(os.path.join(directory, "config.json"))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def for_target(
        cls,
        target_config: Any,
        *,
        num_draft_layers: int = 1,
        block_size: int = 7,
        markov_rank: int = 256,
        markov_head_type: str = "vanilla",
        target_layer_ids: list[int] | None = None,
        mask_token_id: int | None = None,
        num_context_layers: int = 5,
    ) -> "DSparkConfig":
        """Derive a draft config from a HF target config (Llama or Qwen3)."""
        g = (lambda k, d=None: target_config.get(k, d)) if isinstance(target_config, dict) else (
            lambda k, d=None: getattr(target_config, k, d)
        )
        n_layers = int(g("num_hidden_layers"))
        if target_layer_ids is None:
            target_layer_ids = default_target_layer_ids(n_layers, num_context_layers)
        hidden = int(g("hidden_size"))
        n_heads = int(g("num_attention_heads"))
        vocab = int(g("vocab_size"))
        mt = str(g("model_type", "llama"))
        rope_theta = g("rope_theta", None)
        if rope_theta is None:
            rp = g("rope_parameters", None) or {}
            rope_theta = (rp.get("rope_theta") if isinstance(rp, dict) else None) or 10000.0
        cfg = cls(
            hidden_size=hidden,
            num_attention_heads=n_heads,
            num_key_value_heads=int(g("num_key_value_heads", n_heads) or n_heads),
            head_dim=int(g("head_dim", None) or hidden // n_heads),
            intermediate_size=int(g("intermediate_size")),
            num_hidden_layers=num_draft_layers,
            rms_norm_eps=float(g("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            vocab_size=vocab,
            max_position_embeddings=int(g("max_position_embeddings", 8192)),
            # The draft backbone is Qwen3-style for any target family; SGLang's DSPARK loader
            # keys on this name.  The target family is recorded separately.
            architectures=["Qwen3DSparkModel"],
            block_size=block_size,
            mask_token_id=vocab - 1 if mask_token_id is None else mask_token_id,
            target_layer_ids=list(target_layer_ids),
            num_target_layers=n_layers,
            markov_rank=markov_rank,
            markov_head_type=markov_head_type,
        )
        cfg.extra["target_model_type"] = mt
        return cfg.validate()


def default_target_layer_ids(num_target_layers: int, num_context_layers: int = 5) -> list[int]:
    """Evenly spaced target layers from layer 1 to L-3 (DFlash convention; never the last)."""
    if num_target_layers < 3:
        return list(range(num_target_layers))
    lo, hi = 1, num_target_layers - 3
    m = max(1, min(num_context_layers, hi - lo + 1))
    if m == 1:
        return [lo]
    return sorted({int(round(lo + i * (hi - lo) / (m - 1))) for i in range(m)})
