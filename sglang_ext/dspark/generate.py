"""Reference single-request speculative decoding loop with an HF target (no KV cache).

Slow by design (the target re-reads the whole sequence each round); it documents the exact
order of calls a serving worker makes and is the oracle for tests:
  1. prefill: target features of the prompt -> drafter.append_context (positions < anchor)
  2. round: draft_block -> scheduler picks l -> target scores [seq ; x_1..x_l] -> verify
  3. commit: append features of anchor + verified drafts, truncate to the committed length.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from .drafter import DSparkDrafter
from .offline_eval import target_features
from .sampling import SamplingParams, process_logits
from .scheduler import schedule_algorithm1
from .verify import verify_block


@torch.no_grad()
def speculative_generate(
    drafter: DSparkDrafter,
    target: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = -1,
    sps: Optional[Callable[[int], float]] = None,
    eos_token_ids: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
    stats: Optional[dict[str, list[int]]] = None,
) -> list[int]:
    """Returns the generated token ids (prompt excluded).  With ``sps`` the verify length comes
    from Algorithm 1 on the drafter's calibrated confidences, else the full block is verified."""
    cfg = drafter.config
    g = cfg.block_size
    dev = next(target.parameters()).device
    params = SamplingParams.make(temperature, top_p, top_k, n=1)
    seq = list(prompt_ids)
    # prefill: the target produces the first token; context = features of the prompt
    feats, logits = target_features(target, torch.tensor([seq], device=dev), cfg.target_layer_ids)
    p0 = process_logits(logits[0, -1:], params)
    first = int(p0.argmax()) if temperature <= 0 else int(torch.multinomial(p0, 1, generator=generator))
    ctx = drafter.new_context()
    drafter.append_context(ctx, feats[0], torch.arange(len(seq)))
    seq.append(first)
    out = [first]
    while len(out) < max_new_tokens and first not in eos_token_ids:
        n = len(seq)
        blk = drafter.draft_block([ctx], torch.tensor([seq[-1]]), torch.tensor([n - 1]), params, generator)
        if sps is not None and blk.confidences is not None:
            ell = int(schedule_algorithm1(blk.confidences, sps)[0])
        else:
            ell = g
        drafts = blk.tokens[0, :ell].tolist()
        f2, lg = target_features(target, torch.tensor([seq + drafts], device=dev), cfg.target_layer_ids)
        rows = lg[0, n - 1 : n + ell]  # p_0..p_ell
        rows = torch.cat([rows, rows[-1:].expand(g - ell, -1)], 0)  # pad unverified rows (unused)
        p = process_logits(rows, params.expand(g + 1))[None]
        res = verify_block(blk.tokens, p, blk.q_probs, torch.tensor([ell]), greedy=params.is_greedy,
                           eos_token_ids=eos_token_ids, generator=generator)
        n_acc = int(res.accept_lens[0])
        if stats is not None:
            stats.setdefault("accept_lens", []).append(n_acc)
            stats.setdefault("verify_lens", []).append(ell)
        # commit: features of the anchor (n-1) and the verified drafts, then keep the accepted
        drafter.append_context(ctx, f2[0, n - 1 : n + ell], torch.arange(n - 1, n + ell))
        ctx.truncate(n + n_acc)
        emitted = res.tokens[0]
        seq += emitted
        out += emitted
        if any(t in eos_token_ids for t in emitted):
            break
    out = out[:max_new_tokens]
    for i, t in enumerate(out):
        if t in eos_token_ids:
            return out[: i + 1]
    return out
