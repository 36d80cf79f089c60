"""Session suffix index, copy-survival estimator and hybrid copy/model choice."""

from __future__ import annotations

import math
import random
from typing import Optional

import numpy as np
import pytest
import torch

from sglang_ext.dspark.scheduler import SchedulerInput, schedule_algorithm1
from sglang_ext.dspark.verify import verify_block
from sglang_ext.copy.suffix_index import Proposal, SessionIndexRegistry, SessionSuffixIndex
from sglang_ext.copy.chooser import CopySurvival, HybridChoice, expected_accepted, pad_block


# ----------------------------------------------------------------------------- brute force
def brute_propose(stream: list[int], ctx: list[int], max_len: int, max_context: int) -> Optional[Proposal]:
    """Longest suffix of ctx[-max_context:] ending at some e <= n-2; copy after the largest e;
    continue periodically past the end when the suffix also ends the stream."""
    n = len(stream)
    ctx = ctx[-max_context:]
    for L in range(len(ctx), 0, -1):
        s = ctx[-L:]
        ends = [e for e in range(L - 1, n - 1) if stream[e - L + 1:e + 1] == s]
        if not ends:
            continue
        e = ends[-1]
        toks = stream[e + 1:e + 1 + max_len]
        agr = []
        for k in range(len(toks)):
            pat = s + toks[:k]
            m = len(pat)
            pe = [x for x in range(m - 1, n - 1) if stream[x - m + 1:x + 1] == pat]
            agr.append(sum(stream[x + 1] == toks[k] for x in pe) / len(pe))
        extra = 0
        if len(toks) < max_len and stream[n - L:] == s:
            ext = stream + []
            d = n - 1 - e
            while len(toks) < max_len:
                ext.append(ext[-d])
                toks.append(ext[-1])
                extra += 1
            agr += [min(agr) if agr else 0.0] * extra
        return Proposal(toks, L, len(ends), agr, e + 1, extra)
    return None


def count_occ(stream: list[int], pat: list[int]) -> int:
    m = len(pat)
    return sum(stream[i:i + m] == pat for i in range(len(stream) - m + 1))


def assert_same(p: Optional[Proposal], b: Optional[Proposal], base: int = 0) -> None:
    if b is None:
        assert p is None
        return
    assert p is not None
    assert (p.match_len, p.tokens, p.occurrences, p.source_pos, p.extrapolated) == \
        (b.match_len, b.tokens, b.occurrences, b.source_pos + base, b.extrapolated)
    assert p.agreement == pytest.approx(b.agreement, abs=1e-12)


# ----------------------------------------------------------------------------- index
def test_proposals_match_bruteforce_on_random_streams() -> None:
    rng = random.Random(1234)
    checked = 0
    for _ in range(150):
        alpha = rng.choice([2, 3, 5])
        mc, mp = rng.choice([(3, 2), (5, 6), (64, 6), (8, 32)])
        idx = SessionSuffixIndex(max_tokens=10**6, max_context=mc, max_propose=mp)
        stream: list[int] = []
        for _ in range(rng.randint(1, 5)):
            chunk = [rng.randrange(alpha) for _ in range(rng.randint(0, 50))]
            idx.extend(chunk)
            stream += chunk
            for _ in range(4):
                if rng.random() < 0.6:
                    ctx = stream[len(stream) - rng.randint(0, min(20, len(stream))):]
                else:
                    ctx = [rng.randrange(alpha) for _ in range(rng.randint(0, 12))]
                ml = rng.randint(1, 8)
                assert_same(idx.propose(ctx, ml), brute_propose(stream, ctx, min(ml, mp), mc))
                checked += 1
        # Occurrence counts are exact for patterns up to the stats window.
        for _ in range(10):
            if not stream:
                break
            i = rng.randrange(len(stream))
            pat = stream[i:i + rng.randint(1, mc + mp)]
            assert idx.occurrences(pat) == count_occ(stream, pat)
    assert checked > 500


