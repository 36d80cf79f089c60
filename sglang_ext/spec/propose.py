"""Phase 1 of a decode step: read the batch, then propose drafts per request.

Each request gets a copy draft (session suffix index or radix tree continuation, chooser.py),
a DSpark model draft, or nothing. Which rows draft is decided before any drafting, from
pre-sampling information only (the copy proposals' confidences, the draft gate's past
acceptance, the measured step costs), so verification stays lossless. A step where no row
drafts skips the drafter entirely (the worker then runs plain decoding's step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from sglang.srt.managers.schedule_batch import ScheduleBatch

from sglang_ext.copy.chooser import HybridDecision, pad_block
from sglang_ext.copy.radix_walk import radix_continuation, walkable
from sglang_ext.dspark.sampling import SamplingParams
from sglang_ext.spec import plan as planning
from sglang_ext.spec import seeded_sampling
from sglang_ext.spec.stats import StepStats
from sglang_ext.tiers.policy import request_tags

if TYPE_CHECKING:
    from sglang_ext.spec.worker import AgentSparkWorker

log = logging.getLogger("agentserve.dspark_worker")


class NoiseCache:
    """Gumbel noise of the step's seeded rows, per (row, verify position j), made once and
    shared by the drafter (slot j) and the verifier (position j): the same (seed, position)."""

    def __init__(self, seeds: list[Optional[int]], anchor_pos: list[int]) -> None:
        self.seeds, self.pos = seeds, anchor_pos
        self.any = any(s is not None for s in seeds)
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def at(self, i: int, j: int, vocab: int) -> torch.Tensor:
        k = (i, j, vocab)
        if k not in self._cache:
            seed = self.seeds[i]
            assert seed is not None
            self._cache[k] = seeded_sampling.gumbel(seed, self.pos[i] + j, vocab)
        return self._cache[k]

    def block(self, i: int, g: int, vocab: int) -> torch.Tensor:
        return torch.stack([self.at(i, j, vocab) for j in range(g)])


def needs_sglang_sampler(req: Any, seeded: bool, custom: bool) -> bool:
    """Whether the request's next token depends on more than temperature/top-p/top-k (all that
    process_logits and verify_block model)."""
    sp = req.sampling_params
    return bool(sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0 or sp.repetition_penalty != 1.0
                or sp.min_new_tokens > 0 or sp.logit_bias or sp.min_p > 0.0
                or (custom and req.custom_logit_processor)
                or (seeded and sp.top_k > 1))  # a seed changes sampled rows only (greedy: top_k 1)


def sampler_rows(batch: ScheduleBatch) -> list[int]:
    """Rows whose next token needs SGLang's own sampler (worker docstring). The batch-level
    flags are checked first, so a batch without those features costs a few attribute reads;
    the rows are then confirmed per request, since some flags outlive the request that set
    them (logit_bias and need_min_p_sampling stay set for the batch after it leaves)."""
    si = batch.sampling_info
    orch = si.penalizer_orchestrator  # None in the scheduler's forward copy (acc_* hold it)
    seeded = si.sampling_seed is not None  # only under --enable-deterministic-inference
    if not (seeded or si.logit_bias is not None or si.need_min_p_sampling or si.has_custom_logit_processor
            or si.acc_additive_penalties is not None or si.acc_scaling_penalties is not None
            or (orch is not None and orch.is_required)):
        return []
    custom = bool(si.has_custom_logit_processor)
    return [i for i, r in enumerate(batch.reqs) if needs_sglang_sampler(r, seeded, custom)]


def sampling_params(batch: ScheduleBatch, device: Any) -> SamplingParams:
    si = batch.sampling_info
    bs = len(batch.reqs)
    top_k = si.top_ks.view(-1).long()
    # SGLang encodes greedy as top_k == 1 (temperature reset to 1).
    temp = torch.where(top_k == 1, torch.zeros_like(si.temperatures.view(-1)), si.temperatures.view(-1))
    return SamplingParams(temp.float().to(device), si.top_ps.view(-1).float().to(device),
                          top_k.to(device)).index(torch.arange(bs, device=device))


@dataclass
class StepInputs:
    """What every phase of one decode step reads about the batch."""

    batch: ScheduleBatch
    rids: list[str]
    anchors: torch.Tensor  # [bs] last emitted token per request (its KV is not yet written)
    seq_lens: torch.Tensor  # [bs] committed length = the anchor's position
    kv: float  # K/V positions this step's queries read (cost model)
    sampling: SamplingParams
    sampler_rows: list[int]  # rows that need SGLang's sampler: the step decodes plainly
    noise: NoiseCache

    @property
    def bs(self) -> int:
        return len(self.rids)


def read_inputs(batch: ScheduleBatch, device: Any) -> StepInputs:
    bs = len(batch.reqs)
    anchors = torch.tensor([r.output_ids[-1] if r.output_ids else r.origin_input_ids[-1] for r in batch.reqs],
                           dtype=torch.long, device=device)
    seq_lens = batch.seq_lens.to(device).long()
    # Seeded sampled rows: keyed draws, verified greedily (seeded_sampling.py).
    seeds = seeded_sampling.request_seeds(batch.reqs) if batch.sampling_info.sampling_seed is None else [None] * bs
    return StepInputs(batch, [r.rid for r in batch.reqs], anchors, seq_lens, float(seq_lens.sum()) if bs else 0.0,
                      sampling_params(batch, device), sampler_rows(batch), NoiseCache(seeds, seq_lens.tolist()))


@dataclass
class Proposal:
    """The step's drafts: [bs, g] tokens and confidences, how many of each row are real
    (max_len), the drafter's distributions q for the model rows (one-hot for copies)."""

    decisions: list[Optional[HybridDecision]]
    copy_rows: list[int] = field(default_factory=list)
    model_rows: list[int] = field(default_factory=list)
    drafts: Optional[torch.Tensor] = None
    conf: Optional[torch.Tensor] = None
    max_len: Optional[torch.Tensor] = None
    q_probs: Optional[torch.Tensor] = None
    best_w: int = 0  # the cost check's verify width for copy-only steps (plan.best_width)
    copy_lens: dict[int, int] = field(default_factory=dict)  # ragged: each copy row's length

    @property
    def drafting(self) -> bool:
        return bool(self.copy_rows or self.model_rows)


