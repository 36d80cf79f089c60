"""Calibrated survival for copied drafts and the per-request copy-vs-model choice.

``CopySurvival`` estimates the conditional survival c_k = P(copied token k accepted | tokens
< k accepted) from features known before verification: the matched-suffix length (bucketed),
the position k, and whether earlier occurrences of the context disagreed at k (the index's
``agreement``).  Beta counts per cell with a prior; outcomes are learned online from verify
results (censored after the first rejection, like a Kaplan-Meier estimate).

``HybridChoice`` decides, per request and per step, whether this step verifies the copied
block or the model's (DSpark) block.

Why this keeps verification lossless
------------------------------------
1. A copied block is a deterministic function of the context (the session index only holds
   tokens that are already fixed: prompts, tool outputs, emitted tokens).  Its draft
   distribution q is one-hot, so ``verify_block(draft_probs=None)`` accepts x_k with
   probability p(x_k) and otherwise samples from norm(max(0, p - onehot(x_k))) = p without
   x_k; the emitted token is distributed exactly as p.  This is ordinary speculative sampling
   with q = delta_x.
2. The copy confidences c_k fed to the prefix scheduler depend only on the match length,
   position, agreement and past outcomes -- nothing sampled in this step -- so the verify
   length is a pre-verification decision (stronger than Algorithm 1's requirement that the
   decision for x_j look only at x_{<j}).
3. The source switch happens only at block boundaries and uses only pre-sampling
   information: the copy estimate and the model's *previous-step* expectation (or a position
   prior).  It must NOT look at the model's current block (its sampled tokens or the
   confidences computed from them): choosing "model" only when the sampled draft looks good
   would verify a draft drawn from q conditioned on that event, while the acceptance rule
   assumes q itself -- that is biased (``tests/copy/test_suffix_index.py`` shows such a
   cheating chooser failing the distribution test).  Given the history, the decision D is
   fixed; conditioned on D either branch emits tokens distributed as the target, so the
   mixture over D does too.
4. Survival estimates are per sampling regime: acceptance of a deterministic draft is p(x_k),
   which depends on temperature; keep one ``CopySurvival`` per regime (e.g. greedy vs sampled).
5. Several copy sources (the session's index, the agent's shared index, the radix tree) are
   each a deterministic function of fixed tokens; picking the one with the highest estimate
   is a pre-sampling decision too, so 3 covers it (``tests/copy/test_shared_index.py`` runs
   the sequential loop with three sources).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence

import numpy as np

from .suffix_index import Proposal

DEFAULT_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)


def expected_accepted(conf: Sequence[float]) -> float:
    """Expected accepted drafts sum_j prod_{i<=j} c_i (the scheduler's tau contribution)."""
    total, a = 0.0, 1.0
    for c in conf:
        a *= min(1.0, max(0.0, float(c)))
        total += a
    return total


class CopySurvival:
    """Online estimate of c_k for copied drafts, keyed by (match-length bucket, split, k).

    ``split`` is 1 when earlier occurrences disagreed at position k (agreement < 1).  Prior mean
    for a cell: L/(L+2) at the bucket's lower edge L (longer matches copy better), times the
    agreement for split positions; ``prior_strength`` pseudo-observations.  ``max_count`` caps
    a cell's evidence (older outcomes are scaled down), so the estimate tracks drift."""

    def __init__(self, max_positions: int = 16, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 prior_strength: float = 4.0, max_count: float = 5000.0) -> None:
        if list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError("buckets must be increasing lower edges starting at >= 1")
        self.buckets = tuple(int(b) for b in buckets)
        self.max_positions = int(max_positions)
        self.prior_strength = float(prior_strength)
        self.max_count = float(max_count)
        shape = (len(self.buckets), 2, self.max_positions)
        self.succ = np.zeros(shape)
        self.fail = np.zeros(shape)

    def bucket(self, match_len: int) -> int:
        return max(0, bisect_right(self.buckets, int(match_len)) - 1)

    def prior_mean(self, match_len: int, agreement: float = 1.0) -> float:
        lo = self.buckets[self.bucket(match_len)]
        m = lo / (lo + 2.0)
        return float(min(0.95, max(0.02, m * min(1.0, max(0.0, agreement)))))

    @staticmethod
    def _split(agreement: Optional[Sequence[float]], k: int) -> tuple[int, float]:
        if agreement is None or k >= len(agreement):
            return 0, 1.0
        a = float(agreement[k])
        return (1 if a < 1.0 - 1e-9 else 0), a

    def estimate(self, match_len: int, length: int, agreement: Optional[Sequence[float]] = None) -> list[float]:
        """c_k for k < length (posterior means)."""
        b = self.bucket(match_len)
        out = []
        for k in range(int(length)):
            s, a = self._split(agreement, k)
            kk = min(k, self.max_positions - 1)
            m = self.prior_mean(match_len, a)
            n_s, n_f = self.succ[b, s, kk], self.fail[b, s, kk]
            out.append(float((self.prior_strength * m + n_s) / (self.prior_strength + n_s + n_f)))
        return out

    def estimate_for(self, proposal: Proposal, length: Optional[int] = None) -> list[float]:
        n = len(proposal.tokens) if length is None else min(length, len(proposal.tokens))
        return self.estimate(proposal.match_len, n, proposal.agreement)

    def observe(self, match_len: int, accepted_count: int, proposed_len: int,
                agreement: Optional[Sequence[float]] = None, rejected: Optional[bool] = None) -> None:
        """Record one verified copied block.  ``proposed_len``: positions actually verified
        (the scheduler's verify length, not the proposal length).  Positions < accepted_count
        survived; position accepted_count failed when ``rejected`` (default: accepted_count <
        proposed_len; pass False when the round stopped on an accepted EOS); later positions
        were never tried and are censored."""
        acc = max(0, min(int(accepted_count), int(proposed_len)))
        if rejected is None:
            rejected = acc < int(proposed_len)
        b = self.bucket(match_len)
        for k in range(acc):
            s, _ = self._split(agreement, k)
            self._add(b, s, min(k, self.max_positions - 1), 1.0, 0.0)
        if rejected and acc < int(proposed_len):
            s, _ = self._split(agreement, acc)
            self._add(b, s, min(acc, self.max_positions - 1), 0.0, 1.0)

    def observe_proposal(self, proposal: Proposal, accepted_count: int, verified_len: int,
                         rejected: Optional[bool] = None) -> None:
        self.observe(proposal.match_len, accepted_count, verified_len, proposal.agreement, rejected)

    def _add(self, b: int, s: int, k: int, ds: float, df: float) -> None:
        self.succ[b, s, k] += ds
        self.fail[b, s, k] += df
        tot = self.succ[b, s, k] + self.fail[b, s, k]
        if tot > self.max_count:
            scale = self.max_count / tot
            self.succ[b, s, k] *= scale
            self.fail[b, s, k] *= scale

    def state_dict(self) -> dict[str, object]:
        return {"buckets": list(self.buckets), "max_positions": self.max_positions,
                "prior_strength": self.prior_strength, "max_count": self.max_count,
                "succ": self.succ.tolist(), "fail": self.fail.tolist()}

    @classmethod
    def from_state_dict(cls, d: dict[str, object]) -> "CopySurvival":
        obj = cls(max_positions=int(d["max_positions"]), buckets=list(d["buckets"]),  # type: ignore[arg-type]
                  prior_strength=float(d["prior_strength"]), max_count=float(d["max_count"]))  # type: ignore[arg-type]
        obj.succ = np.asarray(d["succ"], dtype=np.float64).reshape(obj.succ.shape)
        obj.fail = np.asarray(d["fail"], dtype=np.float64).reshape(obj.fail.shape)
        return obj


@dataclass
class HybridDecision:
    source: str  # "copy" or "model"
    expected_copy: float  # sum prod c over the copy block (0 without a proposal)
    expected_model: float  # previous-step / prior expectation for the model block
    proposal: Optional[Proposal] = None
    tokens: list[int] = field(default_factory=list)  # copy block (source == "copy")
    confidences: list[float] = field(default_factory=list)  # its c_k for the scheduler
    # which copy source: "index" (session suffix index), "shared" (cross-session index of the
    # agent/tier, shared_index.py) or "radix" (radix tree)
    origin: str = "index"

    @property
    def use_copy(self) -> bool:
        return self.source == "copy"


class HybridChoice:
    """Per-request choice between the copied block and the model's block, made BEFORE the
    model's block for this step is sampled (see the module docstring for why that matters).

    The model side is summarised per request by an EMA of previous blocks' expected accepted
    length (sum prod of their calibrated confidences, reported after each model step via
    ``observe_model``), falling back to ``model_prior`` (per-position c_k) for new requests.
    Copy is chosen when expected_copy > expected_model + margin."""

    def __init__(self, survival: CopySurvival, block_size: int,
                 model_prior: Optional[Sequence[float]] = None, margin: float = 0.0,
                 ema: float = 0.5, min_match: int = 1) -> None:
        self.survival = survival
        # one survival estimator per copy source: their acceptance differs (an exact-prefix
        # continuation from the radix tree is not a suffix match inside the session)
        self.survivals: dict[str, CopySurvival] = {"index": survival}
        self.block_size = int(block_size)
        prior = list(model_prior) if model_prior is not None else [0.6] * self.block_size
        self.prior_expectation = expected_accepted(prior[: self.block_size])
        self.margin = float(margin)
        self.ema = float(ema)
        self.min_match = int(min_match)
        self._model: dict[Hashable, float] = {}

    def model_expectation(self, rid: Hashable) -> float:
        return self._model.get(rid, self.prior_expectation)

    def _survival(self, origin: str) -> CopySurvival:
        survival = self.survivals.get(origin)
        if survival is None:
            survival = self.survivals[origin] = CopySurvival(self.survival.max_positions, self.survival.buckets,
                                                             self.survival.prior_strength, self.survival.max_count)
        return survival

    def decide(self, rid: Hashable, proposal: Optional[Proposal], origin: str = "index") -> HybridDecision:
        """Copy or model for this step.  A proposal's ``alternatives`` (the shared index's next
        to the session's) are scored too, each with its source's survival estimate; the best
        copy competes with the model.  Everything scored is fixed before this step samples."""
        e_model = self.model_expectation(rid)
        cands = [] if proposal is None else [proposal, *proposal.alternatives]
        best: Optional[HybridDecision] = None
        for cand in cands:
            if not cand.tokens or cand.match_len < self.min_match:
                continue
            src = "shared" if origin == "index" and cand.source == "shared" else origin
            toks = cand.tokens[: self.block_size]
            conf = self._survival(src).estimate(cand.match_len, len(toks), cand.agreement)
            e_copy = expected_accepted(conf)
            if best is None or e_copy > best.expected_copy:
                best = HybridDecision("copy", e_copy, e_model, cand, list(toks), conf, src)
        if best is None:
            return HybridDecision("model", 0.0, e_model, origin=origin)
        if not best.expected_copy > e_model + self.margin:
            best.source = "model"
        return best

    def observe_model(self, rid: Hashable, confidences: Sequence[float]) -> None:
        """After a model step: fold the block's expected accepted length into the EMA (it is
        used from the next step on, never for the block it came from)."""
        e = expected_accepted(list(confidences)[: self.block_size])
        old = self._model.get(rid)
        self._model[rid] = e if old is None else (1.0 - self.ema) * old + self.ema * e

    def observe_copy(self, decision: HybridDecision, accepted_count: int, verified_len: int,
                     rejected: Optional[bool] = None) -> None:
        """After a copy step: teach the survival estimator (verified_len = verify length)."""
        if decision.proposal is not None:
            self._survival(decision.origin).observe(decision.proposal.match_len, accepted_count, verified_len,
                                                    decision.proposal.agreement, rejected)

    def forget(self, rid: Hashable) -> None:
        self._model.pop(rid, None)


def pad_block(tokens: Sequence[int], confidences: Sequence[float], block_size: int,
              pad_token: int = 0) -> tuple[list[int], list[float], int]:
    """Pad a copy block to the batch's block size g: (tokens [g], confidences [g] with zeros
    past the proposal, valid length).  Pass the valid length as SchedulerInput.max_len (and
    zero confidence keeps Algorithm 1 from admitting padded positions anyway)."""
    n = min(len(tokens), block_size)
    toks = list(tokens[:n]) + [pad_token] * (block_size - n)
    conf = [float(c) for c in confidences[:n]] + [0.0] * (block_size - n)
    return toks, conf, n
