"""AGENTSPARK: the DSpark speculative worker inside SGLang's scheduler, on any device.

One decode step, for the batch's requests r (anchor = last emitted token, at position a_r =
seq_len_r, whose KV is not yet written):
1. draft  — the DSpark drafter proposes a block x_1..x_g per request from its own per-request
   context K/V (target features of committed positions), with the exact distribution q of
   each token and a calibrated confidence c_k;
2. schedule — Algorithm 1 over the prefix survivals Π c picks per-request verify lengths ℓ_r
   against the profiled SPS(B) table; the step verifies W = 1 + max ℓ_r positions per request;
3. verify — one TARGET_VERIFY forward over [anchor, x_1..x_{W-1}] (chain mask), which also
   returns the drafter's chosen target layers; lossless acceptance (greedy: argmax match;
   sampling: min(1, p/q) with residual resampling) of the first ℓ_r drafts, then a bonus token;
4. commit — the accepted KV stays in SGLang's pool (the chain's accepted slots are already in
   place), the drafter context grows by the committed positions' target features.

The drafter lives outside SGLang's KV pools (NGRAM's data flow), so the scheduler, KV
allocator and result processor treat this worker like NGRAM (see algorithms.py).

If the drafter is missing or fails, the step verifies only the anchor (W = 1): plain decoding
through the same forward, never a wrong token, and `agentserve:drafter_fallback_total` counts it.

Our own sampling (process_logits, verify_block) models temperature, top-p and top-k only. A
request that needs more of SGLang's sampler (frequency/presence/repetition penalties,
min_new_tokens, logit_bias, min_p, a custom logit processor, or a sampled request's seed under
--enable-deterministic-inference) makes its whole step width 1, decided before any drafting,
and every row's token of that step comes from SGLang's own logits preprocessing
(SamplingBatchInfo.apply_logits_bias) and Sampler: plain decoding, exactly. Such a request
therefore never has a multi-token step, so the penalty counts stay exact: SGLang's spec decode
preparation (eagle_prepare_for_decode) adds one output token, output_ids[-1], per step to the
penalizer, which counts everything only when every step emits one token (SGLang's own spec
workers apply penalties "relaxed" for that reason). The prefill's token already comes from
SGLang's sampler (_extend_step runs the target worker's plain path).

A sampled request with a seed (sampling_seed / OpenAI seed; SGLang's deterministic mode off)
emits, at each position, the keyed Gumbel-max draw of seeded_sampling.py, which plain decoding
(our Sampler hook) emits too. Its rows are verified greedily against that draw: p becomes
one-hot on it, so the output is the plain server's for that seed, token for token. Its model
drafts use the same noise on the drafter's distribution (coupled drafting).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.managers.scheduler import GenerationBatchResult
from sglang.srt.managers.tp_worker import TpModelWorker
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode
from sglang.srt.runtime_context import get_device, get_spec
from sglang.srt.server_args import ServerArgs
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.ngram_info import NgramVerifyInput

from sglang_ext.cpu import matmul as cpu_matmul
from sglang_ext.spec import seeded_sampling
from sglang_ext.spec import stats as worker_metrics
from sglang_ext.dspark.drafter import DSparkDrafter
from sglang_ext.dspark.sampling import SamplingParams, process_logits, sample_from_probs
from sglang_ext.dspark.scheduler import SchedulerInput, schedule_algorithm1
from sglang_ext.dspark.verify import verify_block
from sglang_ext.spec.contexts import LazyContexts
from sglang_ext.spec.draft_gate import DraftGate
from sglang_ext.tiers.load_report import LoadPublisher, report_path
from sglang_ext.tiers.pacing import PrefillPacer
from sglang_ext.spec.step_cost import OnlineSPS
from sglang_ext.copy.radix_walk import radix_continuation, walkable
from sglang_ext import config
from sglang_ext.copy.suffix_index import SessionIndexRegistry
from sglang_ext.copy.chooser import CopySurvival, HybridChoice, HybridDecision, pad_block
from sglang_ext.tiers.policy import TierPolicy, request_tags

log = logging.getLogger("agentserve.dspark_worker")




def _maybe_dump_features(batch: ScheduleBatch, hs: torch.Tensor) -> None:
    """Debug aid: AGENTSERVE_DUMP_FEATURES=FILE saves the first prefill's captured target
    features with its token ids, to check them against another engine's hidden states."""
    import os

    path = os.environ.get("AGENTSERVE_DUMP_FEATURES")
    if path and not os.path.exists(path):
        req = batch.reqs[0]
        n = batch.extend_lens[0]
        torch.save({"input_ids": list(req.origin_input_ids)[:n], "features": hs[:n].float().cpu()}, path)


def _needs_sglang_sampler(req: Any, seeded: bool, custom: bool) -> bool:
    """Whether the request's next token depends on more than temperature/top-p/top-k (all that
    process_logits and verify_block model)."""
    sp = req.sampling_params
    return bool(sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0 or sp.repetition_penalty != 1.0
                or sp.min_new_tokens > 0 or sp.logit_bias or sp.min_p > 0.0
                or (custom and req.custom_logit_processor)
                or (seeded and sp.top_k > 1))  # a seed changes sampled rows only (greedy: top_k 1)


