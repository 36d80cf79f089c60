"""AGENTSPARK: the DSpark speculative worker inside SGLang's scheduler, on any device.

One decode step, for the batch's requests r (anchor = last emitted token, at position a_r =
seq_len_r, whose KV is not yet written), in named phases (one module each):

1. propose (propose.py) — per request a copy draft (session suffix index, radix tree), a DSpark
   model draft (from the drafter's own per-request context K/V: target features of committed
   positions, with the exact distribution q of each token and a calibrated confidence c_k),
   or nothing; which rows draft is decided before drafting, from past outcomes and costs;
2. plan (plan.py) — Algorithm 1 over the prefix survivals Π c picks per-request verify
   lengths l_r against the step-cost model; the layout is ragged (row r runs 1 + l_r
   positions) where the attention backend reads that, else uniform (padded to 1 + max l_r);
3. verify (verify.py) — one TARGET_VERIFY forward over [anchor, x_1..x_l] (chain mask), which
   also returns the drafter's chosen target layers. A step where nothing is verified beyond
   the anchor is plain decoding's step instead: a DECODE forward sampled by SGLang's sampler;
4. accept (accept.py) — lossless acceptance (greedy: argmax match; sampling: min(1, p/q) with
   residual resampling) of the first l_r drafts, then a bonus token;
5. commit (commit.py) — the accepted KV stays in SGLang's pool (the chain's accepted slots are
   already in place), the drafter context grows by the committed positions' target features;
   then `learn`: index, choosers, gate, step costs, metrics, load report, trace.

The drafter lives outside SGLang's KV pools (NGRAM's data flow), so the scheduler, KV
allocator and result processor treat this worker like NGRAM (see algorithms.py).

If the drafter is missing or fails, no row gets a model draft: plain decoding, never a wrong
token, and `agentserve:drafter_fallback_total` counts it.

Our own sampling (process_logits, verify_block) models temperature, top-p and top-k only. A
request that needs more of SGLang's sampler (frequency/presence/repetition penalties,
min_new_tokens, logit_bias, min_p, a custom logit processor, or a sampled request's seed under
--enable-deterministic-inference) makes its whole step a plain one, decided before any
drafting, so every row's token of that step comes from SGLang's own logits preprocessing and
Sampler: plain decoding, exactly. Such a request therefore never has a multi-token step, so
the penalty counts stay exact: SGLang's spec decode preparation (eagle_prepare_for_decode)
adds one output token, output_ids[-1], per step to the penalizer, which counts everything only
when every step emits one token (SGLang's own spec workers apply penalties "relaxed" for that
reason). The prefill's token already comes from SGLang's sampler (_extend_step runs the target
worker's plain path).

A sampled request with a seed (sampling_seed / OpenAI seed; SGLang's deterministic mode off)
emits, at each position, the keyed Gumbel-max draw of seeded_sampling.py, which plain decoding
(our Sampler hook) emits too. Its rows are verified greedily against that draw: p becomes
one-hot on it, so the output is the plain server's for that seed, token for token. Its model
drafts use the same noise on the drafter's distribution (coupled drafting).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import torch

from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.managers.scheduler import GenerationBatchResult
from sglang.srt.managers.tp_worker import TpModelWorker
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
from sglang.srt.runtime_context import get_device, get_spec
from sglang.srt.server_args import ServerArgs
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.ngram_info import NgramVerifyInput

from sglang_ext import config
from sglang_ext.copy.chooser import CopySurvival, HybridChoice
from sglang_ext.copy.suffix_index import SessionIndexRegistry
from sglang_ext.cpu import attention as cpu_attention
from sglang_ext.cpu import matmul as cpu_matmul
from sglang_ext.dspark.drafter import DSparkDrafter
from sglang_ext.spec import stats as worker_metrics
from sglang_ext.spec.accept import accept, write_logprobs
from sglang_ext.spec.commit import commit, learn
from sglang_ext.spec.contexts import LazyContexts
from sglang_ext.spec.draft_gate import DraftGate, time_drafter
from sglang_ext.spec.plan import plan
from sglang_ext.spec.propose import propose, read_inputs, step_start
from sglang_ext.spec.stats import StepStats
from sglang_ext.spec.step_cost import StepCost, measure_startup
from sglang_ext.spec.verify import plain, verify
from sglang_ext.tiers.load_report import LoadPublisher, report_path
from sglang_ext.tiers.pacing import PrefillPacer
from sglang_ext.tiers.policy import TierPolicy, ended_sessions, request_tags

log = logging.getLogger("agentserve.dspark_worker")


def _maybe_dump_features(batch: ScheduleBatch, hs: torch.Tensor) -> None:
    """AGENTSERVE_DUMP_FEATURES=FILE saves the first prefill's captured target features with
    its token ids. Kept because tests/serving/test_agentspark.py checks them against HF
    transformers' hidden states (the features the drafter was trained on)."""
    path = os.environ.get("AGENTSERVE_DUMP_FEATURES")
    if path and not os.path.exists(path):
        req = batch.reqs[0]
        n = batch.extend_lens[0]
        torch.save({"input_ids": list(req.origin_input_ids)[:n], "features": hs[:n].float().cpu()}, path)


