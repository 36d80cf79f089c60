"""When should a batch-1 request draft with the model? Draft-gate policies replayed offline.

For held-out greedy answers of the corpus (eval split: none trained on) the drafter drafts a block
at *every* position of the answer (target features from one forward of the whole sequence, the
drafter's calibrated confidences per slot). Under greedy decoding the target's answer is the
recorded one, so a block's accepted length is the length of its prefix that matches the answer.
With every position's (accepted, confidences) known, any gate policy can be replayed exactly: a
step at position p either decodes plainly (1 token, t_plain) or drafts (t_draft) and verifies L
drafts (t_verify(1 + L)), emitting min(accepted[p], L) + 1 tokens. Costs are the step-cost table
the server learned on this machine (~/.cache/agentserve/sps-online-*.json) or given by flags.

    python benchmarks/gate_offline.py --seqs 60 --out docs/bench-cpu/gate-offline

Prints tokens per second per policy and domain, as a ratio to plain decoding; writes the
per-position data (`positions.json`) so other policies can be replayed without the models.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sglang_ext.spec.draft_gate import DraftGate  # noqa: E402


# ----------------------------------------------------------------------------- per-position data
def collect(seqs: int, threads: int, max_answer: int) -> list[dict[str, Any]]:
    import torch

    from sglang_ext.dspark.corpus import load_corpus
    from sglang_ext.dspark.drafter import DraftContext, DSparkDrafter
    from sglang_ext.dspark.sampling import SamplingParams
    from sglang_ext.dspark.train import load_target
    from agentserve.bench.systems import DRAFTER

    torch.set_num_threads(threads)
    target, _ = load_target(str(REPO / "models" / "smollm2-135m-instruct"), "cpu", torch.bfloat16)
    drafter = DSparkDrafter.from_pretrained(DRAFTER, device="cpu", dtype=torch.bfloat16)
    drafter.attach_target(target)
    drafter.eval()
    g = drafter.config.block_size
    recs = [r for r in load_corpus(REPO / "corpus", "eval") if r["variant"] == "greedy"]
    by_dom: dict[str, list[dict]] = {}
    for r in recs:
        by_dom.setdefault(r["domain"], []).append(r)
    pick = [r for i in range(seqs) for d in sorted(by_dom) if i < len(by_dom[d]) for r in [by_dom[d][i]]][:seqs]
    out = []
    t0 = time.time()
    with torch.no_grad():
        for n, r in enumerate(pick):
            ids, lo = r["ids"], int(r["prompt_len"])
            hi = min(len(ids) - 1, lo + max_answer)
            seq = torch.tensor(ids[: hi + 1])[None]
            hs = target.model(input_ids=seq, output_hidden_states=True, use_cache=False).hidden_states
            feats = torch.cat([hs[l + 1] for l in drafter.config.target_layer_ids], dim=-1)[0]
            acc, conf = [], []
            full = drafter.new_context()
            drafter.append_context(full, feats[:hi], torch.arange(hi))
            # the anchor at position a is the last emitted token; its context is positions < a
            # (views of one context: the K/V of a position do not depend on what follows it)
            for a0 in range(lo, hi, 16):
                anchors = list(range(a0, min(a0 + 16, hi)))
                ctxs = [DraftContext(k=full.k, v=full.v, positions=full.positions, length=a) for a in anchors]
                blk = drafter.draft_block(ctxs, torch.tensor([ids[a] for a in anchors]), torch.tensor(anchors),
                                          SamplingParams.make(0.0, n=len(anchors)))
                for k, a in enumerate(anchors):
                    want = ids[a + 1: a + 1 + g]
                    m = 0
                    while m < len(want) and int(blk.tokens[k, m]) == want[m]:
                        m += 1
                    acc.append(m)
                    conf.append([round(float(x), 4) for x in blk.confidences[k]])
            out.append({"key": r["key"], "domain": r["domain"], "acc": acc, "conf": conf})
            print(f"{n + 1}/{len(pick)} {r['domain']:6s} {len(acc):4d} positions, mean accepted "
                  f"{sum(acc) / max(1, len(acc)):.2f} ({time.time() - t0:.0f} s)", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- costs
def load_costs(path: str | None, t_draft: float) -> Callable[[int], float]:
    """Seconds of a batch-1 forward of n tokens (n = 1: plain decoding) from a learned table."""
    files = [path] if path else sorted(glob.glob(os.path.expanduser("~/.cache/agentserve/sps-online-*.json")))
    if not files:
        raise SystemExit("no step-cost table: pass --costs or run a server first")
    sec = json.loads(Path(files[-1]).read_text())["seconds"]
    table = {int(k): float(v) for k, v in sec.items()}
    pts = sorted(n for n in table if n <= 8)

    def t(n: int) -> float:
        # monotone: a longer verify never costs less than a shorter one (noise in the table)
        return max(table[m] for m in pts if m <= n)

    return t


# ----------------------------------------------------------------------------- policies
def best_len(conf: list[float], t: Callable[[int], float], t_draft: float) -> int:
    """Verify length with the most expected tokens per second (0: verify nothing)."""
    best, best_rate, surv, gain = 0, 1.0 / (t(1) + t_draft), 1.0, 0.0
    for L, c in enumerate(conf, 1):
        surv *= c
        gain += surv
        rate = (1 + gain) / (t(1 + L) + t_draft)
        if rate > best_rate:
            best, best_rate = L, rate
    return best


def replay(seq: dict, policy: str, t: Callable[[int], float], t_draft: float, threshold: float,
           **kw: Any) -> tuple[int, float, int]:
    """(tokens, seconds, drafted steps) of one answer under a policy; a gate drafts while its
    estimate of accepted drafts per block is at least `threshold`."""
    acc, conf = seq["acc"], seq["conf"]
    p, tok, sec, drafted = 0, 0, 0.0, 0
    gate = None
    if policy == "gate":  # the server's own gate (sglang_ext/spec/draft_gate.py)
        gate = DraftGate(t_draft=t_draft, **kw)
        t_extra = threshold * t(1) - t_draft  # so that a "block"-priced block costs `threshold` drafts
    while p < len(acc):
        if policy == "plain":
            L, draft = 0, False
        elif policy == "always7":
            L, draft = 7, True
        elif policy == "always_cut":  # draft every step, verify what the confidences say pays
            L, draft = best_len(conf[p], t, t_draft), True
        elif policy == "oracle":  # knows the outcome: an upper bound, not a policy
            L = acc[p]
            draft = L > 0 and (1 + L) / (t(1 + L) + t_draft) > 1 / t(1)
        else:
            assert gate is not None
            draft = gate.decide("r", t(1), t_extra) != "skip"
            L = best_len(conf[p], t, t_draft) if draft else 0
        if draft:
            n = min(acc[p], L) + 1
            sec += t_draft + t(1 + L)
            drafted += 1
            if gate is not None:
                surv, exp_, exp_block = 1.0, 0.0, 0.0
                for j, c in enumerate(conf[p]):
                    surv *= c
                    exp_block += surv
                    exp_ += surv if j < L else 0.0
                gate.observe_model("r", min(acc[p], L), exp_, exp_block)
        else:
            n, sec = 1, sec + t(1)
        tok += n
        p += n
    return tok, sec, drafted


POLICIES: dict[str, dict[str, Any]] = {
    "plain": {},
    "always7": {},
    "always_cut": {},
    "gate (shipped)": {"cost": "block", "estimate": "confidence"},
    "gate, probe 4, no doubling": {"cost": "block", "estimate": "confidence", "probe_every": 4, "max_probe_every": 4},
    "gate, probe 2, no doubling": {"cost": "block", "estimate": "confidence", "probe_every": 2, "max_probe_every": 2},
    "gate, ema 0.5, probe 4": {"cost": "block", "estimate": "confidence", "ema": 0.5, "probe_every": 4,
                               "max_probe_every": 4},
    "gate, block expectation, probe 4": {"cost": "block", "estimate": "block", "probe_every": 4, "max_probe_every": 4},
    "gate, block expectation, probe 8": {"cost": "block", "estimate": "block", "probe_every": 8, "max_probe_every": 8},
    "gate on draft cost, block exp., probe 4": {"cost": "draft", "estimate": "block", "probe_every": 4,
                                                "max_probe_every": 4},
    "gate on draft cost, block exp., probe 8+": {"cost": "draft", "estimate": "block"},
    "oracle": {},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=60, help="held-out greedy sequences (spread over domains)")
    ap.add_argument("--max-answer", type=int, default=160, help="positions per answer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--costs", default=None, help="step-cost table JSON (default: the newest learned one)")
    ap.add_argument("--t1-t8", default=None, help="forward seconds at 1 and 8 tokens, e.g. 0.065,0.085 "
                    "(linear between; instead of a learned table)")
    ap.add_argument("--t-draft", type=float, default=0.0086, help="seconds of one batch-1 drafter call")
    ap.add_argument("--threshold", type=float, default=None,
                    help="the gate's threshold in accepted drafts per block (default: (t_draft + t(8) - t(1)) / t(1))")
    ap.add_argument("--positions", default=None, help="replay these positions.json instead of collecting")
    ap.add_argument("--out", default=None, help="folder for positions.json and table.txt")
    a = ap.parse_args(argv)
    data = json.loads(Path(a.positions).read_text()) if a.positions else collect(a.seqs, a.threads, a.max_answer)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        if not a.positions:
            Path(a.out, "positions.json").write_text(json.dumps(data))
    if a.t1_t8:
        t1, t8 = (float(x) for x in a.t1_t8.split(","))
        t = lambda n: t1 + (t8 - t1) * (n - 1) / 7  # noqa: E731
    else:
        t = load_costs(a.costs, a.t_draft)
    thr = a.threshold if a.threshold is not None else (a.t_draft + t(8) - t(1)) / t(1)
    lines = [f"costs: t(1) {t(1) * 1e3:.1f} ms, t(8) {t(8) * 1e3:.1f} ms, drafter {a.t_draft * 1e3:.1f} ms, "
             f"gate threshold {thr:.2f}; "
             f"{len(data)} sequences, {sum(len(s['acc']) for s in data)} positions"]
    doms = sorted({s["domain"] for s in data}) + ["all"]
    lines.append(f"{'policy':34s}" + "".join(f"{d:>16s}" for d in doms))
    base: dict[str, float] = {}
    for name, kw in POLICIES.items():
        pol = name.split(" ")[0] if not name.startswith("gate") else "gate"
        cells = []
        for d in doms:
            tok = sec = drafted = 0.0
            for s in data:
                if d == "all" or s["domain"] == d:
                    x, y, z = replay(s, pol, t, a.t_draft, thr, **kw)
                    tok, sec, drafted = tok + x, sec + y, drafted + z
            rate = tok / sec if sec else math.nan
            if name == "plain":
                base[d] = rate
            cells.append(f"{rate / base[d]:6.2f}x d{drafted / max(1, tok) * 100:3.0f}%")
        lines.append(f"{name:34s}" + "".join(f"{c:>16s}" for c in cells))
    lines.append("cells: tokens/s over plain decoding's (same costs); d: drafted steps per emitted token")
    print("\n".join(lines))
    if a.out:
        Path(a.out, "table.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
