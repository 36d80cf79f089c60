"""Phase 2 of a decode step: how many of each row's drafts to verify (l_r), and the layout.

Inputs are pre-sampling only (draft confidences, tier weights and caps, measured step costs),
so the choice never depends on whether a draft will be accepted: lossless. The layout is
ragged (row r runs 1 + l_r positions) where the attention backend reads that batch
(cpu/attention.py, `supports_ragged_verify`), else uniform: every row padded to the widest,
SGLang's TARGET_VERIFY layout that any backend reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from sglang_ext.copy.chooser import HybridDecision
from sglang_ext.dspark.scheduler import SchedulerInput, schedule_algorithm1

if TYPE_CHECKING:
    from sglang_ext.spec.propose import Proposal, StepInputs
    from sglang_ext.spec.worker import AgentSparkWorker


def prefix_products(conf: list[float]) -> list[float]:
    out, a = [], 1.0
    for c in conf:
        a *= float(c)
        out.append(a)
    return out


@dataclass
class Plan:
    lens: torch.Tensor  # [bs] drafts verified per row
    width: int  # 1 + max l_r: the uniform layout's positions per row
    widths: list[int] = field(default_factory=list)  # positions per row in the forward
    ragged: bool = False  # rows run different widths (packed batch, agentserve_widths)

    @property
    def n_tokens(self) -> int:
        return sum(self.widths)


def plan(w: AgentSparkWorker, inp: StepInputs, prop: Proposal, tiers: list[str]) -> Plan:
    bs = inp.bs
    assert prop.conf is not None and prop.max_len is not None
    conf, max_len = prop.conf, prop.max_len
    gated = w.scheduler_mode != "verify_all"
    # Tiers: weights and caps from speeds so far (never from this step's drafts).
    weight = None
    if w.scheduler_mode == "tier_aware":
        weight, cap = w.tier_policy.inputs(inp.rids, tiers, [len(r.output_ids) for r in inp.batch.reqs])
        if cap is not None:
            max_len = torch.minimum(max_len, cap)
    ragged = w.ragged and not inp.batch.has_grammar  # the grammar mask walks a uniform tree
    if w.scheduler_mode == "verify_all":  # baseline: every proposed draft, no scheduling
        lens = max_len.clone()
    elif prop.copy_rows and not prop.model_rows:
        # Copied drafts only: every input is known before sampling, so the lengths that
        # maximise expected tokens/s (best_width's search: per row when ragged, one width
        # when padded) can be used directly. Algorithm 1's early stop exists for drafts whose
        # confidences come from their own sampled tokens, and on a cost curve with a step
        # (CPU: 2 tokens cost about what 8 do) it would never take the first token.
        lens = torch.clamp(max_len, max=prop.best_w - 1)
        if ragged:
            for i in prop.copy_rows:
                lens[i] = min(int(max_len[i]), prop.copy_lens.get(i, 0))
    else:
        lens = schedule_algorithm1(SchedulerInput(conf, weight=weight, max_len=max_len), w.sps.at(inp.kv))
        for i in prop.copy_rows:
            # copy rows next to model rows: at least the width check's length, as when copies are
            # alone (Algorithm 1's early stop would cut their deterministic drafts short)
            floor = prop.copy_lens.get(i, 0) if ragged else prop.best_w - 1
            lens[i] = max(int(lens[i]), min(int(max_len[i]), floor))
        if prop.copy_rows and not w.ragged:
            # copy rows ride along up to the step's width for free (deterministic drafts)
            wide = int(lens.max())
            for i in prop.copy_rows:
                lens[i] = min(int(max_len[i]), max(int(lens[i]), wide))
    if gated and ragged:
        lens = fill_to_cheapest(w, lens, max_len, conf, inp.kv)
    width = 1 + int(lens.max()) if bs else 1
    if gated and width > 1 and not ragged:
        # pad to the cheapest width at or above the needed one (measured step costs)
        width = w.sps.cheapest_width(bs, width, w.copy_block + 1, inp.kv)[0]
    # Ragged: request r runs 1 + l_r positions, so the forward costs SPS at sum(1 + l_r)
    # tokens (the paper's B), not bs x width; uniform when every row needs the same.
    widths = (lens + 1).tolist() if ragged else [width] * bs
    return Plan(lens, width, widths, ragged and len(set(widths)) > 1)


def best_width(w: AgentSparkWorker, decisions: list[Optional[HybridDecision]], copy_rows: list[int],
               model_rows: list[int], rids: list[str], bs: int, kv: float = 0.0) -> tuple[int, dict[int, int]]:
    """Batch-level cost check before drafting: (W, copy lengths). W is the verify width with the
    most expected tokens per second (1 = decode plainly). Expected tokens: each copy row's sum
    of survival products over the positions it verifies, each model row its past acceptance
    capped by its positions; all rows count together (a lone row rarely pays for a step's
    extra cost, eight copy rows often do). Uniform layout: every row is padded to W, so the
    step costs SPS at bs x W and each copy row verifies up to W - 1. Ragged layout: each copy
    row gets its own length (`ragged_lengths`), so a copy that rarely survives past its first
    token does not verify seven. Pre-sampling information only (copy confidences are
    deterministic given the context; the model's expectation is its past acceptance), so
    verification stays lossless."""
    plain_rate = bs / w.sps.step_seconds(bs, kv) * (1.0 + w.min_step_gain)
    copy_pp = []
    for i in copy_rows:
        d = decisions[i]
        assert d is not None
        copy_pp.append(prefix_products([float(c) for c in d.confidences]))
    model_e = [w.gate.expected(rids[i]) for i in model_rows]
    t_draft = (w.gate.t_draft or 0.0) * len(model_rows)
    if w.ragged:
        rate, lens = ragged_lengths(w, copy_pp, model_e, bs, kv, t_draft)
        if rate <= plain_rate:
            return 1, {}
        width = 1 + max(lens + ([w.block] if model_rows else []), default=0)
        return max(width, 2), {i: n for i, n in zip(copy_rows, lens)}
    best_rate, best_w = plain_rate, 1
    widest = max([len(pp) for pp in copy_pp] + [w.block if model_rows else 0])
    for width in range(2, widest + 2):
        gain = sum(sum(pp[: width - 1]) for pp in copy_pp) + sum(min(e, width - 1) for e in model_e)
        # every row padded to the width: the cheapest width >= it, see StepCost.cheapest_width
        t = w.sps.cheapest_width(bs, width, w.copy_block + 1, kv)[1]
        rate = (bs + gain) / (t + t_draft)
        if rate > best_rate:
            best_rate, best_w = rate, width
    return best_w, {}


def ragged_lengths(w: AgentSparkWorker, copy_pp: list[list[float]], model_e: list[float], bs: int,
                   kv: float, t_draft: float) -> tuple[float, list[int]]:
    """Ragged steps: (expected tokens/s, each copy row's verify length). Model rows verify
    their whole block (the gate chose them; they add their positions, their expected
    acceptance and the drafter's time). Copy positions are added best survival first, and the
    best prefix of that order wins: a global search, not Algorithm 1's early stop, since copy
    confidences are known before the step (lossless either way) and the cost curve has steps.
    A count of batch tokens costs the cheapest count at or above it (fill_to_cheapest pads)."""
    n0 = bs + len(model_e) * w.block
    top = max(bs * (w.copy_block + 1), n0)
    cost = [w.sps.step_seconds(n, kv) for n in range(n0, top + 1)]
    for k in range(len(cost) - 2, -1, -1):  # suffix minimum: cheapest at or above
        cost[k] = min(cost[k], cost[k + 1])
    gain = sum(min(e, w.block) for e in model_e)
    cand = sorted(((a, j, r) for r, pp in enumerate(copy_pp) for j, a in enumerate(pp, 1) if a > 0),
                  key=lambda t: (-t[0], t[1], t[2]))
    lens = [0] * len(copy_pp)
    best_rate, best = (bs + gain) / (cost[0] + t_draft), list(lens)
    for k, (a, j, r) in enumerate(cand, 1):
        lens[r] = j
        gain += a
        rate = (bs + gain) / (cost[min(k, len(cost) - 1)] + t_draft)
        if rate > best_rate:
            best_rate, best = rate, list(lens)
    return best_rate, best


def draft_costs(w: AgentSparkWorker, bs: int, kv: float = 0.0) -> tuple[float, float]:
    """What the draft gate weighs, from the step-cost model: a plain step's seconds per request
    (what one accepted draft saves) and the verify seconds one request's model block adds
    (ragged: its positions alone; uniform: every row padded to the block, shared by the rows)."""
    t1 = w.sps.step_seconds(bs, kv)
    if w.ragged:
        extra = w.sps.step_seconds(bs + w.block, kv) - t1
    else:
        extra = (w.sps.cheapest_width(bs, w.block + 1, w.copy_block + 1, kv)[1] - t1) / bs
    return t1 / bs, extra


def fill_to_cheapest(w: AgentSparkWorker, lens: torch.Tensor, max_len: torch.Tensor, conf: torch.Tensor,
                     kv: float = 0.0) -> torch.Tensor:
    """Ragged steps: when a larger batch-token count costs less (measured; a CPU's matmul
    kernels change with the row count), verify more of the drafts already proposed, best
    survival first, up to that count. Uses only pre-sampling inputs (lengths, confidences,
    costs), so it stays lossless."""
    if not bool((max_len > lens).any()):
        return lens  # no proposed draft left to add: skip the cost scan
    n = int(lens.sum()) + len(lens)
    target = w.sps.cheapest_tokens(n, len(lens) * (w.copy_block + 1), kv)[0]
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