class _NoiseCache:
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


def _prefix_products(conf: list[float]) -> list[float]:
    out, a = [], 1.0
    for c in conf:
        a *= float(c)
        out.append(a)
    return out


@dataclass
class StepStats:
    """What the last step did, for metrics and the console."""

    batch_size: int = 0
    verify_width: int = 1
    verify_tokens: int = 0  # batch tokens of the verify forward (ragged: sum of 1 + l_r)
    verify_lens: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    schedule_s: float = 0.0
    verify_s: float = 0.0
    fallback: bool = False
    sources: list[str] = field(default_factory=list)  # "copy" | "radix" | "model" | "none" per request
    agents: list[str] = field(default_factory=list)  # agent label per request ("" untagged)
    tiers: list[str] = field(default_factory=list)  # tier per request ("" untagged)
    emitted: list[int] = field(default_factory=list)  # tokens committed per request
    expected: list[float] = field(default_factory=list)  # expected accepted drafts per request, before sampling
    # What the step's continuing requests waited for since the previous decode step: the gap
    # from its end to this step's start, and the prefill forwards run in that gap (a prefill
    # stall: every running stream stops while a new request is prefilled).
    gap_s: float = 0.0
    prefill_s: float = 0.0
    waited: list[bool] = field(default_factory=list)  # per request: was in the previous decode step
    rids: list[str] = field(default_factory=list)  # trace only
    t: float = 0.0  # wall-clock end of the step (trace only)


