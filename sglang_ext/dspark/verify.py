"""Lossless verification of a drafted block.

Given, per request r, the drafts x_1..x_g with the distributions q_k they were drawn from and
the target distributions p_0..p_g (p_k = target's processed distribution for the token after
x_k, i.e. at the position of draft k+1; p_g is the bonus position), verify the first
``verify_lens[r]`` drafts (the scheduler's choice; the rest are simply not verified):

* greedy requests: accept while x_k == argmax p_{k-1}; then emit argmax at the stop position.
* sampling: accept x_k with prob min(1, p(x_k)/q(x_k)); on the first rejection emit a token
  from norm(max(0, p - q)); if all verified drafts pass, emit a bonus token from p at the next
  position.  q may be one-hot (deterministic drafts): then the ratio is p(x_k).
* an accepted EOS ends the round: no bonus token.

Indexing: target_probs[:, j] is the distribution for the token that draft j+1 proposes
(j = 0..g-1) and target_probs[:, g] is for the token after the last draft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch


@dataclass
class VerifyResult:
    accept_lens: torch.Tensor  # long [R]: drafts accepted (0..verify_len)
    accept_flags: torch.Tensor  # bool [R, g]: position k accepted (only for k < accept_len)
    bonus: torch.Tensor  # long [R]: replacement/bonus token, -1 if the round ended on EOS
    tokens: list[list[int]]  # emitted tokens per request (accepted drafts + bonus)
    num_emitted: torch.Tensor  # long [R] = len(tokens[r])


def verify_block(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: Optional[torch.Tensor] = None,
    verify_lens: Optional[torch.Tensor] = None,
    greedy: Optional[torch.Tensor] = None,
    eos_token_ids: Iterable[int] = (),
    generator: Optional[torch.Generator] = None,
) -> VerifyResult:
    """draft_tokens [R, g]; target_probs [R, g+1, V]; draft_probs [R, g, V] or None (= one-hot,
    deterministic drafts); verify_lens [R] in [0, g] (default g); greedy [R] bool (default:
    requests whose target rows are all one-hot are NOT assumed greedy - pass it explicitly)."""
    r, g = draft_tokens.shape
    dev = target_probs.device
    draft_tokens = draft_tokens.to(dev).long()
    v = target_probs.shape[-1]
    if target_probs.shape[:2] != (r, g + 1):
        raise ValueError(f"target_probs must be [R, g+1, V] = [{r}, {g + 1}, V], got {tuple(target_probs.shape)}")
    lens = torch.full((r,), g, dtype=torch.long, device=dev) if verify_lens is None else verify_lens.to(dev).long()
    if bool(((lens < 0) | (lens > g)).any()):
        raise ValueError("verify_lens must be in [0, g]")
    greedy = torch.zeros(r, dtype=torch.bool, device=dev) if greedy is None else greedy.to(dev).bool()
    p = target_probs.float()

    p_x = torch.gather(p[:, :g], 2, draft_tokens[..., None]).squeeze(-1)  # [R, g]
    if draft_probs is None:
        q_x = torch.ones_like(p_x)
    else:
        q_x = torch.gather(draft_probs.to(dev).float(), 2, draft_tokens[..., None]).squeeze(-1)
    # Sampling acceptance: u < p/q  <=>  u*q < p (q(x) > 0 since x was drawn from q).
    u = torch.rand(r, g, generator=generator, device=dev) if not bool(greedy.all()) else torch.zeros(r, g, device=dev)
    ok_sample = u * q_x < p_x
    ok_greedy = draft_tokens == p[:, :g].argmax(-1)
    ok = torch.where(greedy[:, None], ok_greedy, ok_sample)
    ar = torch.arange(g, device=dev)
    ok &= ar[None, :] < lens[:, None]
    # Accept length = first failure (cumprod of successes); then stop after an accepted EOS.
    acc = torch.cumprod(ok.long(), dim=1).bool()
    eos = torch.zeros_like(acc)
    for e in eos_token_ids:
        eos |= draft_tokens == int(e)
    eos_acc = acc & eos
    has_eos = eos_acc.any(dim=1)
    first_eos = torch.where(has_eos, eos_acc.float().argmax(dim=1), torch.full((r,), g, device=dev, dtype=torch.long))
    acc &= ar[None, :] <= first_eos[:, None]
    n_acc = acc.sum(dim=1)

    # Distribution of the final token at position n_acc.
    rows = torch.arange(r, device=dev)
    p_stop = p[rows, n_acc]  # [R, V]
    rejected = n_acc < lens  # a verified draft failed
    final = p_stop.clone()
    if draft_probs is not None:
        q_stop = draft_probs.to(dev).float()[rows, n_acc.clamp(max=g - 1)]
    else:
        q_stop = torch.zeros(r, v, device=dev)
        q_stop[rows, draft_tokens[rows, n_acc.clamp(max=g - 1)]] = 1.0
    resid = (p_stop - q_stop).clamp_min(0.0)
    rs = resid.sum(-1, keepdim=True)
    use_resid = rejected & ~greedy & (rs.squeeze(-1) > 0)
    final = torch.where(use_resid[:, None], resid / rs.clamp_min(1e-30), final)
    bonus = torch.empty(r, dtype=torch.long, device=dev)
    if bool(greedy.any()):
        bonus[greedy] = p_stop[greedy].argmax(-1)
    samp = ~greedy
    if bool(samp.any()):
        bonus[samp] = torch.multinomial(final[samp], 1, generator=generator).squeeze(-1)
    bonus = torch.where(has_eos, torch.full_like(bonus, -1), bonus)

    tokens: list[list[int]] = []
    dt = draft_tokens.tolist()
    for i, (n, b) in enumerate(zip(n_acc.tolist(), bonus.tolist())):
        tokens.append(dt[i][:n] + ([b] if b >= 0 else []))
    num = torch.tensor([len(t) for t in tokens], dtype=torch.long)
    return VerifyResult(accept_lens=n_acc.cpu(), accept_flags=acc.cpu(), bonus=bonus.cpu(), tokens=tokens, num_emitted=num)