def propose(w: AgentSparkWorker, inp: StepInputs, stats: StepStats) -> Proposal:
    """Copy decisions, the pre-draft cost check, then the drafter for the model rows. A
    drafter failure leaves the model rows without drafts (they verify the anchor only)."""
    bs, rids = inp.bs, inp.rids
    decisions = copy_decisions(w, inp.batch, inp.sampling.is_greedy)
    if inp.sampler_rows:  # a request needs SGLang's sampler: nobody drafts (worker docstring)
        return Proposal(decisions)
    copy_rows = [i for i, d in enumerate(decisions) if d is not None and d.use_copy]
    gated = w.scheduler_mode != "verify_all"  # the verify-all baseline drafts everything
    model_rows: list[int] = []
    probing = False
    has_drafter = w.drafter is not None and w.block > 0
    w.gate.begin_step(bs)  # "auto" pricing follows the batch size
    t_token, t_extra = planning.draft_costs(w, bs, inp.kv) if has_drafter else (0.0, 0.0)
    for i in range(bs):
        if i in copy_rows:
            continue
        d = (w.gate.decide(rids[i], t_token, t_extra) if gated else "draft") if has_drafter else "skip"
        if d != "skip":
            model_rows.append(i)
            # a probe must draft; so must a row whose verify the plan cuts from its confidences
            # (the width check would price its whole block)
            probing |= d == "probe" or w.gate.cuts_verify
        elif decisions[i] is not None and decisions[i].tokens:
            # the chooser preferred the model but the model will not draft (the gate priced it
            # out, or there is no drafter): the copy it passed over is the best draft this row
            # has, and it is known before the step like any copy
            decisions[i].source = "copy"
            copy_rows.append(i)
    best_w, copy_lens = (planning.best_width(w, decisions, copy_rows, model_rows, rids, bs, inp.kv)
                         if gated and (copy_rows or model_rows) else (0, {}))
    if gated and best_w <= 1 and not probing:
        # this step decodes plainly (decided before any drafting); a probe drafts anyway, or a
        # drafter the width check once priced too dear would never be measured again
        return Proposal(decisions)
    g = w.copy_block
    prop = Proposal(decisions, copy_rows, model_rows, best_w=best_w, copy_lens=copy_lens,
                    drafts=torch.zeros(bs, g, dtype=torch.long, device=w.device),
                    conf=torch.zeros(bs, g, dtype=torch.float32, device=w.device),
                    max_len=torch.zeros(bs, dtype=torch.long))
    assert prop.drafts is not None and prop.conf is not None and prop.max_len is not None
    for i in copy_rows:
        d = decisions[i]
        assert d is not None
        toks, c, n = pad_block(d.tokens, d.confidences, g)
        prop.drafts[i] = torch.tensor(toks, device=w.device)
        prop.conf[i] = torch.tensor(c, device=w.device)
        prop.max_len[i] = n
    if model_rows:
        try:
            _model_drafts(w, inp, prop)
        except Exception as e:
            w.drafter_failed(e)
            stats.fallback = True
            for i in model_rows:
                prop.max_len[i] = 0
                prop.conf[i] = 0
            prop.model_rows, prop.q_probs = [], None
    return prop