def test_periodic_run_uses_most_recent_occurrence_and_extrapolates() -> None:
    idx = SessionSuffixIndex(max_tokens=10**6)
    stream = [1, 2, 3] + [5, 7] * 3000
    n = len(stream)
    idx.extend(stream)
    # Context = stream tail: copy from the previous period and continue it past the end.
    ctx = stream[-10:]
    p = idx.propose(ctx, 6)
    assert_same(p, brute_propose(stream, ctx, 6, 64))
    assert p is not None and p.source_pos == n - 2  # most recent usable occurrence
    assert p.tokens == [5, 7, 5, 7, 5, 7] and p.extrapolated == 4
    assert p.occurrences == count_occ(stream, ctx) - 1  # minus the one ending the stream
    # Context not at the stream tail: no extrapolation.
    p = idx.propose([9, 5, 7, 5], 6)
    assert p is not None and (p.match_len, p.tokens, p.source_pos, p.extrapolated) == (3, [7], n - 1, 0)
    assert idx.occurrences([5, 7, 5]) == 2999


def test_sync_indexes_only_what_a_turn_adds() -> None:
    idx = SessionSuffixIndex(max_tokens=10**6)
    prompt1 = list(range(100, 140))
    assert idx.sync(prompt1) == 40
    out1 = [7, 8, 9, 10]
    idx.extend(out1)
    prompt2 = prompt1 + out1 + [11, 12, 13]
    assert idx.sync(prompt2) == 3  # history is not indexed twice
    assert idx.memory_tokens() == 47
    # A rewritten history appends from the first difference.
    prompt3 = prompt1[:10] + [1, 2]
    assert idx.sync(prompt3) == 2
    assert idx.tokens() == prompt1 + out1 + [11, 12, 13, 1, 2]
    # context=None proposes from the synced view's tail.
    idx.sync(prompt1[:5])
    p = idx.propose(None, 3)
    assert p is not None and p.tokens == prompt1[5:8]


def test_memory_bounded_and_proposals_on_retained_tail() -> None:
    rng = random.Random(7)
    cap = 1500
    idx = SessionSuffixIndex(max_tokens=cap, max_context=16, max_propose=8)
    full: list[int] = []
    motifs = [[rng.randrange(40) for _ in range(rng.randint(5, 30))] for _ in range(12)]
    for step in range(600):
        chunk = list(rng.choice(motifs)) if rng.random() < 0.7 else [rng.randrange(40) for _ in range(rng.randint(1, 20))]
        idx.extend(chunk)
        full += chunk
        assert idx.memory_tokens() <= cap
        assert idx.num_states() <= 2 * idx.memory_tokens() + 1
        if step % 25 == 0:
            tail = idx.tokens()
            base = idx.total_seen() - len(tail)
            assert tail == full[base:]
            ctx = full[-rng.randint(1, 16):]
            b = brute_propose(tail, ctx, 8, 16)
            p = idx.propose(ctx, 8)
            assert_same(p, b, base)
            if p is not None and p.extrapolated == 0:
                assert full[p.source_pos:p.source_pos + len(p.tokens)] == p.tokens
    assert len(full) > 5 * cap and idx.total_seen() == len(full)


def test_registry_lru_eviction_and_drop() -> None:
    reg = SessionIndexRegistry(max_total_tokens=1000, max_tokens_per_session=400)
    for sid in ("a", "b", "c"):
        reg.extend(sid, list(range(300)))
    assert reg.total_tokens() == 900 and len(reg) == 3
    reg.propose("a", [1, 2], 4)  # propose does not create, but touches nothing if absent
    reg.get("a")  # touch: b is now least recently used
    reg.extend("d", list(range(300)))
    assert "b" not in reg and {"a", "c", "d"} == set(reg.sessions())
    assert reg.total_tokens() == 900 and reg.evictions == 1
    # A session over its own cap is trimmed, not evicted.
    reg.extend("d", list(range(300, 700)))
    assert reg.get("d", create=False).memory_tokens() <= 400  # type: ignore[union-attr]
    assert reg.total_tokens() <= 1000
    assert reg.total_tokens() == sum(reg.get(s, create=False).memory_tokens() for s in list(reg.sessions()))  # type: ignore[union-attr]
    assert reg.drop("a") and not reg.drop("a")
    assert reg.propose("zzz", [1], 3) is None and "zzz" not in reg
    p = reg.propose("c", [10, 11], 3)
    assert p is not None and p.tokens == [12, 13, 14]


