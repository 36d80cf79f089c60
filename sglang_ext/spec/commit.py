"""Phase 5 of a decode step: commit what was emitted, then learn from it.

`commit` hands SGLang the emitted tokens in its speculative layout and grows each drafter
context by the committed positions' target features. The committed KV needs no move: a chain
verify wrote each request's positions at consecutive slots from its front, which is where
SGLang's move_accept_tokens_to_target_kvcache would put them (an identity copy).

`learn` runs after the commit and changes no output of this step: the copy index and
choosers, the draft gate, the step-cost model, metrics, the load report and the step trace.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

import torch

from sglang.srt.managers.scheduler import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.speculative.ngram_info import NgramVerifyInput

from sglang_ext.spec import stats as worker_metrics
from sglang_ext.spec.plan import prefix_products
from sglang_ext.spec.stats import COPY_SOURCES, ORIGIN_SOURCE, StepStats

if TYPE_CHECKING:
    from sglang_ext.spec.plan import Plan
    from sglang_ext.spec.propose import Proposal, StepInputs
    from sglang_ext.spec.verify import Forward
    from sglang_ext.spec.worker import AgentSparkWorker


def commit(w: AgentSparkWorker, inp: StepInputs, widths: list[int], fwd: Forward, emitted: list[list[int]],
           on_publish: Any) -> GenerationBatchResult:
    batch, bs, device = inp.batch, inp.bs, w.device
    accept_lens = torch.tensor([len(t) for t in emitted], dtype=torch.int32, device=device)
    # Rows padded to the maximum width: SGLang's relay buffers keep one shape across steps.
    accept_tokens = torch.zeros(bs, w.max_width, dtype=torch.int32, device=device)
    for i, toks in enumerate(emitted):
        accept_tokens[i, : len(toks)] = torch.tensor(toks, dtype=torch.int32, device=device)
    new_seq_lens = batch.seq_lens + accept_lens
    hs = fwd.res.logits_output.hidden_states
    if w.contexts is not None and hs is not None:  # drafter context: committed positions' features
        try:
            start = 0
            for i, rid in enumerate(inp.rids):
                w.contexts.append(rid, hs[start:start + int(accept_lens[i])], int(inp.seq_lens[i]))
                start += widths[i]
        except Exception as e:
            w.drafter_failed(e)
    if on_publish is not None:
        on_publish(new_seq_lens)
    batch.forward_mode = ForwardMode.DECODE
    flat = accept_tokens.flatten()
    return GenerationBatchResult(
        logits_output=fwd.res.logits_output, next_token_ids=flat, can_run_cuda_graph=fwd.res.can_run_cuda_graph,
        accept_lens=accept_lens, new_seq_lens=new_seq_lens,
        next_draft_input=NgramVerifyInput(draft_token_num=w.max_width, new_seq_lens=new_seq_lens,
                                          accept_tokens=flat, accept_lens=accept_lens),
        speculative_num_draft_tokens=w.max_width,
    )


def learn(w: AgentSparkWorker, inp: StepInputs, prop: Proposal, lens: list[int], widths: list[int],
          emitted: list[list[int]], stats: StepStats) -> None:
    """Everything the step teaches, after its tokens are committed."""
    bs, rids = inp.bs, inp.rids
    n_tokens = sum(widths)
    stats.verify_width, stats.verify_lens, stats.verify_tokens = max(widths, default=1), lens, n_tokens
    stats.emitted = [len(t) for t in emitted]
    stats.accepted = [n - 1 for n in stats.emitted]
    stats.sources = [ORIGIN_SOURCE[prop.decisions[i].origin]  # type: ignore[union-attr]
                     if i in prop.copy_rows else "model" if i in prop.model_rows else "none" for i in range(bs)]
    w.sps.observe(n_tokens, stats.verify_s, inp.kv)
    w.gate.observe_draft(len(prop.model_rows), stats.draft_s)
    for i in prop.model_rows:
        conf = prop.conf[i].tolist() if prop.conf is not None else None
        expected = sum(prefix_products(conf[: lens[i]])) if conf is not None else None
        block = sum(prefix_products(conf[: w.block])) if conf is not None else None
        w.gate.observe_model(rids[i], stats.accepted[i], expected, block)
    _learn_copies(w, inp, prop, stats, emitted)
    if worker_metrics.tracing():  # only the step trace reads these
        conf = prop.conf
        stats.expected = [sum(prefix_products(conf[i, : lens[i]].tolist())) if i in prop.copy_rows and conf is not None
                          else min(w.gate.expected(rids[i]), float(lens[i])) if i in prop.model_rows else 0.0
                          for i in range(bs)]
        stats.rids, stats.t = rids, time.time()
        stats.proposed = prop.max_len.tolist() if prop.max_len is not None else [0] * bs
    w.last = stats
    worker_metrics.observe_step(stats)
    worker_metrics.index_memory(w.index)
    w.load.observe_agents(stats.agents, stats.emitted, stats.accepted, stats.sources)
    w.load.observe(rids, stats.tiers, stats.emitted, w.sps.curve,
                   behind=w.tier_policy.behind if w.scheduler_mode == "tier_aware" else None,
                   stall_s=stats.prefill_s, plain=n_tokens <= bs)
    worker_metrics.trace_step(stats)
    w.decode_end = time.perf_counter()


def _learn_copies(w: AgentSparkWorker, inp: StepInputs, prop: Proposal, stats: StepStats,
                  emitted: list[list[int]]) -> None:
    """The index learns the emitted tokens, the choosers the outcome."""
    if w.index is None:
        return
    greedy = inp.sampling.is_greedy
    for i, req in enumerate(inp.batch.reqs):
        w.index.extend(w.keys.get(req.rid) or w.index_key(req), emitted[i])
        chooser = w.choosers["greedy" if bool(greedy[i]) else "sampled"]
        ell, acc = stats.verify_lens[i], stats.accepted[i]
        d: Optional[Any] = prop.decisions[i]
        if stats.sources[i] in COPY_SOURCES and d is not None:
            chooser.observe_copy(d, acc, ell, rejected=acc < ell)
        elif stats.sources[i] == "model" and prop.conf is not None:
            chooser.observe_model(req.rid, prop.conf[i].tolist())
