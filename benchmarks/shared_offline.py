"""Offline: τ of copy drafting with the cross-session index vs the session index alone, on
public ComplexFuncBench traces (agentserve/bench/public_traces.py) rendered with our template.

Agents replay traces in order (trace t belongs to agent t % agents); each trace is one session.
Every recorded assistant call is regenerated as if the target emitted the recorded tokens
(greedy upper bound for copy drafting, no model drafter): per step the registry proposes
(session copy, plus the agent's shared copy with --shared), HybridChoice picks the candidate
with the higher calibrated estimate, the longest prefix that matches the recorded tokens is
accepted, and 1 + accepted tokens are emitted.  τ = generated tokens / steps, reported on the
second half of the traces (the first half warms the shared index).  --repeat 2 replays the same
traces twice (agents repeating exact tasks) and reports on the second pass.

Usage: python benchmarks/shared_offline.py --traces-path /tmp/nw [--n 200] [--agents 4] [--block 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from agentserve.bench.public_traces import conversation, load_complexfuncbench, token_stream  # noqa: E402
from sglang_ext.copy.chooser import CopySurvival, HybridChoice  # noqa: E402
from sglang_ext.copy.suffix_index import SessionIndexRegistry  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def simulate(streams: list[tuple[list[int], list[tuple[int, int]]]], agents: int, shared: str, block: int,
             measure_from: int) -> dict[str, float]:
    reg = SessionIndexRegistry(shared=shared, max_context=64, max_propose=32)
    hc = HybridChoice(CopySurvival(), block_size=block, model_prior=[0.0] * block)
    gen = steps = acc_total = 0
    by = {"index": 0, "shared": 0}
    t0 = time.perf_counter()
    for t, (full, spans) in enumerate(streams):
        key = f"req:{t}"
        reg.bind(key, f"agent{t % agents}", "standard")
        for s, e in spans:
            reg.sync(key, full[:s])
            j = s
            while j < e:
                d = hc.decide(key, reg.propose(key, None, block))
                acc = 0
                if d.use_copy:
                    while acc < len(d.tokens) and j + acc < e and d.tokens[acc] == full[j + acc]:
                        acc += 1
                    hc.observe_copy(d, acc, len(d.tokens))
                n = min(acc + 1, e - j)
                reg.extend(key, full[j:j + n])
                if t >= measure_from:
                    gen += n
                    steps += 1
                    acc_total += n - 1
                    if d.use_copy:
                        by[d.origin] += n - 1
                j += n
        reg.drop(key)
    return {"tau": gen / steps if steps else 0.0, "gen": gen, "steps": steps,
            "session_share": by["index"] / max(1, acc_total), "shared_share": by["shared"] / max(1, acc_total),
            "shared_tokens": reg.shared_tokens(), "seconds": time.perf_counter() - t0}


def main() -> None:
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--traces-path", default=None)
    ap.add_argument("--n", type=int, default=200, help="traces from the end of the file")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="replay the trace list this many times")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(os.path.join(REPO, "models", "smollm2-135m-instruct"))
    traces = load_complexfuncbench(a.traces_path, n=a.n)
    streams = []
    for tr in traces:
        conv = conversation(tr, tok, context=8192, max_new=128, max_tool_tokens=512, history="recorded")
        if conv.turns:
            streams.append(token_stream(conv))
    gen_tokens = sum(e - s for _, sp in streams for s, e in sp)
    print(f"traces {len(streams)}, turns {sum(len(sp) for _, sp in streams)}, tokens {sum(len(f) for f, _ in streams)}, "
          f"generated (recorded calls) {gen_tokens}")
    seq = streams * a.repeat
    start = len(streams) * (a.repeat - 1) if a.repeat > 1 else len(streams) // 2
    for mode in ("off", "agent", "global"):
        r = simulate(seq, a.agents, mode, a.block, start)
        print(f"shared={mode:6s} agents={a.agents} block={a.block}: tau {r['tau']:.3f} over {r['steps']} steps "
              f"({r['gen']} tokens); accepted drafts from session {r['session_share']:.2f}, shared "
              f"{r['shared_share']:.2f}; shared index {r['shared_tokens']} tokens; {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