# ----------------------------------------------------------------------------- survival
def test_copy_survival_prior_and_convergence() -> None:
    cs = CopySurvival(max_positions=8)
    # Prior: longer matches survive better; split positions worse.
    pri = [cs.estimate(L, 1)[0] for L in (1, 2, 4, 8, 16, 32)]
    assert pri == sorted(pri) and 0.2 < pri[0] < pri[-1] < 0.96
    assert cs.estimate(8, 1, [0.5])[0] < cs.estimate(8, 1, [1.0])[0]
    rng = np.random.default_rng(0)
    true = {2: [0.35] * 8, 16: [0.9, 0.85, 0.8, 0.8, 0.75, 0.7, 0.7, 0.7]}
    for _ in range(4000):
        for L, c in true.items():
            verified = int(rng.integers(1, 9))
            acc = 0
            while acc < verified and rng.random() < c[acc]:
                acc += 1
            cs.observe(L, acc, verified)
    for L, c in true.items():
        est = cs.estimate(L, 8)
        # Later positions see fewer (censored) trials: tolerance from their counts.
        b = cs.bucket(L)
        for k in range(8):
            n = cs.succ[b, 0, k] + cs.fail[b, 0, k]
            if k < 3:
                assert n > 300
            if n < 30:
                continue
            assert abs(est[k] - c[k]) < 4 * math.sqrt(c[k] * (1 - c[k]) / n) + 0.01, (L, k, est[k], c[k], n)
    # A rejected-at-EOS round (rejected=False) records no failure.
    f0 = cs.fail.sum()
    cs.observe(4, 2, 5, rejected=False)
    assert cs.fail.sum() == f0
    cs2 = CopySurvival.from_state_dict(cs.state_dict())
    assert cs2.estimate(16, 8) == cs.estimate(16, 8)


def test_hybrid_choice_uses_pre_sampling_information() -> None:
    cs = CopySurvival(max_positions=8)
    for _ in range(200):
        cs.observe(16, 8, 8)  # long matches: always accepted
        cs.observe(1, 0, 4)  # 1-token matches: rejected at once
    hc = HybridChoice(cs, block_size=8, model_prior=[0.7] * 8)
    assert hc.decide("r", None).source == "model"
    long = Proposal(list(range(8)), 20, 3, [1.0] * 8)
    short = Proposal(list(range(8)), 1, 3, [1.0] * 8)
    d = hc.decide("r", long)
    assert d.use_copy and d.expected_copy > 6.0 and len(d.confidences) == 8
    assert not hc.decide("r", short).use_copy
    # A request whose model blocks have been excellent keeps the model (EMA of past blocks).
    for _ in range(10):
        hc.observe_model("s", [0.999] * 8)
    assert hc.model_expectation("s") > 7.5 and not hc.decide("s", long).use_copy
    hc.forget("s")
    assert hc.model_expectation("s") == pytest.approx(expected_accepted([0.7] * 8))
    toks, conf, n = pad_block([4, 5, 6], [0.9, 0.8, 0.7], 5, pad_token=0)
    assert toks == [4, 5, 6, 0, 0] and conf[3:] == [0.0, 0.0] and n == 3


# ----------------------------------------------------------------------------- lossless
V, G = 8, 4


def _toy_models(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(V, 0.4), size=V)  # peaked target rows
    q = 0.6 * p + 0.4 * rng.dirichlet(np.full(V, 1.0), size=V)  # an imperfect drafter
    return torch.from_numpy(p), torch.from_numpy(q)


