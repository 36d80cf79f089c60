"""Phase 4 of a decode step: lossless acceptance of the verified drafts.

Greedy rows accept while the draft is the target's argmax; sampled rows accept x with
probability min(1, p(x)/q(x)) and resample from the residual (dspark/verify.py); then a bonus
token. Seeded sampled rows are verified greedily against the keyed draw plain decoding makes
at each position (seeded_sampling.py), so they emit plain decoding's tokens for that seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sglang.srt.managers.schedule_batch import ScheduleBatch

from sglang_ext.dspark.sampling import SamplingParams, process_logits
from sglang_ext.dspark.verify import verify_block
from sglang_ext.spec import seeded_sampling

if TYPE_CHECKING:
    from sglang_ext.spec.plan import Plan
    from sglang_ext.spec.propose import NoiseCache, Proposal, StepInputs
    from sglang_ext.spec.verify import Forward
    from sglang_ext.spec.worker import AgentSparkWorker


def accept(w: AgentSparkWorker, inp: StepInputs, prop: Proposal, pl: Plan, fwd: Forward) -> list[list[int]]:
    """Tokens emitted per request: accepted drafts, then the correction or bonus token."""
    batch, bs, width, sampling = inp.batch, inp.bs, pl.width, inp.sampling
    assert prop.drafts is not None and fwd.tokens is not None
    logits = fwd.logits
    if batch.has_grammar:
        grammar_mask(batch, fwd.tokens, width, w.device).apply(logits)
    if pl.ragged:  # back to [bs, width, V]; positions past a row's width are never read
        rows = torch.repeat_interleave(torch.arange(bs, device=w.device), torch.tensor(pl.widths, device=w.device))
        p = logits.new_zeros(bs, width, logits.shape[-1])
        p[fwd.keep] = process_logits(logits, sampling.index(rows))
    else:
        p = process_logits(logits.view(bs * width, -1), sampling.expand(width)).view(bs, width, -1)
    greedy = sampling.is_greedy
    if inp.noise.any:
        greedy = keyed_targets(p, logits, pl.widths, sampling, inp.noise, greedy, prop.drafts, pl.lens)
    q = None if prop.q_probs is None else prop.q_probs[:, : width - 1]
    vr = verify_block(prop.drafts[:, : width - 1], p, q, verify_lens=pl.lens.to(w.device), greedy=greedy,
                      generator=w.generator)
    return vr.tokens  # accepted drafts + bonus (no bonus after an accepted EOS)


def keyed_targets(p: torch.Tensor, logits: torch.Tensor, widths: list[int], sampling: SamplingParams,
                  noise: NoiseCache, greedy: torch.Tensor, drafts: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Seeded rows: p[i, j] becomes one-hot on the keyed draw at that position, computed
    from the row's raw logits exactly as plain decoding's Sampler hook does (one row at a
    time, seeded_sampling.sample_row), and the row is verified greedily against it. Rows
    are drawn left to right up to the first draft that differs (or the bonus position):
    verification never reads past it. Returns the greedy mask including those rows."""
    greedy = greedy.clone()
    start = 0
    for i, w in enumerate(widths):
        seed = noise.seeds[i]
        if seed is not None:
            t, tp, tk = (float(sampling.temperature[i]), float(sampling.top_p[i]), int(sampling.top_k[i]))
            for j in range(w):
                row = logits[start + j]  # ragged or not, request i's rows are consecutive
                probs = seeded_sampling.processed(row, t, tp, tk)
                tok = seeded_sampling.keyed_choice(probs, seed, noise.pos[i] + j, noise.at(i, j, probs.shape[-1]))
                p[i, j].zero_()
                p[i, j, tok] = 1.0
                if j >= int(lens[i]) or tok != int(drafts[i, j]):
                    break
            greedy[i] = True
        start += w
    return greedy


def grammar_mask(batch: ScheduleBatch, tokens: torch.Tensor, width: int, device: Any) -> Any:
    from sglang.srt.speculative.spec_utils import GrammarTree, build_grammar_vocab_mask

    bs = tokens.shape[0]
    nxt = torch.arange(1, width + 1)
    nxt[-1] = -1
    tree = GrammarTree.from_host(nxt.expand(bs, width).contiguous(), torch.full((bs, width), -1, dtype=torch.long),
                                 tokens.cpu().to(torch.int64))
    return build_grammar_vocab_mask(reqs=batch.reqs, tree=tree, sampling_info=batch.sampling_info,
                                    device=device, barrier=None)


def write_logprobs(batch: ScheduleBatch, logits: torch.Tensor, widths: list[int], width: int,
                   emitted: list[list[int]], sampling: SamplingParams, out: Any) -> None:
    """Logprobs of every emitted token, as plain decoding's Sampler computes them: the
    log-softmax of the logits at the position that emitted the token, divided by the
    request's temperature where it samples (greedy rows, or SGLANG_RETURN_ORIGINAL_LOGPROB:
    the raw logits). Written in SGLang's speculative layout, which its output processor
    reads: next_token_logprobs [bs, width], top-k and token-id lists flat at i * width + j.
    The tokens are already chosen, so this changes no output."""
    from sglang.srt.layers.logprob_processor import OutputLogprobProcessor
    from sglang.srt.layers.sampler import SGLANG_RETURN_ORIGINAL_LOGPROB

    bs = len(widths)
    starts = [0]
    for n in widths[:-1]:
        starts.append(starts[-1] + n)
    src = torch.tensor([starts[i] + min(j, widths[i] - 1) for i in range(bs) for j in range(width)],
                       device=logits.device)
    rows = logits[src].float()
    if not SGLANG_RETURN_ORIGINAL_LOGPROB:
        t = sampling.temperature.to(rows.device).float()
        t = torch.where(t > 0, t, torch.ones_like(t)).repeat_interleave(width)
        rows = rows / t[:, None]
    lp = torch.log_softmax(rows, dim=-1)
    toks = torch.tensor([e[j] if j < len(e) else 0 for e in emitted for j in range(width)], device=lp.device)
    tops = [n for n in (batch.top_logprobs_nums or [0] * bs) for _ in range(width)]
    ids = [x for x in (batch.token_ids_logprobs or [None] * bs) for _ in range(width)]
    res = OutputLogprobProcessor().compute_logprobs(lp, tops, ids, toks)
    res.write_output_to(out)
    out.next_token_logprobs = out.next_token_logprobs.view(bs, width)