class AgentSparkWorker(BaseSpecWorker):
    def __init__(self, server_args: ServerArgs, gpu_id: int, nccl_port: int, target_worker: TpModelWorker):
        super().__init__()
        self.server_args = server_args
        self._target_worker = target_worker
        self.model_runner = target_worker.model_runner
        self.device = get_device().device
        self.max_width: int = int(get_spec().speculative_num_draft_tokens)
        self._prev_rids: set[str] = set()
        self._prefill_s = 0.0  # prefill forward seconds since the last decode step
        self._decode_end: Optional[float] = None
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(getattr(server_args, "random_seed", 0) or 0))
        self.last = StepStats()
        self.drafter: Optional[DSparkDrafter] = None
        self.drafter_error: Optional[str] = None
        self.sps = OnlineSPS.for_model(str(server_args.model_path), str(server_args.dtype))
        prof = config.served()
        self._load_drafter(prof.drafter.path or get_spec().speculative_draft_model_path)
        # drafter context K/V per request, projected lazily (draft_contexts.py)
        self.contexts: Optional[LazyContexts] = LazyContexts(self.drafter, self.device) if self.drafter is not None else None
        # Radix/session-aware drafting: copied continuations from what the session already holds.
        self.index: Optional[SessionIndexRegistry] = SessionIndexRegistry() if prof.drafter.radix_drafting else None
        self.copy_block = self.block if self.drafter is not None else self.max_width - 1
        no_model = None if self.drafter is not None else [0.0] * self.copy_block
        self.choosers = {regime: HybridChoice(CopySurvival(), block_size=self.copy_block, model_prior=no_model)
                         for regime in ("greedy", "sampled")}
        self._synced: set[str] = set()
        self.radix_walk = self.index is not None and prof.drafter.radix_tree
        self._keys: dict[str, str] = {}
        # Sessions (agent API): one index per session, dropped after the session's idle TTL.
        self.session_ttl_s = prof.sessions.ttl_s
        self._session_seen: dict[str, float] = {}
        self.tier_policy = TierPolicy.from_profile(prof)
        self.scheduler_mode = prof.drafter.scheduler
        # prefills of less important requests wait while they would break a running promise
        defer_s = prof.prefill_max_defer_s
        self.load = LoadPublisher(report_path(prof.server.port))  # for predictive admission (load_report.py)
        self.pacer: Optional[PrefillPacer] = (
            PrefillPacer(self.tier_policy, defer_s, prof.admission_margin,
                         periods=self.load.step_periods, tau=self.load.request_tau,
                         plain_periods=self.load.plain_periods)
            if self.scheduler_mode == "tier_aware" and defer_s > 0 and self.tier_policy.tiers else None)
        self.ragged = prof.drafter.ragged_verify
        self.gate = DraftGate()  # model drafting only where it pays (draft_gate.py)

    # ---- set-up
    def _load_drafter(self, path: Optional[str]) -> None:
        try:
            if not path:
                raise FileNotFoundError("no drafter path (profile drafter.path / --speculative-draft-model-path)")
            target = self.model_runner.model
            drafter = DSparkDrafter.from_pretrained(path, device=self.device, dtype=self.model_runner.dtype)
            emb = target.model.embed_tokens.weight
            head = getattr(target, "lm_head", None)
            head_w = getattr(head, "weight", None)
            drafter.attach_shared(emb, None if head_w is None or head_w is emb else head_w)
            drafter.eval()
            if str(self.device) == "cpu" and cpu_matmul.mode_from_profile() != "native":  # its products too (cpu_matmul.py)
                cpu_matmul.accelerate(drafter)
            target.set_dflash_layers_to_capture(list(drafter.config.target_layer_ids))
            self.block = min(drafter.config.block_size, self.max_width - 1)
            self.drafter = drafter
            log.info("AGENTSPARK drafter loaded from %s: block %d, layers %s", path, self.block,
                     drafter.config.target_layer_ids)
        except Exception as e:  # a broken drafter must not take serving down
            self.drafter_error = f"{type(e).__name__}: {e}"
            self.block = 0
            log.warning("AGENTSPARK drafter unavailable (%s); serving with plain decoding", self.drafter_error)
            worker_metrics.fallback(reason="load")

    def alloc_memory_pool(self, **kwargs: Any) -> None:
        self.req_to_token_pool, self.token_to_kv_pool_allocator = self._target_worker.get_memory_pool()

    @property
    def draft_worker(self) -> None:
        return None

    def clear_cache_pool(self) -> None:
        if self.contexts is not None:
            self.contexts.clear()

    def on_verify_complete_cpu(self, num_correct_drafts_per_req: list[int], batch_size: int = 0) -> None:
        pass

    # ---- context bookkeeping
    def _append(self, rid: str, hidden: torch.Tensor, start: int) -> None:
        if self.contexts is not None:
            self.contexts.append(rid, hidden, start)

    def _forget(self, rid: str) -> None:
        if self.contexts is not None:
            self.contexts.forget(rid)
        for ch in self.choosers.values():
            ch.forget(rid)
        self._synced.discard(rid)
        self.tier_policy.forget(rid)
        self.gate.forget(rid)
        key = self._keys.pop(rid, None)
        if self.index is not None and key is not None and key.startswith("req:"):
            self.index.drop(key)

    def _index_key(self, req: Any) -> str:
        # A session's requests share one index (agent API session, else SGLang's session_id);
        # a request without one indexes its own prompt, which for agents already holds the
        # whole conversation so far.
        sid = request_tags(req)[2] or getattr(req, "session_id", None)
        key = f"session:{sid}" if sid else f"req:{req.rid}"
        self._keys[req.rid] = key
        if sid:
            self._session_seen[key] = time.monotonic()
        return key

    def _expire_sessions(self) -> None:
        """Drop the draft index of sessions idle past the profile's sessions.ttl_s (the HTTP
        side forgets the session id at the same age)."""
        if self.index is None or not self._session_seen:
            return
        now = time.monotonic()
        live = set(self._keys.values())
        for key, seen in list(self._session_seen.items()):
            if now - seen > self.session_ttl_s and key not in live:
                self.index.drop(key)
                del self._session_seen[key]

    def _copy_decisions(self, batch: ScheduleBatch, greedy: torch.Tensor) -> list[Optional[HybridDecision]]:
        """Per request: copy or model, decided before any block of this step is sampled."""
        if self.index is None:
            return [None] * len(batch.reqs)
        out: list[Optional[HybridDecision]] = []
        root = self._radix_root(batch)
        for i, req in enumerate(batch.reqs):
            key = self._index_key(req)
            if req.rid not in self._synced:
                self.index.sync(key, list(req.origin_input_ids) + list(req.output_ids))
                self._synced.add(req.rid)
            proposal = self.index.propose(key, None, self.copy_block)
            chooser = self.choosers["greedy" if bool(greedy[i]) else "sampled"]
            d = chooser.decide(req.rid, proposal)
            if root is not None:
                # what followed this exact sequence in an earlier request (radix tree)
                rp = radix_continuation(root, list(req.origin_input_ids) + list(req.output_ids), self.copy_block)
                if rp is not None:
                    rd = chooser.decide(req.rid, rp, origin="radix")
                    if rd.use_copy and (not d.use_copy or rd.expected_copy > d.expected_copy):
                        d = rd
            out.append(d)
        return out

    def _radix_root(self, batch: ScheduleBatch) -> Any:
        """The radix tree's root when it can be walked from Python (else None, logged once)."""
        if not self.radix_walk:
            return None
        try:
            root = batch.tree_cache.root_node
        except Exception:  # e.g. a tree core without Python nodes
            root = None
        if root is None or not walkable(root):
            self.radix_walk = False
            log.warning("AGENTSPARK: radix tree of %s cannot be walked from Python; radix drafting off "
                        "(set SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python)", type(batch.tree_cache).__name__)
            return None
        return root

    # ---- the step
    def forward_batch_generation(self, batch: ScheduleBatch, on_publish: Any = None,
                                 pp_proxy_tensors: Any = None) -> GenerationBatchResult:
        if batch.forward_mode.is_decode():
            return self._decode_step(batch, on_publish)
        return self._extend_step(batch, on_publish, pp_proxy_tensors)

    def _extend_step(self, batch: ScheduleBatch, on_publish: Any, pp_proxy_tensors: Any) -> GenerationBatchResult:
        capture = CaptureHiddenMode.FULL if self.drafter is not None and batch.forward_mode.is_extend() else None
        # The target worker's plain path samples the prefill's token with SGLang's own sampler
        # (penalties, logit_bias, min_p, seeds included), so this step is plain decoding exactly.
        t0 = time.perf_counter()
        res = self.target_worker.forward_batch_generation(batch, pp_proxy_tensors=pp_proxy_tensors,
                                                          capture_hidden_mode=capture)
        if batch.forward_mode.is_extend():
            if batch.forward_mode.is_mixed():  # a mixed step decodes the running requests too
                worker_metrics.mixed_step()
            else:
                self._prefill_s += time.perf_counter() - t0
            if self.pacer is not None:
                self.pacer.observe_prefill(int(sum(batch.extend_lens)), time.perf_counter() - t0)
        if capture is not None:
            try:
                hs = res.logits_output.hidden_states
                _maybe_dump_features(batch, hs)
                start = 0
                for req, n, prefix in zip(batch.reqs, batch.extend_lens, batch.prefix_lens):
                    self._append(req.rid, hs[start:start + n], int(prefix))
                    start += n
            except Exception as e:
                self._drafter_failed(e)
        bs = len(batch.reqs)
        predict = res.next_token_ids
        new_seq_lens = batch.seq_lens.clone()
        accept_tokens = torch.zeros(bs, self.max_width, dtype=torch.int32, device=self.device)
        accept_tokens[:, 0] = predict
        if on_publish is not None:
            on_publish(new_seq_lens)
        return GenerationBatchResult(
            logits_output=res.logits_output, next_token_ids=predict, can_run_cuda_graph=res.can_run_cuda_graph,
            accept_lens=torch.ones(bs, dtype=torch.int32, device=self.device), new_seq_lens=new_seq_lens,
            next_draft_input=NgramVerifyInput(draft_token_num=self.max_width, new_seq_lens=new_seq_lens,
                                              accept_tokens=accept_tokens.flatten(),
                                              accept_lens=torch.ones(bs, dtype=torch.int32, device=self.device)),
            speculative_num_draft_tokens=self.max_width,
        )

    def _drafter_failed(self, e: BaseException) -> None:
        log.exception("AGENTSPARK drafter failed; this step decodes plainly: %s", e)
        worker_metrics.fallback(reason="draft")
        self.last.fallback = True

    def _sampling(self, batch: ScheduleBatch) -> SamplingParams:
        si = batch.sampling_info
        bs = len(batch.reqs)
        top_k = si.top_ks.view(-1).long()
        # SGLang encodes greedy as top_k == 1 (temperature reset to 1).
        temp = torch.where(top_k == 1, torch.zeros_like(si.temperatures.view(-1)), si.temperatures.view(-1))
        return SamplingParams(temp.float().to(self.device), si.top_ps.view(-1).float().to(self.device),
                              top_k.to(self.device)).index(torch.arange(bs, device=self.device))

    def _sampler_rows(self, batch: ScheduleBatch) -> list[int]:
        """Rows whose next token needs SGLang's own sampler (module docstring). The batch-level
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
        return [i for i, r in enumerate(batch.reqs) if _needs_sglang_sampler(r, seeded, custom)]

    def _sglang_sample(self, batch: ScheduleBatch, logits: torch.Tensor, grammar_mask: Any,
                       positions: torch.Tensor, out: Any) -> torch.Tensor:
        """Width-1 next tokens [bs] as SGLang's plain decode picks them (ModelRunner.sample):
        penalties (the step's accumulated counts), grammar mask, logit_bias, in that order
        (SamplingBatchInfo.apply_logits_bias), then its Sampler (custom logit processors, greedy
        or temperature/top-k/top-p/min-p, per-request seeds at the anchor's position)."""
        from sglang.srt.layers.logits_processor import LogitsProcessorOutput

        si = batch.sampling_info
        logits = logits.clone()  # the sampler works in place; the step's logits_output stays raw
        saved, si.grammar_mask = si.grammar_mask, grammar_mask  # this step's mask, where SGLang applies it
        try:
            si.apply_logits_bias(logits)
        finally:
            si.grammar_mask = saved
        lo = LogitsProcessorOutput(next_token_logits=logits)
        want = bool(batch.return_logprob)
        nxt = self.model_runner.sampler(lo, si, want, batch.top_logprobs_nums if want else None,
                                        batch.token_ids_logprobs if want else None, positions).long()
        if want:  # the speculative layout: [bs, width 1]; top-k lists flat at i * 1 + 0
            out.next_token_logprobs = lo.next_token_logprobs.view(-1, 1)
            out.next_token_top_logprobs_val, out.next_token_top_logprobs_idx = (
                lo.next_token_top_logprobs_val, lo.next_token_top_logprobs_idx)
            out.next_token_token_ids_logprobs_val, out.next_token_token_ids_logprobs_idx = (
                lo.next_token_token_ids_logprobs_val, lo.next_token_token_ids_logprobs_idx)
        return nxt

    def _write_logprobs(self, batch: ScheduleBatch, logits: torch.Tensor, widths: list[int], width: int,
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
        for w in widths[:-1]:
            starts.append(starts[-1] + w)
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

    def _decode_step(self, batch: ScheduleBatch, on_publish: Any) -> GenerationBatchResult:
        from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_func
        stats = StepStats(batch_size=len(batch.reqs))
        bs = len(batch.reqs)
        rids = [r.rid for r in batch.reqs]
        t_start = time.perf_counter()
        stats.waited = [r in self._prev_rids for r in rids]
        stats.gap_s = 0.0 if self._decode_end is None else t_start - self._decode_end
        stats.prefill_s, self._prefill_s = self._prefill_s, 0.0
        for gone in self._prev_rids - set(rids):
            self._forget(gone)
        self._prev_rids = set(rids)
        self._expire_sessions()
        if self.pacer is not None:
            self.pacer.decode_step()
        tags = [request_tags(r) for r in batch.reqs]
        stats.agents, stats.tiers = [t[0] for t in tags], [t[1] for t in tags]

        anchors = torch.tensor([r.output_ids[-1] if r.output_ids else r.origin_input_ids[-1] for r in batch.reqs],
                               dtype=torch.long, device=self.device)
        seq_lens = batch.seq_lens.to(self.device).long()
        kv = float(seq_lens.sum()) if bs else 0.0  # K/V positions this step's queries read (cost model)
        sampling = self._sampling(batch)
        # A request needing SGLang's sampler: the whole step is width 1, no row drafts
        # (decided here, before any drafting, so it stays lossless); see the module docstring.
        sampler_rows = self._sampler_rows(batch)
        # Seeded sampled rows: keyed draws, verified greedily (seeded_sampling.py).
        seeds = (seeded_sampling.request_seeds(batch.reqs) if batch.sampling_info.sampling_seed is None
                 else [None] * bs)
        noise = _NoiseCache(seeds, seq_lens.tolist())

        # 1-2. propose (copy or model, per request), then schedule. Any drafter failure: the
        # model rows verify the anchor only.
        g = self.copy_block
        decisions = self._copy_decisions(batch, sampling.is_greedy)
        copy_rows = [i for i, d in enumerate(decisions) if d is not None and d.use_copy]
        gated = self.scheduler_mode != "verify_all"  # the verify-all baseline drafts everything
        model_rows = ([i for i in range(bs) if i not in copy_rows and (not gated or self.gate.pays(rids[i]))]
                      if self.drafter is not None and self.block > 0 else [])
        if sampler_rows:
            copy_rows, model_rows = [], []
        best_w = self._best_width(decisions, copy_rows, model_rows, rids, bs, kv) if gated and (copy_rows or model_rows) else 0
        if gated and best_w <= 1:
            copy_rows, model_rows = [], []  # this step decodes plainly (decided before any drafting)
        drafts = torch.zeros(bs, g, dtype=torch.long, device=self.device)
        conf = torch.zeros(bs, g, dtype=torch.float32, device=self.device)
        max_len = torch.zeros(bs, dtype=torch.long)
        q_probs: Optional[torch.Tensor] = None
        t0 = time.perf_counter()
        for i in copy_rows:
            toks, c, n = pad_block(decisions[i].tokens, decisions[i].confidences, g)
            drafts[i] = torch.tensor(toks, device=self.device)
            conf[i] = torch.tensor(c, device=self.device)
            max_len[i] = n
        if model_rows:
            try:
                idx = torch.tensor(model_rows, device=self.device)
                assert self.contexts is not None
                ctxs = []
                for i, a in zip(model_rows, seq_lens[idx].tolist()):
                    self.contexts.trim(rids[i], a)  # positions from the anchor on are redone
                    ctxs.append(self.contexts.get(rids[i]))
                keyed = {k: noise.block(i, g, self._vocab()) for k, i in enumerate(model_rows) if seeds[i] is not None}
                blk = self.drafter.draft_block(ctxs, anchors[idx], seq_lens[idx], sampling.index(idx),
                                               generator=self.generator, gumbel=keyed or None)
                drafts[idx] = blk.tokens[:, :g]
                mconf = blk.confidences if blk.confidences is not None else torch.full_like(blk.tokens, 0.5, dtype=torch.float)
                conf[idx] = mconf[:, :g].float()
                max_len[idx.cpu()] = g
                # one-hot rows for copied drafts: their proposal is deterministic
                q_probs = torch.nn.functional.one_hot(drafts, blk.q_probs.shape[-1]).float()
                q_probs[idx] = blk.q_probs[:, :g].float()
            except Exception as e:
                self._drafter_failed(e)
                stats.fallback = True
                for i in model_rows:
                    max_len[i] = 0
                    conf[i] = 0
                model_rows = []
                q_probs = None
        # Tiers: weights and caps from speeds so far (never from this step's drafts).
        weight = None
        if self.scheduler_mode == "tier_aware":
            weight, cap = self.tier_policy.inputs(rids, stats.tiers, [len(r.output_ids) for r in batch.reqs])
            if cap is not None:
                max_len = torch.minimum(max_len, cap)
        t1 = time.perf_counter()
        if sampler_rows:  # width 1: nothing to schedule
            lens = torch.zeros(bs, dtype=torch.long)
        elif self.scheduler_mode == "verify_all":  # baseline: every proposed draft, no scheduling
            lens = max_len.clone()
        elif copy_rows and not model_rows:
            # Copied drafts only: every input is known before sampling, so the width that
            # maximises expected tokens/s under the padded cost (the sweep in _best_width) can
            # be used directly. Algorithm 1's early stop exists for drafts whose confidences
            # come from their own sampled tokens, and on a cost curve with a step (CPU:
            # 2 tokens cost about what 8 do) it would never take the first token.
            lens = torch.clamp(max_len, max=best_w - 1)
        else:
            lens = (schedule_algorithm1(SchedulerInput(conf, weight=weight, max_len=max_len), self.sps.at(kv)) if bs
                    else torch.zeros(0, dtype=torch.long))
            if copy_rows and bs and not self.ragged:
                # copy rows ride along up to the step's width for free (deterministic drafts)
                wide = int(lens.max())
                for i in copy_rows:
                    lens[i] = min(int(max_len[i]), max(int(lens[i]), wide))
        ragged = self.ragged and not batch.has_grammar  # the grammar mask walks a uniform tree
        if gated and ragged and bs:
            lens = self._fill_to_cheapest(lens, max_len, conf, kv)
        stats.draft_s, stats.schedule_s = t1 - t0, time.perf_counter() - t1
        stats.sources = [("radix" if decisions[i].origin == "radix" else "copy") if i in copy_rows  # type: ignore[union-attr]
                         else "model" if i in model_rows else "none" for i in range(bs)]

        width = 1 + int(lens.max()) if bs else 1
        if gated and width > 1 and not ragged:
            # pad to the cheapest width at or above the needed one (measured step costs)
            width = self.sps.cheapest_width(bs, width, g + 1, kv)[0]
        # Ragged: request r runs 1 + l_r positions, so the forward costs SPS at sum(1 + l_r)
        # tokens (the paper's B), not bs x width; uniform when every row needs the same.
        widths = (lens + 1).tolist() if ragged and bs else [width] * bs
        ragged = ragged and len(set(widths)) > 1
        n_tokens = sum(widths)
        stats.verify_width, stats.verify_lens, stats.verify_tokens = width, lens.tolist(), n_tokens
        if worker_metrics.tracing():  # only the step trace reads it
            stats.expected = [sum(_prefix_products(conf[i, : int(lens[i])].tolist())) if i in copy_rows
                              else min(self.gate.expected(rids[i]), float(lens[i])) if i in model_rows else 0.0
                              for i in range(bs)]

        # 3. verify: [anchor, x_1 .. x_{W-1}] per request, chain mask
        tokens = torch.cat([anchors[:, None], drafts[:, : width - 1]], dim=1)
        chain = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        positions = (seq_lens[:, None] + torch.arange(width, device=self.device))
        batch.forward_mode = ForwardMode.TARGET_VERIFY
        if ragged:
            keep = torch.arange(width, device=self.device)[None, :] < torch.tensor(widths, device=self.device)[:, None]
            rpi = batch.req_pool_indices.to(self.device).long()
            batch.input_ids = tokens[keep].to(torch.int64)
            batch.out_cache_loc = batch.req_to_token_pool.req_to_token[rpi[:, None], positions][keep].to(torch.int64)
            positions = positions[keep]
        else:
            batch.input_ids = tokens.flatten().to(torch.int64)
            positions = positions.flatten()
            batch.out_cache_loc = assign_extend_cache_locs_func(
                req_pool_indices=batch.req_pool_indices, req_to_token=batch.req_to_token_pool.req_to_token,
                start_offset=batch.seq_lens, end_offset=batch.seq_lens + width, batch_size=bs,
                draft_token_num=width, device=self.device)
        nxt = torch.arange(1, width + 1, device=self.device)
        nxt[-1] = -1
        verify_input = NgramVerifyInput(
            draft_token=batch.input_ids, custom_mask=chain.expand(bs, width, width).flatten(), positions=positions,
            retrieve_index=torch.arange(bs * width, device=self.device).view(bs, width),
            retrieve_next_token=nxt.expand(bs, width).contiguous(),
            retrieve_next_sibling=torch.full((bs, width), -1, dtype=torch.long, device=self.device),
            draft_token_num=width)
        verify_input.capture_hidden_mode = CaptureHiddenMode.FULL if self.drafter is not None else CaptureHiddenMode.NULL
        if ragged:
            verify_input.custom_mask = None
            verify_input.agentserve_widths = widths  # read by verify_attention.py
        batch.spec_info = verify_input

        t0 = time.perf_counter()
        res = self.target_worker.forward_batch_generation(batch, is_verify=True)
        logits = res.logits_output.next_token_logits.float()
        grammar_mask = self._grammar_mask(batch, tokens, width) if batch.has_grammar else None
        greedy = sampling.is_greedy
        if sampler_rows:  # width 1: every row's token from SGLang's own sampler, as plain decoding
            emitted = [[int(t)] for t in self._sglang_sample(batch, logits, grammar_mask, seq_lens,
                                                             res.logits_output).tolist()]
        else:
            if grammar_mask is not None:
                grammar_mask.apply(logits)
            if ragged:  # back to [bs, width, V]; positions past a row's width are never read
                rows = torch.repeat_interleave(torch.arange(bs, device=self.device), torch.tensor(widths, device=self.device))
                p = logits.new_zeros(bs, width, logits.shape[-1])
                p[keep] = process_logits(logits, sampling.index(rows))
            else:
                p = process_logits(logits.view(bs * width, -1), sampling.expand(width)).view(bs, width, -1)
            if noise.any:
                greedy = self._keyed_targets(p, logits, widths, sampling, noise, greedy, drafts, lens)
            if width > 1:
                vr = verify_block(drafts[:, : width - 1], p, None if q_probs is None else q_probs[:, : width - 1],
                                  verify_lens=lens.to(self.device), greedy=greedy, generator=self.generator)
                emitted = vr.tokens  # accepted drafts + bonus (no bonus after an accepted EOS)
            else:  # nothing verified this step: plain decoding of one token
                nxt = p[:, 0].argmax(-1)
                if not bool(greedy.all()):  # sample only where a request samples
                    nxt = torch.where(greedy, nxt, sample_from_probs(p[:, 0], self.generator))
                emitted = [[int(t)] for t in nxt.tolist()]
        stats.verify_s = time.perf_counter() - t0
        self.sps.observe(n_tokens, stats.verify_s, kv)
        self.gate.observe_times(width, bs, stats.verify_s, len(model_rows), stats.draft_s)
        if batch.return_logprob and not sampler_rows:  # after the timing: not a verify cost
            self._write_logprobs(batch, logits, widths, width, emitted, sampling, res.logits_output)

        accept_lens = torch.tensor([len(t) for t in emitted], dtype=torch.int32, device=self.device)
        # Rows padded to the maximum width: SGLang's relay buffers keep one shape across steps.
        accept_tokens = torch.zeros(bs, self.max_width, dtype=torch.int32, device=self.device)
        for i, toks in enumerate(emitted):
            accept_tokens[i, : len(toks)] = torch.tensor(toks, dtype=torch.int32, device=self.device)
        num_correct = accept_lens - 1
        # Committed KV (the anchor and the accepted drafts) needs no move: a chain verify wrote
        # each request's positions at consecutive slots from its front, which is where SGLang's
        # move_accept_tokens_to_target_kvcache would put them (an identity copy).
        new_seq_lens = batch.seq_lens + accept_lens

        # 4. drafter context: target features of the committed positions
        if self.drafter is not None and res.logits_output.hidden_states is not None:
            hs = res.logits_output.hidden_states
            try:
                start = 0
                for i, rid in enumerate(rids):
                    self._append(rid, hs[start:start + int(accept_lens[i])], int(seq_lens[i]))
                    start += widths[i]
            except Exception as e:
                self._drafter_failed(e)
        stats.accepted = num_correct.tolist()
        stats.emitted = accept_lens.tolist()
        for i in model_rows:
            self.gate.observe_model(rids[i], stats.accepted[i])
        self._learn(batch, decisions, stats, emitted, conf, sampling.is_greedy)
        self.last = stats
        worker_metrics.observe_step(stats)
        self.load.observe(rids, stats.tiers, stats.emitted, self.sps.measured,
                          behind=self.tier_policy.behind if self.scheduler_mode == "tier_aware" else None,
                          stall_s=stats.prefill_s, plain=n_tokens <= bs)
        if worker_metrics.tracing():
            stats.rids, stats.t = rids, time.time()
        worker_metrics.trace_step(stats)
        self._decode_end = time.perf_counter()

        if on_publish is not None:
            on_publish(new_seq_lens)
        batch.forward_mode = ForwardMode.DECODE
        flat = accept_tokens.flatten()
        return GenerationBatchResult(
            logits_output=res.logits_output, next_token_ids=flat, can_run_cuda_graph=res.can_run_cuda_graph,
            accept_lens=accept_lens, new_seq_lens=new_seq_lens,
            next_draft_input=NgramVerifyInput(draft_token_num=self.max_width, new_seq_lens=new_seq_lens,
                                              accept_tokens=flat, accept_lens=accept_lens),
            speculative_num_draft_tokens=self.max_width,
        )

    def _vocab(self) -> int:
        """Vocabulary size of the target's logits (the drafter shares its LM head)."""
        assert self.drafter is not None
        return int(self.drafter.lm_head_weight.shape[0])

    def _keyed_targets(self, p: torch.Tensor, logits: torch.Tensor, widths: list[int], sampling: SamplingParams,
                       noise: "_NoiseCache", greedy: torch.Tensor, drafts: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Seeded rows: p[i, j] becomes one-hot on the keyed draw at that position, computed
        from the row's raw logits exactly as plain decoding's Sampler hook does (one row at a
        time, seeded_sampling.sample_row), and the row is verified greedily against it. Rows
        are drawn left to right up to the first draft that differs (or the bonus position):
        verification never reads past it. Returns the greedy mask including those rows."""
        greedy = greedy.clone()
        start = 0
        for i, w in enumerate(widths):
            if noise.seeds[i] is not None:
                t, tp, tk = (float(sampling.temperature[i]), float(sampling.top_p[i]), int(sampling.top_k[i]))
                for j in range(w):
                    row = logits[start + j]  # ragged or not, request i's rows are consecutive
                    probs = seeded_sampling.processed(row, t, tp, tk)
                    tok = seeded_sampling.keyed_choice(probs, noise.seeds[i], noise.pos[i] + j, noise.at(i, j, probs.shape[-1]))
                    p[i, j].zero_()
                    p[i, j, tok] = 1.0
                    if j >= int(lens[i]) or tok != int(drafts[i, j]):
                        break
                greedy[i] = True
            start += w
        return greedy

    def _best_width(self, decisions: list[Optional[HybridDecision]], copy_rows: list[int], model_rows: list[int],
                    rids: list[str], bs: int, kv: float = 0.0) -> int:
        """Batch-level cost check before drafting: the verify width W (1 = decode plainly) with
        the most expected tokens per second. Every row of a verify step is padded to the widest
        row, so the step costs SPS at bs x W. Expected tokens at width W: each copy row's sum of
        survival products over its first W-1 positions, each model row its past acceptance
        capped at W-1; all rows count together (a lone row rarely pays for the padding, eight
        copy rows often do). Pre-sampling information only (copy confidences are deterministic
        given the context; the model's expectation is its past acceptance), so verification
        stays lossless."""
        best_rate, best_w = bs / self.sps.step_seconds(bs, kv), 1
        copy_pp = []
        for i in copy_rows:
            d = decisions[i]
            assert d is not None
            copy_pp.append(_prefix_products([float(c) for c in d.confidences]))
        model_e = [self.gate.expected(rids[i]) for i in model_rows]
        widest = max([len(pp) for pp in copy_pp] + [self.block if model_rows else 0])
        t_draft = (self.gate.t_draft or 0.0) * len(model_rows)
        for w in range(2, widest + 2):
            gain = sum(sum(pp[: w - 1]) for pp in copy_pp) + sum(min(e, w - 1) for e in model_e)
            if self.ragged:  # only rows with drafts grow: bs + their positions
                n = bs + sum(min(len(pp), w - 1) for pp in copy_pp) + len(model_rows) * min(self.block, w - 1)
                t = self.sps.cheapest_tokens(n, bs * (self.copy_block + 1), kv)[1]
            else:  # every row padded to w: the cheapest width >= w, see OnlineSPS.cheapest_width
                t = self.sps.cheapest_width(bs, w, self.copy_block + 1, kv)[1]
            rate = (bs + gain) / (t + t_draft)
            if rate > best_rate:
                best_rate, best_w = rate, w
        return best_w

    def _fill_to_cheapest(self, lens: torch.Tensor, max_len: torch.Tensor, conf: torch.Tensor,
                          kv: float = 0.0) -> torch.Tensor:
        """Ragged steps: when a larger batch-token count costs less (measured; a CPU's matmul
        kernels change with the row count), verify more of the drafts already proposed, best
        survival first, up to that count. Uses only pre-sampling inputs (lengths, confidences,
        costs), so it stays lossless."""
        if not bool((max_len > lens).any()):
            return lens  # no proposed draft left to add (every plain step): skip the cost scan
        n = int(lens.sum()) + len(lens)
        target = self.sps.cheapest_tokens(n, len(lens) * (self.copy_block + 1), kv)[0]
        if target <= n:
            return lens
        lens = lens.clone()
        surv = torch.cumprod(conf.double().clamp(0, 1), dim=1)
        for _ in range(target - n):
            room = [i for i in range(len(lens)) if int(lens[i]) < int(max_len[i])]
            if not room:
                break
            i = max(room, key=lambda r: float(surv[r, int(lens[r])]))
            lens[i] += 1
        return lens

    def _learn(self, batch: ScheduleBatch, decisions: list[Optional[HybridDecision]], stats: StepStats,
               emitted: list[list[int]], conf: torch.Tensor, greedy: torch.Tensor) -> None:
        """After verification: the index learns the emitted tokens, the choosers the outcome."""
        if self.index is None:
            return
        for i, req in enumerate(batch.reqs):
            self.index.extend(self._keys.get(req.rid) or self._index_key(req), emitted[i])
            chooser = self.choosers["greedy" if bool(greedy[i]) else "sampled"]
            ell, acc = stats.verify_lens[i], stats.accepted[i]
            if stats.sources[i] in ("copy", "radix") and decisions[i] is not None:
                chooser.observe_copy(decisions[i], acc, ell, rejected=acc < ell)
            elif stats.sources[i] == "model":
                chooser.observe_model(req.rid, conf[i].tolist())

    def _grammar_mask(self, batch: ScheduleBatch, tokens: torch.Tensor, width: int) -> Any:
        from sglang.srt.speculative.spec_utils import GrammarTree, build_grammar_vocab_mask

        bs = tokens.shape[0]
        nxt = torch.arange(1, width + 1)
        nxt[-1] = -1
        tree = GrammarTree.from_host(nxt.expand(bs, width).contiguous(), torch.full((bs, width), -1, dtype=torch.long),
                                     tokens.cpu().to(torch.int64))
        return build_grammar_vocab_mask(reqs=batch.reqs, tree=tree, sampling_info=batch.sampling_info,
                                        device=self.device, barrier=None)
