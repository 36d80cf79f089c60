"""Summarise a worker step trace (AGENTSERVE_STEP_TRACE=FILE): per draft source, rows,
expected / accepted / verified drafts; per batch size, plain and verify steps' forward seconds
and tokens per step; and, where the trace holds target forwards ("forward" lines, written by
every server traced, plain ones included), the worker's whole no-draft step against a plain
server's decode forward at the same batch size. Usage: .venv/bin/python scripts/trace_summary.py TRACE.jsonl"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def main(path: str) -> None:
    lines = [json.loads(line) for line in open(path, encoding="utf-8")]
    steps = [x for x in lines if "sources" in x]
    forwards = [x for x in lines if x.get("kind") == "forward"]
    src: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])
    for s in steps:
        for name, e, a, n in zip(s["sources"], s.get("expected") or [0.0] * len(s["sources"]), s["accepted"],
                                 s["verify_lens"]):
            row = src[name]
            row[0] += 1
            row[1] += e
            row[2] += a
            row[3] += n
    print(f"{len(steps)} steps")
    print("source   rows  expected  accepted  verified")
    for name, (rows, e, a, n) in sorted(src.items()):
        print(f"{name:8s} {rows:5d} {e:9.1f} {a:9d} {n:9d}")
    # copy rows cut short by the plan: every verified draft accepted while more were proposed
    cut = [(a, p - n) for s in steps for src_, a, n, p in zip(s["sources"], s["accepted"], s["verify_lens"],
                                                              s.get("proposed") or [0] * len(s["sources"]))
           if src_ not in ("model", "none") and a == n and p > n]
    if any(s.get("proposed") for s in steps):
        print(f"copy rows fully accepted with drafts left unverified: {len(cut)} (drafts left: {sum(x[1] for x in cut)})")
    print("bs  kind    steps  forward s (median)  batch tokens (mean)  emitted/step  emitted/s (forward)")
    by: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for s in steps:
        by[(s["batch_size"], "plain" if s["plain"] else "verify")].append(s)
    for (bs, kind), ss in sorted(by.items()):
        fwd = statistics.median(x["verify_s"] for x in ss)
        em = statistics.mean(sum(x["emitted"]) for x in ss)
        rate = sum(sum(x["emitted"]) for x in ss) / sum(x["verify_s"] + x["draft_s"] + x["schedule_s"] for x in ss)
        print(f"{bs:2d}  {kind:6s} {len(ss):6d}  {fwd:18.3f}  {statistics.mean(x['verify_tokens'] for x in ss):19.1f}"
              f"  {em:12.2f}  {rate:19.1f}")

    if forwards:
        compare_plain(steps, forwards)


def compare_plain(steps: list[dict], forwards: list[dict]) -> None:
    """Per batch size: a plain server's decode forward (median s) against the speculative
    worker's steps that drafted nothing (whole step: draft + schedule + verify, median s)."""
    plain: dict[tuple[str, int], list[float]] = defaultdict(list)
    for f in forwards:
        # a plain server's decode forwards (a speculative server's own DECODE forwards are its
        # no-draft steps, counted below as whole steps)
        if f["mode"] == "DECODE" and f.get("algorithm", "none") == "none":
            plain[(f["server"], f["batch_size"])].append(f["seconds"])
    worker: dict[int, list[float]] = defaultdict(list)
    for s in steps:
        if s["plain"]:
            worker[s["batch_size"]].append(s["draft_s"] + s["schedule_s"] + s["verify_s"])
    print("bs  server                 decode steps  decode s (median)  worker no-draft steps  worker step s (median)  ratio")
    for (server, bs), xs in sorted(plain.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        w = worker.get(bs, [])
        ratio = f"{statistics.median(w) / statistics.median(xs):.2f}" if w else "-"
        wm = f"{statistics.median(w):.4f}" if w else "-"
        print(f"{bs:2d}  {server:22s} {len(xs):12d}  {statistics.median(xs):17.4f}  {len(w):21d}  {wm:>22s}  {ratio}")


if __name__ == "__main__":
    main(sys.argv[1])
