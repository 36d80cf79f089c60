"""Per-request seeds (`sampling_seed`, OpenAI `seed`) honoured on every device, and kept
byte-identical under speculative decoding.

SGLang honours `sampling_seed` only under `--enable-deterministic-inference`, which its CPU
backend refuses; elsewhere a seed is silently ignored. Our plugin samples a seeded request's
token with a keyed Gumbel-max draw:

    token at the step whose input sits at position P = argmax_v  log p(v) + G(seed, P, v)

where p is the request's distribution after temperature, top-k, top-p and min-p (the same
`process_logits` the speculative worker uses) and G(seed, P, ·) is Gumbel noise from a torch
Generator seeded by a hash of (seed, P). This is an exact draw from p (Gumbel-max), it depends
only on the request's own logits, seed and position (not on which other requests share the
batch, unlike SGLang's seeded path, whose noise follows the sorted order of a batch-dependent
filter), and each row is computed on its own, so the numerics do not change with the batch
either.

Why this matters for speculation: the token a seeded request emits at position P is a
function of the logits there. The verifier computes that same function at every verified
position and accepts a draft while it equals it (greedy verification against the keyed
draw), so a seeded request's output is the plain server's output for that seed, token for
token. The drafter may use the same noise on its own distribution (coupled drafting): where
its distribution is close to the target's, the two draws agree, as greedy drafts do.

Hooks (registered by plugin.py, inert when no request in a step carries a seed):
- TpModelWorker.forward_batch_generation (AROUND): tags the step's sampling info with each
  row's seed (`agentserve_seeds`); SGLang makes a fresh forward copy of it every step.
- Sampler.forward (AROUND): SGLang samples as usual, then the seeded rows' tokens (and their
  returned logprobs) are replaced by the keyed draw.
Under --enable-deterministic-inference (SGLang's own seeded sampler on) both stand aside.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

import torch

from sglang_ext.dspark.sampling import GREEDY_EPS

log = logging.getLogger(__name__)

TP_TARGET = "sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation"
SAMPLER_TARGET = "sglang.srt.layers.sampler.Sampler.forward"
ATTR = "agentserve_seeds"
_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of x."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def key(seed: int, position: int) -> int:
    """The Generator seed of (request seed, position): distinct pairs give unrelated streams."""
    return _mix(_mix(int(seed) & _M64) ^ (int(position) & _M64)) >> 1  # manual_seed takes < 2**63


def gumbel(seed: int, position: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [vocab] (float64, CPU) for one (seed, position)."""
    g = torch.Generator().manual_seed(key(seed, position))
    u = torch.rand(vocab, generator=g, dtype=torch.float64).clamp_(min=1e-300)
    return -torch.log(-torch.log(u))  # u < 1 always (torch.rand draws from [0, 1))


def keyed_choice(probs: torch.Tensor, seed: int, position: int, noise: Optional[torch.Tensor] = None) -> int:
    """argmax_v log probs(v) + G(seed, position, v) for one row of probabilities [V]."""
    g = gumbel(seed, position, probs.shape[-1]) if noise is None else noise
    lp = probs.detach().to("cpu", torch.float64).log()  # log 0 = -inf: filtered tokens never win
    return int(torch.argmax(lp + g))


def processed(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, min_p: float = 0.0) -> torch.Tensor:
    """One row's distribution [V] as the keyed draw uses it: process_logits' semantics
    (softmax at the temperature; drop ranks >= top_k and tokens whose preceding mass already
    exceeds top_p, the most likely token always kept; renormalise), then min-p (tokens below
    min_p x the most likely one's probability).

    The top-k/top-p cut is found on a growing torch.topk prefix instead of a full sort of the
    vocabulary (5 ms a row on this CPU; a seeded row is drawn at every verified position)."""
    logits = logits.detach().float().reshape(-1)
    v = logits.numel()
    if temperature < GREEDY_EPS:
        return torch.nn.functional.one_hot(logits.argmax(), v).float()
    p = torch.softmax(logits / temperature, dim=-1)
    k_cap = int(top_k) if 0 < int(top_k) < v else v
    if top_p < 1.0 or k_cap < v:
        k = min(k_cap, 256)
        while True:
            vals, idx = torch.topk(p, k)  # descending: the first k of the sorted vocabulary
            keep = (torch.cumsum(vals, 0) - vals) <= top_p
            keep[0] = True
            if k >= k_cap or not bool(keep[-1]):
                break  # the rank cut, or the top-p cut inside the prefix
            k = min(k_cap, 4 * k)
        cut = torch.zeros_like(p)
        cut[idx[keep]] = vals[keep]
        p = cut / cut.sum()
    if min_p > 0.0:
        p = torch.where(p < min_p * p.max(), torch.zeros_like(p), p)
    return p


