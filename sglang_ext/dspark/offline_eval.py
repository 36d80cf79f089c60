"""Offline accepted-length evaluation (paper section 4): full blocks, no scheduler.

For held-out target-generated sequences and random anchors a: the drafter sees target features
of positions < a and the anchor t_a, drafts g tokens; the target then scores
[t_0..t_a ; x_1..x_g] (so p at draft k is conditioned on the drafted prefix, as in real
decoding) and the block is verified with the lossless rule.  Reports tau (bonus included),
conditional acceptance per position and the confidence data needed for STS / ECE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .drafter import DSparkDrafter
from .sampling import SamplingParams, process_logits
from .verify import verify_block


@dataclass
class OfflineStats:
    gamma: int
    accept_lens: list[int] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)  # accepted + bonus (no bonus after EOS)
    conf_logits: list[list[float]] = field(default_factory=list)

    @property
    def tau(self) -> float:
        return sum(self.emitted) / len(self.emitted) if self.emitted else float("nan")

    def conditional_acceptance(self) -> list[float]:
        out = []
        for k in range(self.gamma):
            den = sum(1 for a in self.accept_lens if a >= k)
            num = sum(1 for a in self.accept_lens if a >= k + 1)
            out.append(num / den if den else float("nan"))
        return out

    def survived(self) -> torch.Tensor:
        al = torch.tensor(self.accept_lens)
        return torch.arange(1, self.gamma + 1)[None, :] <= al[:, None]

    def merge(self, other: "OfflineStats") -> None:
        self.accept_lens += other.accept_lens
        self.emitted += other.emitted
        self.conf_logits += other.conf_logits


def target_features(target: Any, ids: torch.Tensor, layer_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, S] -> (features [B, S, m*d] = concat hidden_states[l+1], logits [B, S, V])."""
    out = target(input_ids=ids, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states
    feats = torch.cat([hs[l + 1] for l in layer_ids], dim=-1)
    return feats, out.logits


@torch.no_grad()
def evaluate_sequence(
    drafter: DSparkDrafter,
    target: Any,
    ids: list[int],
    anchors: Sequence[int],
    temperature: float,
    generator: torch.Generator,
    use_sequential_head: bool = True,
    eos_token_ids: Sequence[int] = (),
) -> OfflineStats:
    cfg = drafter.config
    g = cfg.block_size
    dev = next(target.parameters()).device
    seq = torch.tensor(ids, device=dev)[None]
    # features only: the target's LM head over every position of a long (agent) sequence
    # would cost more than the rest of the evaluation
    hs = target.model(input_ids=seq, output_hidden_states=True, use_cache=False).hidden_states
    feats = torch.cat([hs[l + 1] for l in cfg.target_layer_ids], dim=-1)
    anchors = [a for a in anchors if 1 <= a < len(ids)]
    stats = OfflineStats(gamma=g)
    if not anchors:
        return stats
    r = len(anchors)
    ctxs = []
    for a in anchors:
        c = drafter.new_context()
        drafter.append_context(c, feats[0, :a], torch.arange(a))
        ctxs.append(c)
    params = SamplingParams.make(temperature, n=r)
    anc = torch.tensor([ids[a] for a in anchors])
    blk = drafter.draft_block(ctxs, anc, torch.tensor(anchors), params, generator,
                              use_sequential_head=use_sequential_head)
    # Target scores each [prefix ; anchor ; drafts] row (right padded).
    width = max(anchors) + 1 + g
    rows = torch.zeros(r, width, dtype=torch.long, device=dev)
    att = torch.zeros(r, width, dtype=torch.long, device=dev)
    for i, a in enumerate(anchors):
        rows[i, : a + 1] = seq[0, : a + 1]
        rows[i, a + 1 : a + 1 + g] = blk.tokens[i].to(dev)
        att[i, : a + 1 + g] = 1
    last = target.model(input_ids=rows, attention_mask=att, use_cache=False).last_hidden_state
    idx = torch.tensor(anchors, device=dev)[:, None] + torch.arange(g + 1, device=dev)
    # the LM head only where the block is verified (anchor .. anchor + g)
    tl = target.lm_head(torch.gather(last, 1, idx[..., None].expand(r, g + 1, last.shape[-1])))
    p = process_logits(tl.reshape(r * (g + 1), -1), params.expand(g + 1)).reshape(r, g + 1, -1)
    res = verify_block(blk.tokens, p.to(blk.q_probs.device), blk.q_probs, greedy=params.is_greedy,
                       eos_token_ids=eos_token_ids, generator=generator)
    stats.accept_lens = res.accept_lens.tolist()
    stats.emitted = res.num_emitted.tolist()
    if blk.confidence_logits is not None:
        stats.conf_logits = blk.confidence_logits.tolist()
    return stats


@torch.no_grad()
def evaluate_offline(
    drafter: DSparkDrafter,
    target: Any,
    sequences: list[dict[str, Any]],
    temperature: float = 1.0,
    anchors_per_seq: int = 8,
    seed: int = 0,
    use_sequential_head: bool = True,
    eos_token_ids: Sequence[int] = (),
) -> dict[str, OfflineStats]:
    """Per-domain stats (plus "all") over target-generated sequences (anchors in the response)."""
    g = torch.Generator().manual_seed(seed)
    per: dict[str, OfflineStats] = {}
    gamma = drafter.config.block_size
    for rec in sequences:
        ids = rec["ids"]
        lo = max(1, int(rec.get("prompt_len", 1)))
        hi = len(ids) - 1
        if hi < lo:
            continue
        n = min(anchors_per_seq, hi - lo + 1)
        anchors = sorted((lo + torch.randperm(hi - lo + 1, generator=g)[:n]).tolist())
        st = evaluate_sequence(drafter, target, ids, anchors, temperature, g, use_sequential_head, eos_token_ids)
        per.setdefault(rec.get("domain", "all"), OfflineStats(gamma)).merge(st)
    allst = OfflineStats(gamma)
    for st in per.values():
        allst.merge(st)
    per["all"] = allst
    return per
