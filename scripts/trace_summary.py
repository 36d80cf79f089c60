"""Summarise a worker step trace (AGENTSERVE_STEP_TRACE=FILE): per draft source, rows,
expected / accepted / verified drafts; per batch size, plain and verify steps' forward seconds
and tokens per step; and, where the trace holds target forwards ("forward" lines, written by
every server traced, plain ones included), the worker's whole no-draft step against a plain
server's decode forward at the same batch size; the draft phase's share of a batch-1 step that
drafted with the model; and, given the bench's results.json (its requests carry their rids), the
worker's steps per system, domain and concurrency.
Usage: .venv/bin/python scripts/trace_summary.py TRACE.jsonl [RESULTS.json]"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
from collections import defaultdict


def main(path: str, results: str | None = None) -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
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
    draft_share(steps)
    if results:
        by_group(steps, results)


def step_s(s: dict) -> float:
    return s["draft_s"] + s["schedule_s"] + s["verify_s"]


def draft_share(steps: list[dict]) -> None:
    """Batch-1 steps that drafted with the model: the draft phase's share of the whole step."""
    xs = [s for s in steps if s["batch_size"] == 1 and "model" in s["sources"] and not s["plain"]]
    if not xs:
        return
    shares = [s["draft_s"] / step_s(s) for s in xs]
    print(f"batch-1 model-drafting steps: {len(xs)}; draft phase median {statistics.median(s['draft_s'] for s in xs) * 1e3:.1f} ms, "
          f"share of the step median {statistics.median(shares):.1%}, overall {sum(s['draft_s'] for s in xs) / sum(map(step_s, xs)):.1%}")


def by_group(steps: list[dict], results: str) -> None:
    """Steps whose requests all belong to one (system, domain, concurrency) of a bench run."""
    with open(results, encoding="utf-8") as f:
        reqs = json.load(f)["requests"]
    group = {q["rid"]: (q["system"], q["domain"], q["concurrency"]) for q in reqs if q.get("rid")}
    by: dict[tuple, list[dict]] = defaultdict(list)
    for s in steps:
        gs = {group.get(r) for r in s.get("rids") or []}
        if len(gs) == 1 and None not in gs:
            by[gs.pop()].append(s)
    print("system   domain  c  steps  no-draft  mean bs  verify tokens/row  emitted/row  step s (mean)  draft share  emitted/s")
    for (sysname, dom, c), ss in sorted(by.items()):
        rows = sum(s["batch_size"] for s in ss)
        t = sum(map(step_s, ss))
        print(f"{sysname:8s} {dom:6s} {c:2d} {len(ss):6d}  {sum(s['plain'] for s in ss) / len(ss):8.0%}  {rows / len(ss):7.2f}"
              f"  {sum(s['verify_tokens'] for s in ss) / rows:17.2f}  {sum(sum(s['emitted']) for s in ss) / rows:11.2f}"
              f"  {t / len(ss):13.3f}  {sum(s['draft_s'] for s in ss) / t:11.1%}  {sum(sum(s['emitted']) for s in ss) / t:9.1f}")


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
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
