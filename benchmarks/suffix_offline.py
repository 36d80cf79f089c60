"""Offline upper bound for session-aware copy drafting on synthetic agent traces.

For each trace kind (agentserve/bench/traces.py), the session's token stream (prompts, tool
outputs, earlier turns) is indexed incrementally with SessionSuffixIndex, and every assistant
generation is replayed as if the target reproduced the trace text exactly (greedy upper
bound):

  next-tok   fraction of generated tokens whose copy proposal (1 token) is right
  covered    fraction of generated tokens where the index proposes anything
  acc/step   mean accepted copied drafts per verify step that had a proposal (block g)
  tok/step   generated tokens per verify step (1 + accepted; steps without a proposal emit 1)
  pred/step  mean CopySurvival-predicted accepted length (learned online, before each step)

``--turn-only`` is the control: the index holds only the current generation, which shows how
much comes from the session history rather than from repetition inside one turn.

Usage:
  python benchmarks/suffix_offline.py [--per-kind 8] [--block 8] [--min-match 1,2,4] [--turn-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from agentserve.bench.traces import TRACE_KINDS, TokenTrace, build_corpus, tokenize_trace  # noqa: E402
from sglang_ext.copy.suffix_index import SessionSuffixIndex  # noqa: E402
from sglang_ext.copy.chooser import CopySurvival, expected_accepted  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@dataclass
class Stats:
    gen_tokens: int = 0
    next_ok: int = 0
    covered: int = 0
    steps: int = 0
    prop_steps: int = 0
    accepted: int = 0
    predicted: float = 0.0
    total_tokens: int = 0

    def add(self, o: "Stats") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(o, k))


def next_token_pass(tt: TokenTrace, min_match: int, ctx: int, turn_only: bool = False) -> Stats:
    """Token by token: is the 1-token proposal right?"""
    st = Stats(total_tokens=len(tt.tokens))
    idx = SessionSuffixIndex(max_context=ctx)
    toks = tt.tokens
    i = 0
    for s, e in tt.spans:
        if turn_only:  # control: index only the current generation
            idx = SessionSuffixIndex(max_context=ctx)
        else:
            idx.extend(toks[i:s])
        for j in range(s, e):
            p = idx.propose(toks[max(0, j - ctx):j], 1, min_match=min_match)
            st.gen_tokens += 1
            if p is not None:
                st.covered += 1
                st.next_ok += int(p.tokens[0] == toks[j])
            idx.extend(toks[j:j + 1])
        i = e
    return st


def step_pass(tt: TokenTrace, block: int, min_match: int, ctx: int, cs: CopySurvival,
              turn_only: bool = False) -> Stats:
    """Speculative steps with copied blocks; the target emits the trace's next token."""
    st = Stats()
    idx = SessionSuffixIndex(max_context=ctx)
    toks = tt.tokens
    i = 0
    for s, e in tt.spans:
        if turn_only:
            idx = SessionSuffixIndex(max_context=ctx)
        else:
            idx.extend(toks[i:s])
        j = s
        while j < e:
            p = idx.propose(toks[max(0, j - ctx):j], block, min_match=min_match)
            acc = 0
            if p is not None:
                st.prop_steps += 1
                st.predicted += expected_accepted(cs.estimate_for(p))
                while acc < len(p.tokens) and j + acc < e and p.tokens[acc] == toks[j + acc]:
                    acc += 1
                cs.observe_proposal(p, acc, len(p.tokens))
                st.accepted += acc
            n = min(acc + 1, e - j)  # accepted drafts + the target's bonus/correction token
            st.steps += 1
            idx.extend(toks[j:j + n])
            j += n
        i = e
    return st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=os.path.join(REPO, "models", "smollm2-135m-instruct"))
    ap.add_argument("--per-kind", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--min-match", default="1,2,4")
    ap.add_argument("--turn-only", action="store_true",
                    help="control: index only the current generation (no session history)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    t0 = time.time()
    corpus = build_corpus(args.per_kind, seed=args.seed)
    traces = [tokenize_trace(t, tok) for t in corpus]
    print(f"{len(traces)} traces, {sum(len(t.tokens) for t in traces)} tokens "
          f"({sum(sum(t.generated) for t in traces)} generated), tokenised in {time.time() - t0:.1f}s; "
          f"block g={args.block}, context {args.context}"
          f"{', TURN-ONLY control (no session history)' if args.turn_only else ''}\n")
    mins = [int(x) for x in args.min_match.split(",")]
    hdr = f"{'kind':<10} {'min':>3} {'tokens':>7} {'gen':>6} {'next-tok':>8} {'covered':>8} {'acc/step':>8} {'pred/step':>9} {'tok/step':>8}"
    print(hdr)
    print("-" * len(hdr))
    t0 = time.time()
    for mm in mins:
        tot = Stats()
        for kind in TRACE_KINDS:
            st = Stats()
            cs = CopySurvival(max_positions=args.block)  # greedy regime, learned online per kind
            for tt in traces:
                if tt.kind != kind:
                    continue
                a = next_token_pass(tt, mm, args.context, args.turn_only)
                b = step_pass(tt, args.block, mm, args.context, cs, args.turn_only)
                a.steps, a.prop_steps, a.accepted, a.predicted = b.steps, b.prop_steps, b.accepted, b.predicted
                st.add(a)
            tot.add(st)
            print(_row(kind, mm, st))
        print(_row("all", mm, tot))
        print()
    print(f"(replay {time.time() - t0:.1f}s)")


def _row(kind: str, mm: int, st: Stats) -> str:
    g = max(st.gen_tokens, 1)
    ps = max(st.prop_steps, 1)
    return (f"{kind:<10} {mm:>3} {st.total_tokens:>7} {st.gen_tokens:>6} {st.next_ok / g:>8.3f} {st.covered / g:>8.3f} "
            f"{st.accepted / ps:>8.2f} {st.predicted / ps:>9.2f} {st.gen_tokens / max(st.steps, 1):>8.2f}")


if __name__ == "__main__":
    main()