def _model_drafts(w: AgentSparkWorker, inp: StepInputs, prop: Proposal) -> None:
    assert w.drafter is not None and w.contexts is not None
    assert prop.drafts is not None and prop.conf is not None and prop.max_len is not None
    # the model's block is its trained size; copies may use the whole verify width (copy_block)
    b, rows = w.block, prop.model_rows
    idx = torch.tensor(rows, device=w.device)
    ctxs = []
    for i, a in zip(rows, inp.seq_lens[idx].tolist()):
        w.contexts.trim(inp.rids[i], a)  # positions from the anchor on are redone
        ctxs.append(w.contexts.get(inp.rids[i]))
    keyed = {k: inp.noise.block(i, b, w.vocab) for k, i in enumerate(rows) if inp.noise.seeds[i] is not None}
    blk = w.drafter.draft_block(ctxs, inp.anchors[idx], inp.seq_lens[idx], inp.sampling.index(idx),
                                generator=w.generator, gumbel=keyed or None)
    prop.drafts[idx, :b] = blk.tokens[:, :b]
    mconf = blk.confidences if blk.confidences is not None else torch.full_like(blk.tokens, 0.5, dtype=torch.float)
    prop.conf[idx, :b] = mconf[:, :b].float()
    prop.max_len[idx.cpu()] = b
    # one-hot rows for copied drafts: their proposal is deterministic
    q = torch.nn.functional.one_hot(prop.drafts, blk.q_probs.shape[-1]).float()
    q[idx, :b] = blk.q_probs[:, :b].float()
    prop.q_probs = q


def copy_decisions(w: AgentSparkWorker, batch: ScheduleBatch, greedy: torch.Tensor) -> list[Optional[HybridDecision]]:
    """Per request: copy or model, decided before any block of this step is sampled."""
    if w.index is None:
        return [None] * len(batch.reqs)
    out: list[Optional[HybridDecision]] = []
    root = _radix_root(w, batch)
    for i, req in enumerate(batch.reqs):
        key = w.index_key(req)
        if req.rid not in w.synced:
            w.index.sync(key, list(req.origin_input_ids) + list(req.output_ids))
            w.synced.add(req.rid)
        proposal = w.index.propose(key, None, w.copy_block)
        chooser = w.choosers["greedy" if bool(greedy[i]) else "sampled"]
        d = chooser.decide(req.rid, proposal)
        if root is not None:
            # what followed this exact sequence in an earlier request (radix tree)
            rp = radix_continuation(root, list(req.origin_input_ids) + list(req.output_ids), w.copy_block)
            if rp is not None:
                rd = chooser.decide(req.rid, rp, origin="radix")
                if rd.use_copy and (not d.use_copy or rd.expected_copy > d.expected_copy):
                    d = rd
        out.append(d)
    return out


def _radix_root(w: AgentSparkWorker, batch: ScheduleBatch) -> Any:
    """The radix tree's root when it can be walked from Python (else None, logged once)."""
    if not w.radix_walk:
        return None
    try:
        root = batch.tree_cache.root_node
    except Exception:  # e.g. a tree core without Python nodes
        root = None
    if root is None or not walkable(root):
        w.radix_walk = False
        log.warning("AGENTSPARK: radix tree of %s cannot be walked from Python; radix drafting off "
                    "(set SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python)", type(batch.tree_cache).__name__)
        return None
    return root


def step_start(w: AgentSparkWorker, batch: ScheduleBatch) -> StepStats:
    """Bookkeeping before the step: forget finished requests, what the continuing ones waited."""
    rids = [r.rid for r in batch.reqs]
    stats = StepStats(batch_size=len(rids))
    t_start = time.perf_counter()
    stats.waited = [r in w.prev_rids for r in rids]
    stats.gap_s = 0.0 if w.decode_end is None else t_start - w.decode_end
    stats.prefill_s, w.prefill_s = w.prefill_s, 0.0
    for gone in w.prev_rids - set(rids):
        w.forget(gone)
    w.prev_rids = set(rids)
    w.expire_sessions()
    if w.pacer is not None:
        w.pacer.decode_step()
    tags = [request_tags(r) for r in batch.reqs]
    stats.agents, stats.tiers = [t[0] for t in tags], [t[1] for t in tags]
    return stats
