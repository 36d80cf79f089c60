"""Offline DSpark benchmark on held-out prompts with the bundled target (paper section 4 style).

Prints, per sampling temperature:
  * tau (accepted drafts + bonus, full block, no scheduler) per domain (math, code, chat, and
    agent: tool-call turns of the project's multi-turn agent traces, continued by the target) for
    DSpark and for the same backbone without the sequential head (DFlash-style ablation:
    a separately trained --no-sequential drafter via --dflash, else the DSpark drafter with
    its Markov bias switched off at inference, which is labelled as such);
  * conditional acceptance per position (P(accept k | accepted 1..k-1));
  * ECE of the cumulative confidence per position before/after STS (STS fitted on one half of
    the rollouts, ECE measured on the other half).

Usage:
  python benchmarks/dspark_offline.py --target models/smollm2-135m-instruct \
      --drafter drafters/smollm2-135m-dspark-corpus [--dflash DIR] [--prompts 10] [--temperatures 0,1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sglang_ext.dspark.calibration import expected_calibration_error, fit_sts  # noqa: E402
from sglang_ext.dspark.data import generate_sequences, load_prompts  # noqa: E402
from sglang_ext.dspark.drafter import DSparkDrafter  # noqa: E402
from sglang_ext.dspark.offline_eval import OfflineStats, evaluate_offline  # noqa: E402
from sglang_ext.dspark.train import load_target  # noqa: E402

DOMAINS = ("math", "code", "chat", "agent")
TEXT_DOMAINS = ("math", "code", "chat")


@torch.no_grad()
def agent_sequences(target: Any, tok: Any, n: int, cache: str, max_prompt: int, gen_tokens: int,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Held-out agent turns: each synthetic trace (tool calls with JSON arguments, tool outputs,
    file edits, retries) cut before an assistant turn that starts within `max_prompt` tokens,
    continued greedily by the target itself (so anchors sit in text the target produces)."""
    from agentserve.bench.serve import agent_prompts
    from sglang_ext.dspark.data import read_cache

    done = [r for r in read_cache(cache) if r.get("domain") == "agent"]
    if len(done) >= n:
        return done[:n]
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    # seeds far from the serving benchmarks' (0..): these traces are not the ones it replays
    prompts = agent_prompts(n, tok, seed=seed + 1000, max_prompt_tokens=max_prompt)
    dev = next(target.parameters()).device
    with open(cache, "a", encoding="utf-8") as f:
        for i, ids in enumerate(prompts[len(done):], start=len(done)):
            x = torch.tensor([ids], device=dev)
            out = target.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=gen_tokens,
                                  do_sample=False, pad_token_id=tok.eos_token_id)
            rec = {"key": f"agent:{i}", "domain": "agent", "prompt_len": len(ids), "ids": out[0].tolist()}
            f.write(json.dumps(rec) + "\n")
            done.append(rec)
    return done


def _fmt_row(name: str, vals: list[Any], width: int = 8) -> str:
    cells = []
    for v in vals:
        cells.append(f"{v:>{width}.3f}" if isinstance(v, float) else f"{str(v):>{width}}")
    return f"{name:<28}" + "".join(cells)


