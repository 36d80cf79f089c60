"""Cached target features for drafter training: computed once per sequence, read every step.

For each corpus sequence the target (HF transformers, in-process) is run once; stored are the
concatenated hidden states of the drafter's target layers (fp16 [S, m*d]) and what the loss
needs of the target distribution: the top-k logits and ids per position and the log-sum-exp
(so top-k probabilities are exact).  Files live outside git under
~/.cache/agentserve/features/<model key>/<sequence key>.pt; the model key hashes the target's
config and weights file size, the layer ids and k, the sequence key hashes the token ids.  A
missing or partial cache is rebuilt by the same call (with a progress bar).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

DEFAULT_CACHE = Path.home() / ".cache" / "agentserve" / "features"


def model_key(target_dir: str, layer_ids: Sequence[int], topk: int) -> str:
    h = hashlib.sha256()
    cfg = Path(target_dir, "config.json")
    h.update(cfg.read_bytes() if cfg.exists() else b"")
    for f in sorted(Path(target_dir).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    h.update(json.dumps({"layers": list(layer_ids), "topk": topk}).encode())
    return h.hexdigest()[:16]


def seq_key(ids: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:20]


class FeatureCache:
    def __init__(self, target_dir: str, layer_ids: Sequence[int], topk: int = 16,
                 root: str | Path = DEFAULT_CACHE) -> None:
        self.layer_ids = list(layer_ids)
        self.topk = topk
        self.dir = Path(root) / model_key(target_dir, layer_ids, topk)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, ids: Sequence[int]) -> Path:
        return self.dir / f"{seq_key(ids)}.pt"

    def has(self, ids: Sequence[int]) -> bool:
        return self.path(ids).exists()

    @torch.no_grad()
    def compute(self, target: Any, ids: Sequence[int]) -> dict[str, torch.Tensor]:
        dev = next(target.parameters()).device
        out = target(input_ids=torch.tensor([list(ids)], device=dev), output_hidden_states=True, use_cache=False)
        feats = torch.cat([out.hidden_states[l + 1][0] for l in self.layer_ids], dim=-1)
        logits = out.logits[0].float()
        top_v, top_i = logits.topk(self.topk, dim=-1)
        return {"feats": feats.to("cpu", torch.float16), "top_v": top_v.cpu(), "top_i": top_i.to("cpu", torch.int32),
                "lse": torch.logsumexp(logits, -1).cpu()}

    def ensure(self, target: Any, records: Iterable[dict[str, Any]], progress: bool = True) -> int:
        """Compute every missing entry; returns how many were computed."""
        todo = [r for r in records if not self.has(r["ids"])]
        try:
            from tqdm import tqdm

            it: Iterable[dict[str, Any]] = tqdm(todo, desc="target features", disable=not progress or not todo)
        except ImportError:  # pragma: no cover
            it = todo
        for r in it:
            ent = self.compute(target, r["ids"])
            p = self.path(r["ids"])
            torch.save(ent, str(p) + ".tmp")
            os.replace(str(p) + ".tmp", p)  # never a torn entry: a killed run recomputes it
        return len(todo)

    def load(self, ids: Sequence[int]) -> dict[str, torch.Tensor]:
        return torch.load(self.path(ids), map_location="cpu", weights_only=True)


def target_topk_probs(top_v: torch.Tensor, top_i: torch.Tensor, lse: torch.Tensor,
                      t2d: Optional[torch.Tensor], width: int) -> torch.Tensor:
    """Exact target probabilities of the cached top-k tokens scattered into the drafter's
    vocabulary (width K with a token map t2d [V] -> draft index or -1, else V); the rest is 0."""
    p = torch.exp(top_v.float() - lse.float()[..., None])
    idx = top_i.long() if t2d is None else t2d[top_i.long()]
    keep = idx >= 0
    out = torch.zeros(*p.shape[:-1], width, dtype=torch.float32, device=p.device)
    out.scatter_add_(-1, idx.clamp(min=0), p * keep)
    return out


def build_token_map(records: Iterable[dict[str, Any]], k: int, vocab: int,
                    always: Sequence[int] = ()) -> torch.Tensor:
    """FR-Spec: the k most frequent answer tokens of the (train) corpus, plus `always` (e.g. EOS)."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for r in records:
        ans = torch.tensor(r["ids"][r["prompt_len"]:], dtype=torch.long)
        if ans.numel():
            counts += torch.bincount(ans, minlength=vocab)[:vocab]
    for t in always:
        counts[t] = counts.max() + 1
    # ties (unseen tokens) broken by id so the map is deterministic
    order = sorted(range(vocab), key=lambda t: (-int(counts[t]), t))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)
