"""Cross-session suffix index: learning across sessions, scope, memory bound, restart, and the
three-source hybrid choice keeping verification lossless."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from sglang_ext.copy.chooser import CopySurvival, HybridChoice, pad_block
from sglang_ext.copy.shared_index import SEP, ScopeIndex, SharedIndexStore, scope_key
from sglang_ext.copy.suffix_index import Proposal, SessionIndexRegistry, SessionSuffixIndex
from sglang_ext.dspark.scheduler import SchedulerInput, schedule_algorithm1
from sglang_ext.dspark.verify import verify_block


def _conversation(rng: random.Random, system: list[int], call: list[int], vocab: int = 5000) -> tuple[list[int], list[int]]:
    """(prompt, answer): a shared system prompt + a fresh user question; the answer is a tool
    call shaped like the agent's earlier ones (`call`) with fresh arguments."""
    user = [rng.randrange(100, vocab) for _ in range(rng.randint(20, 40))]
    args = [rng.randrange(100, vocab) for _ in range(5)]
    return system + user + [1, 2, 3], call + args + call[:8]  # [1, 2, 3]: the template's assistant header


def _drive(reg: SessionIndexRegistry, key: str, prompt: list[int], answer: list[int], agent: str, tier: str = "t",
           block: int = 8) -> int:
    """One request through the registry the way the worker drives it (bind, sync, propose,
    extend with what was emitted, drop at the end); returns answer tokens a shared-source
    proposal predicted exactly at its first position."""
    reg.bind(key, agent, tier)
    reg.sync(key, prompt)
    hits, pos = 0, 0
    while pos < len(answer):
        p = reg.propose(key, None, block)
        cands = [] if p is None else [p, *p.alternatives]
        if any(c.source == "shared" and c.tokens and c.tokens[0] == answer[pos] for c in cands):
            hits += 1
        reg.extend(key, answer[pos:pos + 1])
        pos += 1
    reg.drop(key)
    return hits


def test_second_session_of_an_agent_gets_drafts_learned_from_the_first() -> None:
    rng = random.Random(0)
    system = [rng.randrange(100, 5000) for _ in range(200)]
    call = [rng.randrange(100, 5000) for _ in range(30)]
    reg = SessionIndexRegistry(shared="agent", max_context=32, max_propose=16)
    p1, a1 = _conversation(rng, system, call)
    assert _drive(reg, "session:a1", p1, a1, agent="alice") == 0  # nothing learned yet
    p2, a2 = _conversation(rng, system, call)
    hits = _drive(reg, "session:a2", p2, a2, agent="alice")
    assert hits >= len(call) - 2  # the call's shape comes from session 1
    # the proposal at the start of the answer is the first session's call, from the shared index
    reg.bind("session:a3", "alice", "t")
    p3, _ = _conversation(rng, system, call)
    reg.sync("session:a3", p3)
    prop = reg.propose("session:a3", None, 8)
    assert prop is not None and prop.source == "shared" and prop.tokens[:8] == call[:8]


def test_another_agents_sessions_do_not_see_it() -> None:
    rng = random.Random(1)
    system = [rng.randrange(100, 5000) for _ in range(200)]
    call = [rng.randrange(100, 5000) for _ in range(30)]
    for mode, other_agent, other_tier, shared in (("agent", "bob", "t", False), ("agent", "alice", "u", True),
                                                  ("tier", "bob", "t", True), ("tier", "alice", "u", False),
                                                  ("global", "bob", "u", True), ("off", "alice", "t", False)):
        reg = SessionIndexRegistry(shared=mode, max_context=32, max_propose=16)
        p1, a1 = _conversation(rng, system, call)
        _drive(reg, "session:1", p1, a1, agent="alice", tier="t")
        p2, a2 = _conversation(rng, system, call)
        hits = _drive(reg, "session:2", p2, a2, agent=other_agent, tier=other_tier)
        assert (hits >= len(call) - 2) if shared else hits == 0, (mode, other_agent, other_tier, hits)


def test_unlabelled_requests_share_only_globally() -> None:
    assert scope_key("agent", "", "t") is None and scope_key("tier", "a", "") is None
    assert scope_key("global", "", "") == "*" and scope_key("agent", "a", "t") == "agent:a"
    with pytest.raises(ValueError, match="shared_index"):
        scope_key("team", "a", "t")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shared_index"):
        SessionIndexRegistry(shared="everyone")


def test_repeated_system_prompt_is_stored_once() -> None:
    rng = random.Random(2)
    system = [rng.randrange(100, 5000) for _ in range(2000)]
    scope = ScopeIndex(max_tokens=1 << 16, max_context=32, max_propose=16)
    first = scope.learn("s0", system + [1, 2, 3])
    assert first == len(system) + 3
    for s in range(1, 20):
        user = [rng.randrange(100, 5000) for _ in range(30)]
        added = scope.learn(f"s{s}", system + user)
        assert added <= len(user) + scope.overlap + 1  # the new run, its left context, a separator
    assert scope.memory_tokens() < len(system) + 20 * (30 + scope.overlap + 1) + 3