def sample_row(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, min_p: float,
               seed: int, position: int) -> int:
    """The seeded token of one row of raw logits [V] (what plain decoding emits)."""
    return keyed_choice(processed(logits, temperature, top_p, top_k, min_p), seed, position)


def request_seeds(reqs: Sequence[Any]) -> list[Optional[int]]:
    """Each request's seed (None: unseeded; greedy, whose token does not depend on noise; or
    with a custom logit processor, which SGLang applies inside its sampler: such a request is
    sampled by SGLang, unseeded, as before)."""
    out: list[Optional[int]] = []
    for r in reqs:
        sp = getattr(r, "sampling_params", None)
        seed = getattr(sp, "sampling_seed", None)
        greedy = sp is None or getattr(sp, "top_k", 0) == 1 or float(getattr(sp, "temperature", 1.0)) <= 1e-5
        custom = getattr(r, "custom_logit_processor", None)
        out.append(None if seed is None or greedy or custom else int(seed))
    return out


def step_seeds(sampling_info: Any) -> Optional[list[Optional[int]]]:
    """The seeds tagged on this step's sampling info, None when no row has one or SGLang's own
    seeded sampler is on (its sampling_seed tensor is set)."""
    seeds = getattr(sampling_info, ATTR, None)
    if not seeds or getattr(sampling_info, "sampling_seed", None) is not None:
        return None
    return seeds if any(s is not None for s in seeds) else None


def original_logprob() -> bool:
    """SGLANG_RETURN_ORIGINAL_LOGPROB: logprobs of the raw logits, before temperature."""
    from sglang.srt.layers.sampler import SGLANG_RETURN_ORIGINAL_LOGPROB

    return bool(SGLANG_RETURN_ORIGINAL_LOGPROB)


# ---- hooks
def around_tp_forward(original: Callable[..., Any], worker: Any, batch: Any = None, *args: Any, **kwargs: Any) -> Any:
    si = getattr(batch, "sampling_info", None)
    if si is not None:
        try:
            seeds = request_seeds(batch.reqs)
            setattr(si, ATTR, seeds if any(s is not None for s in seeds) else None)
        except Exception as e:  # a seed we cannot read is a seed we do not honour, never a failed step
            log.warning("seeded sampling: could not read the batch's seeds: %s", e)
    if not _tracing():
        return original(worker, batch, *args, **kwargs)
    # AGENTSERVE_STEP_TRACE: time every target forward, so a plain server's decode steps can be
    # set beside the speculative worker's steps at the same batch size (scripts/trace_summary.py)
    t0 = time.perf_counter()
    out = original(worker, batch, *args, **kwargs)
    mode = getattr(getattr(batch, "forward_mode", None), "name", "?")
    _trace_forward(mode, len(getattr(batch, "reqs", []) or []), time.perf_counter() - t0)
    return out


def _tracing() -> bool:
    from sglang_ext.spec import stats

    return stats.tracing()


def _trace_forward(mode: str, batch_size: int, seconds: float) -> None:
    from sglang_ext import config
    from sglang_ext.spec import stats

    prof = config.served()
    stats.trace_event("forward", {"server": prof.name, "algorithm": prof.drafter.algorithm, "mode": mode,
                                  "batch_size": batch_size, "seconds": seconds})


def around_sampler(original: Callable[..., Any], sampler: Any, logits_output: Any, sampling_info: Any,
                   return_logprob: bool, top_logprobs_nums: Any, token_ids_logprobs: Any, positions: torch.Tensor,
                   **kwargs: Any) -> Any:
    seeds = step_seeds(sampling_info)
    if seeds is None:
        return original(sampler, logits_output, sampling_info, return_logprob, top_logprobs_nums,
                        token_ids_logprobs, positions, **kwargs)
    logits = logits_output.next_token_logits
    rows = [i for i, s in enumerate(seeds) if s is not None and i < logits.shape[0]]
    raw = {i: logits[i].detach().float().clone() for i in rows}  # the sampler works in place
    out = original(sampler, logits_output, sampling_info, return_logprob, top_logprobs_nums,
                   token_ids_logprobs, positions, **kwargs)
    if not rows:
        return out
    pos = positions.view(-1).tolist()
    temps, tps = sampling_info.temperatures.view(-1).tolist(), sampling_info.top_ps.view(-1).tolist()
    tks, mps = sampling_info.top_ks.view(-1).tolist(), sampling_info.min_ps.view(-1).tolist()
    for i in rows:
        tok = sample_row(raw[i], temps[i], tps[i], int(tks[i]), mps[i], int(seeds[i]), int(pos[i]))
        out[i] = tok
        if return_logprob and getattr(logits_output, "next_token_logprobs", None) is not None:
            t = 1.0 if original_logprob() or temps[i] <= 0 else temps[i]
            logits_output.next_token_logprobs[i] = torch.log_softmax(raw[i] / t, dim=-1)[tok].to(
                logits_output.next_token_logprobs.dtype)
    return out