def _sample_chain(q: torch.Tensor, start: torch.Tensor, g: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    toks, probs, prev = [], [], start
    for _ in range(g):
        row = q[prev]
        x = torch.multinomial(row, 1, generator=gen).squeeze(-1)
        toks.append(x)
        probs.append(row)
        prev = x
    return torch.stack(toks, 1), torch.stack(probs, 1)


def _target_rows(p: torch.Tensor, last: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    return torch.cat([p[last][:, None], p[drafts]], dim=1)  # [R, g+1, V]


def _first_two(res, drafts: torch.Tensor, p: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """First two emitted tokens (no EOS here, so a round emits accepted drafts + 1)."""
    n_acc, bonus = res.accept_lens, res.bonus
    t1 = torch.where(n_acc >= 1, drafts[:, 0], bonus)
    t2 = torch.where(n_acc >= 2, drafts[:, 1], torch.where(n_acc == 1, bonus, -1))
    miss = t2 < 0  # one token emitted: the next one is an ordinary target step
    if bool(miss.any()):
        t2[miss] = torch.multinomial(p[t1[miss]], 1, generator=gen).squeeze(-1)
    return t1, t2


def _one_step_pairs(p: torch.Tensor, q: torch.Tensor, cheat: bool, seed: int,
                    rows_per_group: int = 56000) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Many session states, one speculative step each with the hybrid chooser; returns per
    chosen source ("copy"/"model") observed and expected counts of the first two emitted tokens
    and the number of states.  Rows of all states are verified in one call per source."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sps = lambda b: 1.0 / (1.0 + 0.05 * b)  # noqa: E731
    cs = CopySurvival(max_positions=G)
    for _ in range(300):  # some history so estimates differ across match lengths
        L = rng.randint(1, 12)
        cs.observe(L, min(G, int(rng.expovariate(1.0 / (0.3 * L + 0.2)))), G)
    lasts, use, has_prop, blocks, vlens = [], [], [], [], []
    for h in range(60):
        motif = [rng.randrange(V) for _ in range(rng.randint(2, 7))]
        hist = (motif * 12)[: rng.randint(10, 40)] + [rng.randrange(V) for _ in range(rng.randint(0, 3))]
        idx = SessionSuffixIndex(max_context=16, max_propose=G)
        idx.extend(hist)
        hc = HybridChoice(cs, G, margin=0.0)
        hc.observe_model(h, [rng.uniform(0.2, 0.95) for _ in range(G)])  # previous-step stats
        prop = idx.propose(hist, G)
        dec = hc.decide(h, prop)
        lasts.append(hist[-1])
        use.append(dec.use_copy)
        has_prop.append(prop is not None)
        if prop is None:
            blocks.append([0] * G)
            vlens.append(0)
            continue
        ptoks, pconf, nvalid = pad_block(prop.tokens, cs.estimate_for(prop, G), G)
        inp = SchedulerInput(torch.tensor([pconf]), max_len=torch.tensor([nvalid]))
        blocks.append(ptoks)
        vlens.append(int(schedule_algorithm1(inp, sps)[0]))  # pre-verification verify length
    n_groups = {True: sum(use), False: len(use) - sum(use)}
    reps = torch.tensor([-(-rows_per_group // n_groups[u]) for u in use])
    hid = torch.repeat_interleave(torch.arange(len(use)), reps)
    last = torch.tensor(lasts)[hid]
    n = hid.numel()
    mdraft, mprobs = _sample_chain(q, last, G, gen)
    if cheat:
        # Looks at the model's *sampled* first token: forbidden, must show bias.
        use_copy = torch.tensor(has_prop)[hid] & (q[last, mdraft[:, 0]] <= 0.3)
    else:
        use_copy = torch.tensor(use)[hid]
    t1 = torch.empty(n, dtype=torch.long)
    t2 = torch.empty(n, dtype=torch.long)
    cr = use_copy.nonzero().squeeze(-1)
    if cr.numel():
        drafts = torch.tensor(blocks)[hid[cr]]
        res = verify_block(drafts, _target_rows(p, last[cr], drafts), None,
                           verify_lens=torch.tensor(vlens)[hid[cr]], generator=gen)
        t1[cr], t2[cr] = _first_two(res, drafts, p, gen)
    mr = (~use_copy).nonzero().squeeze(-1)
    if mr.numel():
        res = verify_block(mdraft[mr], _target_rows(p, last[mr], mdraft[mr]), mprobs[mr], generator=gen)
        t1[mr], t2[mr] = _first_two(res, mdraft[mr], p, gen)
    pn = p.numpy()
    out = {}
    for u, src in ((True, "copy"), (False, "model")):
        rows = (torch.tensor(use)[hid] == u).numpy()
        obs = np.zeros((V, V))
        np.add.at(obs, (t1.numpy()[rows], t2.numpy()[rows]), 1)
        first = np.bincount(last.numpy()[rows], minlength=V) @ pn  # expected first-token counts
        out[src] = (obs, first[:, None] * pn, n_groups[u])
    return out


def _check(obs: np.ndarray, exp: np.ndarray) -> tuple[float, float, float]:
    """(max |z| over first-token marginals and pair cells, 4.5-sigma bound at p=0.5 in
    frequency units, chi-square z over cells with expected >= 5)."""
    n = exp.sum()
    zs = []
    for o, e in ((obs.sum(1), exp.sum(1)), (obs.ravel(), exp.ravel())):
        pe = e / n
        ok = e > 0
        zs.append(np.max(np.abs(o[ok] / n - pe[ok]) / np.sqrt(pe[ok] * (1 - pe[ok]) / n + 1e-300)))
    keep = exp.ravel() >= 5
    chi2 = float((((obs.ravel() - exp.ravel()) ** 2) / np.maximum(exp.ravel(), 1e-300))[keep].sum())
    df = int(keep.sum()) - 1
    return max(zs), 4.5 * 0.5 / math.sqrt(n), (chi2 - df) / math.sqrt(2 * df)


def test_hybrid_copy_verification_is_lossless() -> None:
    p, q = _toy_models(0)
    out = _one_step_pairs(p, q, cheat=False, seed=11)
    assert out["copy"][2] >= 10 and out["model"][2] >= 10  # the chooser is really switching
    for src, (obs, exp, _) in out.items():
        zmax, bound, chi_z = _check(obs, exp)
        assert bound < 0.01, "too few draws to detect a 1% bias"
        assert zmax < 4.5, (src, zmax)
        assert chi_z < 4.0, (src, chi_z)


def test_cheating_chooser_is_detected() -> None:
    """Negative control: switching on the model's sampled tokens biases the output, and the
    test above has the power to see it."""
    p, q = _toy_models(0)
    out = _one_step_pairs(p, q, cheat=True, seed=11, rows_per_group=20000)
    zs = [_check(obs, exp)[2] for obs, exp, nh in out.values() if nh > 0]
    assert max(zs) > 10.0


def test_sequential_hybrid_loop_keeps_target_transitions() -> None:
    """Adaptive end-to-end loop: per-chain session index, shared online survival, per-request
    EMA, scheduler verify lengths; every emitted transition prev->next must follow p."""
    p, q = _toy_models(3)
    gen = torch.Generator().manual_seed(5)
    rng = random.Random(5)
    sps = lambda b: 1.0 / (1.0 + 0.02 * b)  # noqa: E731
    cs = CopySurvival(max_positions=G)
    hc = HybridChoice(cs, G)
    chains, idxs = [], []
    for _ in range(400):
        motif = [rng.randrange(V) for _ in range(rng.randint(2, 6))]
        h = (motif * 8)[: rng.randint(8, 24)]
        chains.append(list(h))
        idxs.append(SessionSuffixIndex(max_context=16, max_propose=G))
        idxs[-1].extend(h)
    start = [len(c) for c in chains]
    counts = np.zeros((V, V))
    n_copy = n_model = 0
    for _ in range(14):
        decs = [hc.decide(i, idxs[i].propose(chains[i], G)) for i in range(len(chains))]
        ci = [i for i, d in enumerate(decs) if d.use_copy]
        mi = [i for i, d in enumerate(decs) if not d.use_copy]
        n_copy += len(ci)
        n_model += len(mi)
        emitted: dict[int, list[int]] = {}
        if ci:
            blocks = [pad_block(decs[i].tokens, decs[i].confidences, G) for i in ci]
            drafts = torch.tensor([b[0] for b in blocks])
            inp = SchedulerInput(torch.tensor([b[1] for b in blocks]), max_len=torch.tensor([b[2] for b in blocks]))
            lens = schedule_algorithm1(inp, sps)
            last = torch.tensor([chains[i][-1] for i in ci])
            res = verify_block(drafts, _target_rows(p, last, drafts), None, verify_lens=lens, generator=gen)
            for j, i in enumerate(ci):
                emitted[i] = res.tokens[j]
                hc.observe_copy(decs[i], int(res.accept_lens[j]), int(lens[j]))
        if mi:
            last = torch.tensor([chains[i][-1] for i in mi])
            drafts, probs = _sample_chain(q, last, G, gen)
            res = verify_block(drafts, _target_rows(p, last, drafts), probs, generator=gen)
            qx = torch.gather(probs, 2, drafts[..., None]).squeeze(-1)
            for j, i in enumerate(mi):
                emitted[i] = res.tokens[j]
                hc.observe_model(i, qx[j].tolist())  # after the step: used from the next one
        for i, toks in emitted.items():
            prev = chains[i][-1]
            for t in toks:
                counts[prev, t] += 1
                prev = t
            chains[i].extend(toks)
            idxs[i].extend(toks)
    assert n_copy > 0.2 * (n_copy + n_model) and n_model > 0.2 * (n_copy + n_model)
    assert sum(len(c) - s for c, s in zip(chains, start)) == counts.sum()
    pn = p.numpy()
    chi2, df = 0.0, 0
    for a in range(V):
        n = counts[a].sum()
        e = n * pn[a]
        keep = e >= 5
        chi2 += float((((counts[a] - e) ** 2) / np.maximum(e, 1e-300))[keep].sum())
        df += int(keep.sum()) - 1
    assert (chi2 - df) / math.sqrt(2 * df) < 4.0


# ----------------------------------------------------------------------------- traces
def test_agent_traces_render_like_the_project_template() -> None:
    import json
    from pathlib import Path

    pytest.importorskip("jinja2")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from agentserve.bench.traces import TRACE_KINDS, build_trace

    # Same environment settings as transformers' apply_chat_template.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    tmpl = env.from_string((Path(__file__).resolve().parents[2] / "agentserve/templates/chatml_tools.jinja").read_text())
    for kind in TRACE_KINDS:
        tr = build_trace(kind, 3)
        assert tr.messages == build_trace(kind, 3).messages  # deterministic per seed
        segs = tr.render_segments()
        assert "".join(t for t, _ in segs) == tmpl.render(messages=tr.messages, tools=tr.tools, add_generation_prompt=False)
        gen = [t for t, g in segs if g]
        assert len(gen) == sum(m["role"] == "assistant" for m in tr.messages)
        assert all(t.endswith("<|im_end|>") for t in gen)


def test_view_memory_is_bounded_and_sync_still_works() -> None:
    idx = SessionSuffixIndex(max_tokens=100)
    conv = list(range(1000, 1250))
    assert idx.sync(conv) == 250 and idx.memory_tokens() <= 100
    idx.extend([1, 2, 3])
    conv += [1, 2, 3]
    assert len(idx._view) <= 200  # noqa: SLF001 - white-box memory check
    assert idx.sync(conv + [4, 5]) == 2  # the dropped prefix is not re-indexed
    assert idx.tokens()[-5:] == [1, 2, 3, 4, 5]
