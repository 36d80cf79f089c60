"""Fit STS on held-out rollouts and ship it only if it lowers ECE on other held-out rollouts.

`agentserve calibrate-draft --drafter D --target T --corpus corpus/` runs the drafter offline
(offline_eval: full blocks, the lossless rule) on the corpus' eval split, which the drafter
never trained on. That split is cut in two by a hash of each record's key: STS temperatures
are fitted on the "fit" half and the ECE of the prefix-survival estimate is measured on the
"test" half, before and after. Greedy records are scored at T=0, sampled ones at T=1 (one STS
bucket each). `--write` saves D/sts_calibration.json only when the test ECE drops at every
fitted temperature; otherwise it leaves the drafter as it was and says so. The report goes to
D/calibration_report.json either way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from dataclasses import asdict
from typing import Any

import torch

from .calibration import STSCalibration, expected_calibration_error, fit_sts, fit_sts_bias


def split_half(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(fit, test): a record's half is fixed by its key, so reruns and new records agree."""
    fit = [r for r in records if zlib.crc32(str(r["key"]).encode()) % 2 == 0]
    test = [r for r in records if zlib.crc32(str(r["key"]).encode()) % 2 == 1]
    return fit, test


def survival_ece(conf_logits: torch.Tensor, survived: torch.Tensor, temps: list[float],
                 biases: list[float] | None = None) -> list[float]:
    """ECE per position of prod_{i<=k} sigmoid(z_i / T_i + b_i) against observed prefix survival."""
    z = conf_logits.double() / torch.tensor(temps, dtype=torch.float64)[None, :]
    if biases is not None:
        z = z + torch.tensor(biases, dtype=torch.float64)[None, :]
    cum = torch.cumprod(torch.sigmoid(z), dim=1)
    return [expected_calibration_error(cum[:, k], survived[:, k].double()) for k in range(z.shape[1])]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentserve calibrate-draft", description=__doc__.split("\n")[0])
    p.add_argument("--drafter", required=True, help="drafter checkpoint directory")
    p.add_argument("--target", required=True, help="HF model directory of the target")
    p.add_argument("--corpus", required=True, help="corpus directory (its eval split is used)")
    p.add_argument("--seqs", type=int, default=40, help="records per half and temperature")
    p.add_argument("--anchors", type=int, default=8, help="anchors per record")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--objective", choices=["nll", "ece"], default="nll",
                   help="what each position's temperature minimises on the fit half (the other is reported too)")
    p.add_argument("--bias", action="store_true",
                   help="also fit a shift per position, c = sigmoid(z / T + b), by log-loss (ignores --objective)")
    p.add_argument("--rollouts", default=None,
                   help="JSON file of the rollouts (confidence logits, accepted lengths): read if it exists and "
                        "matches the settings, else written after the rollouts, so a refit costs no target run")
    p.add_argument("--write", action="store_true", help="save sts_calibration.json if it lowers test ECE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .corpus import load_corpus
    from .drafter import DSparkDrafter
    from .offline_eval import OfflineStats, evaluate_offline
    from .train import load_target

    for name in ("drafter", "target", "corpus"):  # bad paths name their argument, not a traceback
        if not os.path.isdir(getattr(args, name)):
            print(f"agentserve calibrate-draft: --{name}: {getattr(args, name)!r} is not a directory", file=sys.stderr)
            return 2
    saved: dict[str, Any] = {}
    if args.rollouts and os.path.exists(args.rollouts):
        try:
            with open(args.rollouts, encoding="utf-8") as f:
                saved = json.load(f)
            if not isinstance(saved, dict) or not isinstance(saved.get("stats"), dict):
                raise ValueError("no 'stats' field")
        except (OSError, ValueError) as e:
            print(f"agentserve calibrate-draft: --rollouts: {args.rollouts!r} is not a rollouts file ({e})", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    target, tok = load_target(args.target, "cpu")
    drafter = DSparkDrafter.from_pretrained(args.drafter, device="cpu", dtype=torch.float32)
    drafter.calibration = None  # measure the raw head, whatever the checkpoint ships
    drafter.attach_target(target)
    drafter.eval()
    use_seq = not bool(drafter.config.extra.get("dspark_training", {}).get("no_sequential"))  # DFlash: no Markov head
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    records = load_corpus(args.corpus, "eval")
    settings = {"drafter": os.path.abspath(args.drafter), "corpus": os.path.abspath(args.corpus), "seqs": args.seqs,
                "anchors": args.anchors, "seed": args.seed}
    cached: dict[str, Any] = {}
    fresh: dict[str, Any] = {}
    if saved:
        if saved.get("settings") == settings:
            cached = saved["stats"]
            print(f"rollouts from {args.rollouts}", file=sys.stderr)
        else:
            print(f"{args.rollouts}: other settings ({saved.get('settings')}); rolling out again", file=sys.stderr)
    cal = STSCalibration()
    report: dict[str, Any] = {"drafter": os.path.abspath(args.drafter), "corpus": os.path.abspath(args.corpus),
                              "split": "eval (crc32(key) % 2: 0 fit, 1 test)", "anchors": args.anchors}
    helps = True
    for variant, temp in (("greedy", 0.0), ("sampled", 1.0)):
        fit, test = split_half([r for r in records if r["variant"] == variant])
        fit, test = fit[: args.seqs], test[: args.seqs]
        if not fit or not test:
            print(f"{variant}: too few eval records ({len(fit)} fit, {len(test)} test)", file=sys.stderr)
            helps = False
            continue
        stats = {}
        for name, recs in (("fit", fit), ("test", test)):
            key = f"{variant}/{name}"
            if key in cached:
                stats[name] = OfflineStats(**cached[key])
                continue
            st = evaluate_offline(drafter, target, recs, temperature=temp, anchors_per_seq=args.anchors,
                                  seed=args.seed, use_sequential_head=use_seq, eos_token_ids=eos)["all"]
            fresh[key] = asdict(st)
            if not st.conf_logits:
                print("the drafter has no confidence head: nothing to calibrate", file=sys.stderr)
                return 2
            stats[name] = st
            print(f"T={temp} {name}: {len(recs)} records, {len(st.accept_lens)} blocks, tau {st.tau:.3f} "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr)
        zf, sf = torch.tensor(stats["fit"].conf_logits), stats["fit"].survived()
        zt, st_ = torch.tensor(stats["test"].conf_logits), stats["test"].survived()
        other = "ece" if args.objective == "nll" else "nll"
        alt = fit_sts(zf, sf, objective=other)[0]  # reported beside, never shipped
        biases = None
        if args.bias:
            temps, biases = fit_sts_bias(zf, sf)
            cal.buckets[f"{temp:.1f}"], cal.biases[f"{temp:.1f}"] = temps, biases
        else:
            cal.fit(temp, zf, sf, objective=args.objective)
            temps = cal.buckets[f"{temp:.1f}"]
        g = len(temps)
        before, after = survival_ece(zt, st_, [1.0] * g), survival_ece(zt, st_, temps, biases)
        mean_b, mean_a = sum(before) / g, sum(after) / g
        helps &= mean_a < mean_b
        report[f"T={temp}"] = {"fit_records": len(fit), "test_records": len(test),
                               "fit_blocks": len(stats["fit"].accept_lens), "test_blocks": len(stats["test"].accept_lens),
                               "tau_test": stats["test"].tau, "objective": "nll+bias" if args.bias else args.objective,
                               "temperatures": temps, "biases": biases,
                               "test_ece_before": before, "test_ece_after": after,
                               "test_ece_mean_before": mean_b, "test_ece_mean_after": mean_a,
                               f"{other}_objective": {"temperatures": alt,
                                                      "test_ece_after": survival_ece(zt, st_, alt)}}
        print(f"T={temp}: test ECE (mean over positions) {mean_b:.4f} -> {mean_a:.4f} "
              f"({'nll+bias' if args.bias else args.objective}); "
              f"temperatures " + " ".join(f"{t:.2f}" for t in temps)
              + f"; fitted by {other}: {sum(survival_ece(zt, st_, alt)) / g:.4f}", file=sys.stderr)
    if args.rollouts and fresh:
        with open(args.rollouts, "w", encoding="utf-8") as f:
            json.dump({"settings": settings, "stats": {**cached, **fresh}}, f)
    report["lowers_test_ece"] = helps
    report["written"] = bool(args.write and helps)
    report["minutes"] = (time.time() - t0) / 60
    if report["written"]:
        cal.save(os.path.join(args.drafter, "sts_calibration.json"))
    with open(os.path.join(args.drafter, "calibration_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    verdict = ("written to sts_calibration.json" if report["written"] else
               "lowers test ECE (not written: no --write)" if helps else "does not lower test ECE: not shipped")
    print(f"STS {verdict}; report in {os.path.join(args.drafter, 'calibration_report.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
