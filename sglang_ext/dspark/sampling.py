"""Logits processing and sequential (left-to-right) block sampling.

Semantics follow SGLang's sampler: probs = softmax(logits / T); then, on the probabilities
sorted in descending order, drop every token whose preceding cumulative mass already
exceeds top_p, drop every rank >= top_k, renormalise.  T == 0 (or below ``GREEDY_EPS``) means
greedy: a one-hot on the argmax of the raw logits.  The *same* function is used for the draft
distribution q and the target distribution p, which is what lossless verification needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

GREEDY_EPS = 1e-5
TOP_K_ALL = 1 << 30


@dataclass
class SamplingParams:
    """Per-request sampling parameters as batched tensors (length R)."""

    temperature: torch.Tensor  # float [R]; 0 => greedy
    top_p: torch.Tensor  # float [R]; 1 => off
    top_k: torch.Tensor  # long [R]; <=0 or >=V => off

    @classmethod
    def make(
        cls,
        temperature: Sequence[float] | float,
        top_p: Sequence[float] | float = 1.0,
        top_k: Sequence[int] | int = -1,
        n: int | None = None,
        device: torch.device | str | None = None,
    ) -> "SamplingParams":
        def vec(x: Sequence[float] | float, dtype: torch.dtype) -> torch.Tensor:
            if isinstance(x, (int, float)):
                assert n is not None, "n is required for scalar sampling params"
                return torch.full((n,), x, dtype=dtype, device=device)
            return torch.as_tensor(list(x), dtype=dtype, device=device)

        return cls(vec(temperature, torch.float32), vec(top_p, torch.float32), vec(top_k, torch.long))

    def __len__(self) -> int:
        return int(self.temperature.shape[0])

    @property
    def is_greedy(self) -> torch.Tensor:
        return self.temperature < GREEDY_EPS

    def index(self, idx: torch.Tensor) -> "SamplingParams":
        return SamplingParams(self.temperature[idx], self.top_p[idx], self.top_k[idx])

    def expand(self, times: int) -> "SamplingParams":
        """Repeat each request's params `times` times (row r -> rows r*times..)."""
        return SamplingParams(
            self.temperature.repeat_interleave(times),
            self.top_p.repeat_interleave(times),
            self.top_k.repeat_interleave(times),
        )


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [N, V] -> probabilities [N, V] (float32) after temperature/top-k/top-p.

    Rows whose temperature is 0 become one-hot on argmax(logits) (first index on ties, as
    torch.argmax does in the target's greedy decoding).
    """
    logits = logits.float()
    n, v = logits.shape
    dev = logits.device
    temp = params.temperature.to(dev).float()
    greedy = temp < GREEDY_EPS
    safe_t = torch.where(greedy, torch.ones_like(temp), temp)
    probs = torch.softmax(logits / safe_t[:, None], dim=-1)

    top_k = params.top_k.to(dev).long()
    top_k = torch.where((top_k <= 0) | (top_k >= v), torch.full_like(top_k, TOP_K_ALL), top_k)
    top_p = params.top_p.to(dev).float()
    need_filter = ((top_k < v) | (top_p < 1.0)) & ~greedy
    if bool(need_filter.any()):
        rows = need_filter.nonzero(as_tuple=True)[0]
        probs[rows] = _filter_rows(probs[rows], top_p[rows], top_k[rows])
    if bool(greedy.any()):
        rows = greedy.nonzero(as_tuple=True)[0]
        onehot = torch.zeros(rows.numel(), v, device=dev)
        onehot.scatter_(1, logits[rows].argmax(dim=-1, keepdim=True), 1.0)
        probs[rows] = onehot
    return probs


def _filter_rows(p: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Top-k/top-p on rows p [n, V], renormalised: the result a stable descending sort of each
    row would give (ties ranked by token id), without sorting the vocabulary.

    How many tokens a row keeps depends only on its sorted values, so it is found on a
    torch.topk prefix that grows until every row's cut lies inside it (a full sort of a 49k
    vocabulary is ~5 ms a row on a small CPU, and a sampled request is verified at every drafted
    position). The kept set is then every token above the last kept value plus, among tokens
    equal to it, the lowest ids: exactly the stable sort's choice, whatever order topk returns
    ties in."""
    n, v = p.shape
    k_cap = torch.clamp(top_k, max=v)  # top_k is TOP_K_ALL when off
    k = min(v, 256)
    while True:
        vals, _ = torch.topk(p, k, dim=-1)  # descending
        before = torch.cumsum(vals, dim=-1) - vals
        ranks = torch.arange(k, device=p.device)[None, :]
        drop = (before > top_p[:, None]) | (ranks >= k_cap[:, None])
        drop[:, 0] = False  # the top token always survives
        # both conditions only grow with rank: a row whose last prefix slot is dropped, or
        # whose rank cut is inside the prefix, keeps nothing beyond it
        if k >= v or bool((drop[:, -1] | (k_cap <= k)).all()):
            break
        k = min(v, 4 * k)
    n_keep = (~drop).sum(dim=-1)  # >= 1
    last = vals.gather(1, (n_keep - 1)[:, None])  # the smallest kept value
    above = p > last
    tied = p == last
    need = n_keep[:, None] - above.sum(dim=-1, keepdim=True)  # tied tokens to keep, lowest ids first
    keep = above | (tied & (torch.cumsum(tied.int(), dim=-1) <= need))
    out = p.masked_fill(~keep, 0.0)
    return out / out.sum(dim=-1, keepdim=True)


def sample_from_probs(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One draw per row.  One-hot rows return their index without consuming extra randomness
    semantics (multinomial still returns the only non-zero index)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# A step of the sequential head: (prev_tokens [R], h_k [R, d], state) -> (bias [R, V], state)
BiasStep = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], "tuple[torch.Tensor, Optional[torch.Tensor]]"]