class AgentSparkWorker(BaseSpecWorker):
    def __init__(self, server_args: ServerArgs, gpu_id: int, nccl_port: int, target_worker: TpModelWorker):
        super().__init__()
        self.server_args = server_args
        self._target_worker = target_worker
        self.model_runner = target_worker.model_runner
        self.device = get_device().device
        self.max_width: int = int(get_spec().speculative_num_draft_tokens)
        self.prev_rids: set[str] = set()
        self.prefill_s = 0.0  # prefill forward seconds since the last decode step
        self.decode_end: Optional[float] = None
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(getattr(server_args, "random_seed", 0) or 0))
        self.last = StepStats()
        self.drafter: Optional[DSparkDrafter] = None
        self.drafter_error: Optional[str] = None
        self.vocab = 0
        # the one step-cost model (step_cost.py), its prior shape measured now, in a few seconds
        t0 = time.perf_counter()
        startup = measure_startup(self.model_runner.model)
        log.info("AGENTSPARK step-cost start-up measurement: %d batch-token counts in %.2f s (t(1) %.4f s, t(8) %.4f s)",
                 len(startup), time.perf_counter() - t0, startup.get(1, 0.0), startup.get(8, 0.0))
        self.sps = StepCost.for_model(str(server_args.model_path), str(server_args.dtype), startup=startup)
        prof = config.served()
        self._load_drafter(prof.drafter.path or get_spec().speculative_draft_model_path)
        # drafter context K/V per request, projected lazily (contexts.py)
        self.contexts: Optional[LazyContexts] = (LazyContexts(self.drafter, self.device, keep_tokens=prof.drafter.context_keep_tokens)
                                                 if self.drafter is not None else None)
        self._reqs: dict[str, Any] = {}  # requests with a drafter context: their tokens seed later prompts' contexts
        # Radix/session-aware drafting: copied continuations from what the session already holds.
        self.index: Optional[SessionIndexRegistry] = SessionIndexRegistry(shared=prof.drafter.shared_index) if prof.drafter.radix_drafting else None
        # copies may fill the whole verify width; the model drafts its trained block (<= it)
        self.copy_block = self.max_width - 1
        no_model = None if self.drafter is not None else [0.0] * self.copy_block
        self.choosers = {regime: HybridChoice(CopySurvival(), block_size=self.copy_block, model_prior=no_model)
                         for regime in ("greedy", "sampled")}
        self.synced: set[str] = set()
        self.radix_walk = self.index is not None and prof.drafter.radix_tree
        self.keys: dict[str, str] = {}
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
        self._ragged_wanted = prof.drafter.ragged_verify
        self.min_step_gain = prof.drafter.min_step_gain
        self._ragged: Optional[bool] = None  # asked of the attention backend at the first decode step
        d = prof.drafter  # model drafting only where it pays (draft_gate.py)
        self.gate = DraftGate(t_draft=self._time_drafter(), estimate=d.gate_estimate, probe_every=d.gate_probe_every,
                              max_probe_every=d.gate_max_probe_every, cost=d.gate_cost,
                              cut_max_batch=d.gate_cut_max_batch)

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
            self.vocab = int((emb if head_w is None else head_w).shape[0])  # the target's logits' width
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

    def _time_drafter(self) -> Optional[float]:
        """The gate's drafter-time prior: a warmed drafter's steady call, timed at start-up
        (the first call in a process costs ~100x that and would price drafting out)."""
        if self.drafter is None:
            return None
        try:
            t0 = time.perf_counter()
            t = time_drafter(self.drafter, self.device)
            log.info("AGENTSPARK drafter start-up timing: %.4f s per request-block (%.2f s with warm-up)",
                     t, time.perf_counter() - t0)
            return t
        except Exception as e:  # the gate then measures the first served call instead
            log.warning("AGENTSPARK drafter start-up timing failed (%s: %s)", type(e).__name__, e)
            return None

    def alloc_memory_pool(self, **kwargs: Any) -> None:
        self.req_to_token_pool, self.token_to_kv_pool_allocator = self._target_worker.get_memory_pool()

    @property
    def draft_worker(self) -> None:
        return None

    def clear_cache_pool(self) -> None:
        if self.contexts is not None:
            self.contexts.clear()
        self._reqs.clear()

    def on_verify_complete_cpu(self, num_correct_drafts_per_req: list[int], batch_size: int = 0) -> None:
        pass

    @property
    def ragged(self) -> bool:
        """Ragged verify only where the attention backend reads the packed batch (our CPU
        hook); every other backend gets SGLang's uniform TARGET_VERIFY layout. The backend
        exists only once the model runner is set up, after this worker's constructor."""
        if self._ragged is None:
            backend = getattr(self.model_runner, "attn_backend", None)
            if backend is None:
                return False
            can = cpu_attention.supports_ragged_verify(backend)
            self._ragged = self._ragged_wanted and can
            log.info("AGENTSPARK verify layout: %s (profile drafter.ragged_verify=%s; %s %s ragged verify)",
                     "ragged" if self._ragged else "uniform", self._ragged_wanted, type(backend).__name__,
                     "reads" if can else "does not read")
        return self._ragged

    # ---- per-request bookkeeping
    def forget(self, rid: str) -> None:
        req = self._reqs.pop(rid, None)
        if self.contexts is not None:
            if req is not None:  # its context may seed a later prompt that shares its prefix
                self.contexts.keep(rid, _tokens(req))
            else:
                self.contexts.forget(rid)
        for ch in self.choosers.values():
            ch.forget(rid)
        self.synced.discard(rid)
        self.tier_policy.forget(rid)
        self.gate.forget(rid)
        key = self.keys.pop(rid, None)
        if self.index is not None and key is not None and key.startswith("req:"):
            self.index.drop(key)

    def index_key(self, req: Any) -> str:
        # A session's requests share one index (agent API session, else SGLang's session_id);
        # a request without one indexes its own prompt, which for agents already holds the
        # whole conversation so far.
        sid = request_tags(req)[2] or getattr(req, "session_id", None)
        key = f"session:{sid}" if sid else f"req:{req.rid}"
        self.keys[req.rid] = key
        if self.index is not None:  # the session's agent and tier name its cross-session scope
            self.index.bind(key, *request_tags(req)[:2])
        if sid:
            self._session_seen[key] = time.monotonic()
        self.end_sessions(ended_sessions(req))
        return key

    def end_sessions(self, sids: list[str]) -> None:
        """Drop the draft index of sessions the HTTP layer closed or saw expire (a session with a
        request still running keeps its index until expire_sessions)."""
        if self.index is None or not sids:
            return
        live = set(self.keys.values())
        for sid in sids:
            key = f"session:{sid}"
            if key not in live:
                self.index.drop(key)
                self._session_seen.pop(key, None)

    def expire_sessions(self) -> None:
        """Drop the draft index of sessions idle past the profile's sessions.ttl_s (the HTTP
        side forgets the session id at the same age)."""
        if self.index is None or not self._session_seen:
            return
        now = time.monotonic()
        live = set(self.keys.values())
        for key, seen in list(self._session_seen.items()):
            if now - seen > self.session_ttl_s and key not in live:
                self.index.drop(key)
                del self._session_seen[key]

    def drafter_failed(self, e: BaseException) -> None:
        log.exception("AGENTSPARK drafter failed; this step decodes plainly: %s", e)
        worker_metrics.fallback(reason="draft")
        self.last.fallback = True

    # ---- the step
    def forward_batch_generation(self, batch: ScheduleBatch, on_publish: Any = None,
                                 pp_proxy_tensors: Any = None) -> GenerationBatchResult:
        if batch.forward_mode.is_decode():
            return self._decode_step(batch, on_publish)
        return self._extend_step(batch, on_publish, pp_proxy_tensors)

    def _decode_step(self, batch: ScheduleBatch, on_publish: Any) -> GenerationBatchResult:
        stats = step_start(self, batch)
        inp = read_inputs(batch, self.device)
        t0 = time.perf_counter()
        prop = propose(self, inp, stats)
        t1 = time.perf_counter()
        pl = plan(self, inp, prop, stats.tiers) if prop.drafting else None
        stats.draft_s, stats.schedule_s = t1 - t0, time.perf_counter() - t1
        t2 = time.perf_counter()
        if pl is None or pl.n_tokens == inp.bs:  # nothing verified beyond the anchor: plain decoding's step
            fwd = plain(self, inp)
            emitted = [[int(t)] for t in fwd.res.next_token_ids.tolist()]
            lens, widths, stats.plain = [0] * inp.bs, [1] * inp.bs, True
        else:
            fwd = verify(self, inp, prop, pl)
            emitted = accept(self, inp, prop, pl, fwd)
            lens, widths = pl.lens.tolist(), pl.widths
        stats.verify_s = time.perf_counter() - t2
        if batch.return_logprob and pl is not None and not stats.plain:  # after the timing: not a verify cost
            write_logprobs(batch, fwd.logits, widths, pl.width, emitted, inp.sampling, fwd.res.logits_output)
        result = commit(self, inp, widths, fwd, emitted, on_publish)
        learn(self, inp, prop, lens, widths, emitted, stats)
        return result

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
                self.prefill_s += time.perf_counter() - t0
            if self.pacer is not None:
                self.pacer.observe_prefill(int(sum(batch.extend_lens)), time.perf_counter() - t0)
        if capture is not None and self.contexts is not None:
            try:
                hs = res.logits_output.hidden_states
                _maybe_dump_features(batch, hs)
                start = 0
                for req, n, prefix in zip(batch.reqs, batch.extend_lens, batch.prefix_lens):
                    if prefix and req.rid not in self.contexts:  # the radix cache held its first `prefix` tokens
                        running = ((r, _tokens(q)) for r, q in self._reqs.items())
                        worker_metrics.context_seeded(self.contexts.seed(req.rid, req.origin_input_ids, int(prefix), running))
                    self.contexts.append(req.rid, hs[start:start + n], int(prefix))
                    self._reqs[req.rid] = req
                    start += n
            except Exception as e:
                self.drafter_failed(e)
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


def _tokens(req: Any) -> list[int]:
    return list(req.origin_input_ids) + list(req.output_ids)
