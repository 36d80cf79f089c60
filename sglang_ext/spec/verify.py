"""Phase 3 of a decode step: the target forward.

- `verify`: one TARGET_VERIFY forward over [anchor, x_1 .. x_{l_r}] per request with a chain
  mask. Two layouts: uniform (every row padded to the plan's width W: SGLang's own layout,
  which every attention backend reads) and ragged (each row only its own 1 + l_r positions,
  packed, `agentserve_widths`), used only where the backend says it reads it
  (cpu/attention.supports_ragged_verify).
- `plain`: a step where nothing is verified beyond the anchor is plain decoding's step: a
  DECODE forward of one token per request, sampled by SGLang's own sampler (penalties,
  logit_bias, min_p, grammar, seeds, logprobs: all as plain decoding), hidden states
  captured only when a drafter will read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode
from sglang.srt.speculative.ngram_info import NgramVerifyInput

if TYPE_CHECKING:
    from sglang_ext.spec.plan import Plan
    from sglang_ext.spec.propose import Proposal, StepInputs
    from sglang_ext.spec.worker import AgentSparkWorker


@dataclass
class Forward:
    res: Any  # the target worker's GenerationBatchResult
    logits: torch.Tensor  # fp32 [n_tokens, V]
    tokens: Optional[torch.Tensor]  # [bs, width] the verified block (None: plain step)
    keep: Optional[torch.Tensor]  # ragged: [bs, width] which positions ran


def verify(w: AgentSparkWorker, inp: StepInputs, prop: Proposal, pl: Plan) -> Forward:
    from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_func

    batch, bs, width, device = inp.batch, inp.bs, pl.width, w.device
    assert prop.drafts is not None
    tokens = torch.cat([inp.anchors[:, None], prop.drafts[:, : width - 1]], dim=1)
    chain = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    positions = inp.seq_lens[:, None] + torch.arange(width, device=device)
    batch.forward_mode = ForwardMode.TARGET_VERIFY
    keep = None
    if pl.ragged:
        keep = torch.arange(width, device=device)[None, :] < torch.tensor(pl.widths, device=device)[:, None]
        rpi = batch.req_pool_indices.to(device).long()
        batch.input_ids = tokens[keep].to(torch.int64)
        batch.out_cache_loc = batch.req_to_token_pool.req_to_token[rpi[:, None], positions][keep].to(torch.int64)
        positions = positions[keep]
    else:
        batch.input_ids = tokens.flatten().to(torch.int64)
        positions = positions.flatten()
        batch.out_cache_loc = assign_extend_cache_locs_func(
            req_pool_indices=batch.req_pool_indices, req_to_token=batch.req_to_token_pool.req_to_token,
            start_offset=batch.seq_lens, end_offset=batch.seq_lens + width, batch_size=bs,
            draft_token_num=width, device=device)
    nxt = torch.arange(1, width + 1, device=device)
    nxt[-1] = -1
    spec = NgramVerifyInput(
        draft_token=batch.input_ids, custom_mask=chain.expand(bs, width, width).flatten(), positions=positions,
        retrieve_index=torch.arange(bs * width, device=device).view(bs, width),
        retrieve_next_token=nxt.expand(bs, width).contiguous(),
        retrieve_next_sibling=torch.full((bs, width), -1, dtype=torch.long, device=device),
        draft_token_num=width)
    spec.capture_hidden_mode = CaptureHiddenMode.FULL if w.drafter is not None else CaptureHiddenMode.NULL
    if pl.ragged:
        spec.custom_mask = None
        spec.agentserve_widths = pl.widths  # read by cpu/attention.py, the only backend that can
    batch.spec_info = spec
    res = w.target_worker.forward_batch_generation(batch, is_verify=True)
    return Forward(res, res.logits_output.next_token_logits.float(), tokens, keep)


def plain(w: AgentSparkWorker, inp: StepInputs) -> Forward:
    """Plain decoding's step. In speculative mode SGLang leaves seq_lens at the committed
    length (the anchor not counted) and has already reserved the anchor's KV slot; a DECODE
    forward expects seq_lens to include the token it decodes, so they are raised by one for
    the forward and put back after (the commit phase sets the new lengths)."""
    batch = inp.batch
    rpi = batch.req_pool_indices.to(w.device).long()
    saved = (batch.seq_lens, batch.seq_lens_cpu, batch.orig_seq_lens, batch.seq_lens_sum, batch.spec_info)
    batch.forward_mode = ForwardMode.DECODE
    batch.input_ids = inp.anchors.to(torch.int64)
    batch.out_cache_loc = batch.req_to_token_pool.req_to_token[rpi, inp.seq_lens].to(torch.int64)
    batch.seq_lens = batch.seq_lens + 1
    if batch.seq_lens_cpu is not None:
        batch.seq_lens_cpu = batch.seq_lens_cpu + 1
    if batch.orig_seq_lens is not None:
        batch.orig_seq_lens = batch.orig_seq_lens + 1
    batch.seq_lens_sum, batch.spec_info = None, None
    capture = CaptureHiddenMode.FULL if w.drafter is not None else CaptureHiddenMode.NULL
    try:
        res = w.target_worker.forward_batch_generation(batch, capture_hidden_mode=capture)
    finally:
        batch.seq_lens, batch.seq_lens_cpu, batch.orig_seq_lens, batch.seq_lens_sum, batch.spec_info = saved
    out = res.logits_output
    if batch.return_logprob and out.next_token_logprobs is not None:
        out.next_token_logprobs = out.next_token_logprobs.view(-1, 1)  # the speculative layout: [bs, width 1]
    return Forward(res, out.next_token_logits, None, None)