def test_proposals_never_cross_a_separator() -> None:
    scope = ScopeIndex(max_tokens=4096, cover=4, overlap=4, max_context=8, max_propose=8)
    scope.learn("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    scope.learn("b", [50, 51, 52, 53, 54, 55])
    p = scope.propose([6, 7, 8], 8)
    assert p is not None and p.tokens == [9] and p.source == "shared" and SEP not in p.tokens
    assert scope.propose([7, 8, 9], 8) is None  # only a separator followed


def test_memory_stays_under_budget_over_a_long_stream() -> None:
    """Many agents, many sessions, mostly novel text: total and per-scope tokens stay under
    their budgets at every point (printed over time), LRU sessions and scopes get evicted,
    and recent sessions still draft."""
    rng = random.Random(3)
    reg = SessionIndexRegistry(max_total_tokens=20000, max_tokens_per_session=4000, shared="agent",
                               shared_tokens=12000, shared_tokens_per_scope=5000, max_context=32, max_propose=16)
    systems = {a: [rng.randrange(100, 30000) for _ in range(300)] for a in range(6)}
    call = [rng.randrange(100, 30000) for _ in range(24)]
    trace, peak_shared, peak_sessions = [], 0, 0
    for n in range(240):
        agent = rng.randrange(6)
        prompt = systems[agent] + [rng.randrange(100, 30000) for _ in range(rng.randint(50, 400))]
        answer = call + [rng.randrange(100, 30000) for _ in range(rng.randint(20, 200))]
        key = f"req:{n}"
        reg.bind(key, f"agent{agent}", "t")
        reg.sync(key, prompt)
        for i in range(0, len(answer), 7):
            reg.propose(key, None, 8)
            reg.extend(key, answer[i:i + 7])
        if n % 3:
            reg.drop(key)  # finished; the others stay open until evicted
        peak_shared = max(peak_shared, reg.shared_tokens())
        peak_sessions = max(peak_sessions, reg.total_tokens())
        for sk in reg.shared.scopes():  # type: ignore[union-attr]
            assert reg.shared.scope(sk, create=False).memory_tokens() <= 5000  # type: ignore[union-attr]
        if n % 40 == 39:
            trace.append((n + 1, reg.total_tokens(), reg.shared_tokens()))
    print("requests, session-index tokens, shared-index tokens:", trace)
    assert peak_shared <= 12000 and peak_sessions <= 20000
    assert reg.shared.evicted_scopes > 0 or any(  # type: ignore[union-attr]
        reg.shared.scope(k, create=False).evicted_sessions > 0 for k in reg.shared.scopes())  # type: ignore[union-attr]
    assert reg.evictions > 0
    # the latest agent's next session still gets the call shape from the shared index
    reg.bind("req:new", f"agent{agent}", "t")
    reg.sync("req:new", systems[agent] + [7, 8, 9] + call[:3])
    p = reg.propose("req:new", None, 8)
    cands = [] if p is None else [p, *p.alternatives]
    assert any(c.source == "shared" and c.tokens[:5] == call[3:8] for c in cands)


def test_rebuilt_from_nothing_after_a_restart() -> None:
    """Nothing persists: a fresh store proposes nothing, and relearning the same sessions
    gives the same proposals as before (drafts only; verification keeps output exact)."""
    rng = random.Random(4)
    sessions = [[rng.randrange(0, 50) for _ in range(300)] for _ in range(5)]
    queries = [s[i:i + 12] for s in sessions for i in (10, 100, 250)]

    def run() -> list:
        store = SharedIndexStore(max_total_tokens=4000, max_tokens_per_scope=2000, max_context=16, max_propose=8)
        before = [store.propose("agent:a", q, 8) for q in queries]
        for j, s in enumerate(sessions):
            store.learn("agent:a", f"s{j}", s)
        after = [store.propose("agent:a", q, 8) for q in queries]
        return [before, [None if p is None else (p.tokens, p.match_len) for p in after]]

    first, restarted = run(), run()
    assert all(p is None for p in first[0]) and all(p is None for p in restarted[0])
    assert first[1] == restarted[1] and any(p is not None for p in first[1])


def test_chooser_scores_alternatives_with_their_own_survival() -> None:
    cs = CopySurvival(max_positions=8)
    hc = HybridChoice(cs, block_size=8, model_prior=[0.0] * 8)
    sess = Proposal(tokens=[1, 2, 3, 4], match_len=2, occurrences=1, agreement=[1.0] * 4)
    shared = Proposal(tokens=[5, 6, 7, 8], match_len=2, occurrences=1, agreement=[1.0] * 4, source="shared")
    d0 = hc.decide("r", Proposal(**{**sess.__dict__, "alternatives": (shared,)}))
    assert d0.use_copy and d0.origin == "index"  # same prior: the first (session) wins ties
    for _ in range(50):  # shared copies of this shape turn out to be accepted, session ones not
        hc.observe_copy(hc.decide("r", shared), 4, 4)
        hc.observe_copy(hc.decide("r", sess), 0, 4)
    d = hc.decide("r", Proposal(**{**sess.__dict__, "alternatives": (shared,)}))
    assert d.use_copy and d.origin == "shared" and d.tokens == [5, 6, 7, 8]
    assert d.expected_copy > hc.decide("r", sess).expected_copy


# ----------------------------------------------------------------------------- lossless
V, G = 8, 4


def _target_rows(p: torch.Tensor, last: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    return torch.cat([p[last][:, None], p[drafts]], dim=1)


def test_three_source_loop_keeps_target_transitions() -> None:
    """Sequential loop: per-chain session index + a shared index fed by all chains (one agent)
    + the model; the chooser picks per step from pre-sampling estimates; every emitted
    transition must follow the target p (chi-square), and all three sources get used."""
    rng_np = np.random.default_rng(7)
    p = torch.from_numpy(rng_np.dirichlet(np.full(V, 0.4), size=V))
    q = 0.6 * p + 0.4 * torch.from_numpy(rng_np.dirichlet(np.full(V, 1.0), size=V))
    gen = torch.Generator().manual_seed(9)
    rng = random.Random(9)
    sps = lambda b: 1.0 / (1.0 + 0.02 * b)  # noqa: E731
    hc = HybridChoice(CopySurvival(max_positions=G), G)
    reg = SessionIndexRegistry(shared="global", flush_every=6, max_context=16, max_propose=G)
    chains = []
    for c in range(300):
        motif = [rng.randrange(V) for _ in range(rng.randint(2, 6))]
        chains.append((motif * 8)[: rng.randint(8, 24)])
        reg.sync(f"req:{c}", chains[-1])
    start = [len(c) for c in chains]
    counts = np.zeros((V, V))
    used = {"index": 0, "shared": 0, "model": 0}
    for _ in range(12):
        decs = [hc.decide(i, reg.propose(f"req:{i}", None, G)) for i in range(len(chains))]
        ci = [i for i, d in enumerate(decs) if d.use_copy]
        mi = [i for i, d in enumerate(decs) if not d.use_copy]
        for i in ci:
            used[decs[i].origin] += 1
        used["model"] += len(mi)
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
            toks, probs, prev = [], [], last
            for _k in range(G):
                row = q[prev]
                x = torch.multinomial(row, 1, generator=gen).squeeze(-1)
                toks.append(x)
                probs.append(row)
                prev = x
            drafts, dprobs = torch.stack(toks, 1), torch.stack(probs, 1)
            res = verify_block(drafts, _target_rows(p, last, drafts), dprobs, generator=gen)
            qx = torch.gather(dprobs, 2, drafts[..., None]).squeeze(-1)
            for j, i in enumerate(mi):
                emitted[i] = res.tokens[j]
                hc.observe_model(i, qx[j].tolist())
        for i, toks_i in emitted.items():
            prev = chains[i][-1]
            for t in toks_i:
                counts[prev, t] += 1
                prev = t
            chains[i].extend(toks_i)
            reg.extend(f"req:{i}", toks_i)
    assert all(v > 0.05 * sum(used.values()) for v in used.values()), used
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


def test_matching_lengths_match_bruteforce() -> None:
    rng = random.Random(5)
    for _ in range(30):
        stream = [rng.randrange(4) for _ in range(rng.randint(1, 60))]
        seq = [rng.randrange(4) for _ in range(rng.randint(1, 30))]
        idx = SessionSuffixIndex(max_context=64, max_propose=8)
        idx.extend(stream)
        s = "," + ",".join(map(str, stream)) + ","
        want = []
        for i in range(len(seq)):
            k = 0
            while k < i + 1 and ("," + ",".join(map(str, seq[i - k:i + 1])) + ",") in s:
                k += 1
            want.append(k)
        assert idx.matching_lengths(seq) == want


def test_memory_stays_within_the_bounds_over_a_long_replay() -> None:
    """What the draft_index gauges report: session and shared tokens never exceed their caps
    however many sessions come and go (oldest sessions and scopes are evicted)."""
    rng = random.Random(2)
    reg = SessionIndexRegistry(max_total_tokens=4000, max_tokens_per_session=1500, shared="agent",
                               shared_tokens=3000, shared_tokens_per_scope=1000, flush_every=64,
                               max_context=32, max_propose=16)
    peak = (0, 0)
    for k in range(40):
        sid = f"session:{k}"
        reg.bind(sid, f"agent-{k % 5}", "t")
        reg.sync(sid, [rng.randrange(100, 5000) for _ in range(300)])
        for _ in range(10):
            reg.extend(sid, [rng.randrange(100, 5000) for _ in range(20)])
        session_tokens, shared_tokens, sessions = reg.memory()
        peak = (max(peak[0], session_tokens), max(peak[1], shared_tokens))
        if k % 3 == 0:
            reg.drop(sid)
    assert 0 < peak[0] <= 4000 and 0 < peak[1] <= 3000
    assert reg.memory()[2] < 40  # evicted, not kept