def ece_split(stats: OfflineStats, seed: int = 0) -> Optional[tuple[list[float], list[float], list[float]]]:
    if not stats.conf_logits or len(stats.accept_lens) < 20:
        return None
    z = torch.tensor(stats.conf_logits, dtype=torch.float64)
    s = stats.survived()
    perm = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))
    fit_idx, test_idx = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    temps, _, _ = fit_sts(z[fit_idx], s[fit_idx])
    zt, st = z[test_idx], s[test_idx].double()
    raw = torch.cumprod(torch.sigmoid(zt), 1)
    cal = torch.cumprod(torch.sigmoid(zt / torch.tensor(temps, dtype=torch.float64)), 1)
    before = [expected_calibration_error(raw[:, k], st[:, k]) for k in range(z.shape[1])]
    after = [expected_calibration_error(cal[:, k], st[:, k]) for k in range(z.shape[1])]
    return before, after, temps


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="models/smollm2-135m-instruct")
    ap.add_argument("--drafter", default="drafters/smollm2-135m-dspark-corpus")
    ap.add_argument("--dflash", default=None, help="separately trained --no-sequential drafter")
    ap.add_argument("--prompts", type=int, default=10, help="held-out prompts per domain")
    ap.add_argument("--agent-prompts", type=int, default=8, help="held-out agent-trace turns (0: none)")
    ap.add_argument("--agent-max-prompt", type=int, default=1024, help="agent turns start within N tokens")
    ap.add_argument("--anchors", type=int, default=8, help="anchors per sequence")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--cache", default="/tmp/dspark_bench/heldout.jsonl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    target, tok = load_target(args.target, args.device)
    drafter = DSparkDrafter.from_pretrained(args.drafter, device=args.device, target=target)
    variants: list[tuple[str, DSparkDrafter, bool]] = [("DSpark", drafter, True)]
    if args.dflash:
        variants.append(("DFlash (trained w/o head)", DSparkDrafter.from_pretrained(args.dflash, device=args.device, target=target), False))
    else:
        variants.append(("no seq. head (inference)", drafter, False))
    held = load_prompts(TEXT_DOMAINS, "heldout", limit_per_domain=args.prompts)
    seqs = generate_sequences(target, tok, held, args.cache, max_new_tokens=args.gen_tokens, batch_size=8, progress=False)
    seqs = [r for r in seqs if r.get("domain") != "agent"]
    if args.agent_prompts:
        seqs += agent_sequences(target, tok, args.agent_prompts, args.cache.replace(".jsonl", "-agent.jsonl"),
                                args.agent_max_prompt, args.gen_tokens)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    results: dict[str, Any] = {"n_sequences": len(seqs), "drafter": args.drafter}
    for t in [float(x) for x in args.temperatures.split(",") if x.strip()]:
        print(f"\n=== temperature {t}  ({len(seqs)} held-out sequences, {args.anchors} anchors each) ===")
        per_variant: dict[str, dict[str, OfflineStats]] = {}
        for name, d, seq_head in variants:
            per_variant[name] = evaluate_offline(d, target, seqs, temperature=t, anchors_per_seq=args.anchors,
                                                 seed=0, use_sequential_head=seq_head, eos_token_ids=eos)
        print("tau (accepted + bonus), full block of", drafter.config.block_size)
        print(_fmt_row("drafter", list(DOMAINS) + ["all"]))
        for name, per in per_variant.items():
            print(_fmt_row(name, [per[d].tau if d in per else float("nan") for d in list(DOMAINS) + ["all"]]))
        g = drafter.config.block_size
        print("\nconditional acceptance per position (all domains)")
        print(_fmt_row("drafter", [f"k={k + 1}" for k in range(g)]))
        for name, per in per_variant.items():
            print(_fmt_row(name, per["all"].conditional_acceptance()))
        res_t: dict[str, Any] = {name: {d: {"tau": s.tau, "n": len(s.accept_lens), "cond_accept": s.conditional_acceptance()}
                                        for d, s in per.items()} for name, per in per_variant.items()}
        e = ece_split(per_variant["DSpark"]["all"])
        if e is not None:
            before, after, temps = e
            print("\nECE of cumulative confidence per position (held-out half; STS fit on the other half)")
            print(_fmt_row("", [f"k={k + 1}" for k in range(g)]))
            print(_fmt_row("ECE raw", before))
            print(_fmt_row("ECE after STS", after))
            print(_fmt_row("STS temperature", temps))
            res_t["ece"] = {"before": before, "after": after, "temperatures": temps}
        results[f"T={t}"] = res_t
    print(f"\n(total {time.time() - t0:.0f}s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