@dataclass
class BlockSample:
    tokens: torch.Tensor  # long [R, gamma]
    q_probs: torch.Tensor  # float [R, gamma, V]: the exact distribution each token was drawn from
    logits: torch.Tensor  # float [R, gamma, V]: base + sequential bias, before processing
    prev_tokens: torch.Tensor  # long [R, gamma]: x_{k-1} for each slot (anchor for slot 0)


def sample_block_sequential(
    base_logits: torch.Tensor,
    hidden: torch.Tensor,
    anchors: torch.Tensor,
    params: SamplingParams,
    bias_step: Optional[BiasStep],
    generator: Optional[torch.Generator] = None,
    init_state: Optional[torch.Tensor] = None,
    gumbel: Optional[dict[int, torch.Tensor]] = None,
    token_map: Optional[torch.Tensor] = None,
    token_map_vocab: int = 0,
) -> BlockSample:
    """Left-to-right sampling p_k(v) = softmax(U_k(v) + B_k(x_{<k}, v)) processed by `params`.

    base_logits [R, g, V], hidden [R, g, d], anchors [R].  With bias_step None this is plain
    parallel (DFlash-style) sampling. `gumbel` {row: noise [g, V]}: those rows draw slot k as
    argmax log p_k + noise[k] (a seeded request's keyed draw, seeded_sampling.py) instead of
    from the generator.
    `token_map` [K] (a truncated draft vocabulary): base logits and biases are over K draft
    tokens; tokens come back as full-vocabulary ids and q_probs / logits over the full
    vocabulary of size `token_map_vocab`, zero (resp. -inf) outside the draft vocabulary, so
    verification treats an undraftable token as q = 0 and stays lossless.
    """
    r, g, v = base_logits.shape
    dev = base_logits.device
    vf = v if token_map is None else int(token_map_vocab)
    tokens = torch.empty(r, g, dtype=torch.long, device=dev)  # draft-vocabulary ids until the end
    logits_d = torch.empty(r, g, v, dtype=torch.float32, device=dev)
    tm = None if token_map is None else token_map.to(dev).long()
    prevs = torch.empty(r, g, dtype=torch.long, device=dev)
    prev = anchors.long()
    state = init_state
    # Greedy rows are one-hot after processing: argmax of the logits is the same draw (first
    # index on ties, as process_logits' one-hot) without softmax or multinomial, and q is
    # written once after the loop. The scatter into the full vocabulary is one call per block.
    all_greedy = bool(params.is_greedy.all())
    probs_d = None if all_greedy else torch.empty(r, g, v, dtype=torch.float32, device=dev)
    for k in range(g):
        logits_k = base_logits[:, k].float()
        if bias_step is not None:
            bias, state = bias_step(prev, hidden[:, k], state)
            logits_k = logits_k + bias.float()
        logits_d[:, k] = logits_k
        if all_greedy:
            x = logits_k.argmax(-1)
        else:
            probs = process_logits(logits_k, params)
            x = sample_from_probs(probs, generator)
            for i, noise in (gumbel or {}).items():
                nz = noise[k] if tm is None else noise[k][tm.cpu()]
                x[i] = torch.argmax(probs[i].double().log().cpu() + nz).to(x.device)
            assert probs_d is not None
            probs_d[:, k] = probs
        tokens[:, k] = x
        prevs[:, k] = prev
        prev = x if tm is None else tm[x]
    if tm is not None:
        tokens = tm[tokens]
    if probs_d is None:
        q = torch.zeros(r, g, vf, dtype=torch.float32, device=dev)
        q.scatter_(2, tokens[..., None], 1.0)
    elif tm is None:
        q = probs_d
    else:
        q = torch.zeros(r, g, vf, dtype=torch.float32, device=dev)
        q.index_copy_(2, tm, probs_d)
    if tm is None:
        all_logits = logits_d
    else:
        all_logits = torch.full((r, g, vf), float("-inf"), dtype=torch.float32, device=dev)
        all_logits.index_copy_(2, tm, logits_d)
    return BlockSample(tokens=tokens, q_probs=q, logits=all_logits, prev_tokens=prevs)
