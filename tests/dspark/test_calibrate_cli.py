"""`agentserve calibrate-draft`: STS fitted on one half of the held-out split, ECE measured on
the other, written only when it helps there."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sglang_ext.dspark import calibrate
from sglang_ext.dspark.calibration import expected_calibration_error
from sglang_ext.dspark.corpus import ShardWriter
from sglang_ext.dspark.train import main as train_main

from test_train_pipeline import TEXTS, tiny_target  # noqa: F401  (fixture)


def test_split_half_is_disjoint_and_fixed_by_key() -> None:
    recs = [{"key": f"k{i}"} for i in range(200)]
    fit, test = calibrate.split_half(recs)
    assert len(fit) + len(test) == 200 and 60 < len(fit) < 140
    assert not {r["key"] for r in fit} & {r["key"] for r in test}
    fit2, _ = calibrate.split_half(list(reversed(recs)))
    assert {r["key"] for r in fit2} == {r["key"] for r in fit}


def test_a_missing_path_names_its_argument(tmp_path: Path, capsys) -> None:
    assert calibrate.main(["--drafter", str(tmp_path / "nope"), "--target", str(tmp_path), "--corpus", str(tmp_path)]) == 2
    assert "--drafter" in capsys.readouterr().err


def test_a_broken_rollouts_file_names_its_argument(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "rollouts.json"
    bad.write_text("{not json")
    assert calibrate.main(["--drafter", str(tmp_path), "--target", str(tmp_path), "--corpus", str(tmp_path),
                           "--rollouts", str(bad)]) == 2
    assert "--rollouts" in capsys.readouterr().err


def test_survival_ece_uses_the_cumulative_product() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 3, generator=g, dtype=torch.float64)
    surv = torch.rand(500, 3, generator=g) < 0.5
    ece = calibrate.survival_ece(z, surv, [1.0, 1.0, 1.0])
    cum = torch.cumprod(torch.sigmoid(z), 1)
    assert ece == [expected_calibration_error(cum[:, k], surv[:, k].double()) for k in range(3)]
    # an overconfident head (logits 4x too large) is fixed by T = 4 at every position
    true_p = torch.full((4000, 3), 0.6, dtype=torch.float64)
    obs = torch.cumprod((torch.rand(4000, 3, generator=g, dtype=torch.float64) < true_p).double(), 1).bool()
    zz = torch.full((4000, 3), 4 * float(torch.logit(torch.tensor(0.6))), dtype=torch.float64)
    assert sum(calibrate.survival_ece(zz, obs, [4.0] * 3)) < sum(calibrate.survival_ece(zz, obs, [1.0] * 3)) / 3


def test_calibrate_draft_end_to_end(tiny_target, tmp_path: Path) -> None:  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tdir, _ = tiny_target
    tok = AutoTokenizer.from_pretrained(tdir)
    model = AutoModelForCausalLM.from_pretrained(tdir).eval()
    cdir = tmp_path / "corpus"
    w = ShardWriter(cdir)
    torch.manual_seed(0)
    for i in range(36):
        ids = tok(TEXTS[i % len(TEXTS)] + f" ({i})")["input_ids"]
        variant = "greedy" if i % 2 == 0 else "sampled"
        gen = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=variant == "sampled",
                             pad_token_id=tok.pad_token_id)
        w.write({"key": f"t:{i}#{variant}", "src": "gsm8k", "domain": "math",
                 "split": "train" if i < 12 else "eval", "variant": variant, "temperature": float(i % 2),
                 "seed": i, "prompt_len": len(ids), "ids": gen[0].tolist()})
    w.close()
    out = tmp_path / "draft"
    assert train_main(["--target", tdir, "--out", str(out), "--corpus", str(cdir), "--block-size", "4",
                       "--layers", "1", "--markov-rank", "8", "--target-layers", "3", "--device", "cpu",
                       "--anchors", "4", "--no-progress", "--topk", "8", "--feature-cache", str(tmp_path / "fc"),
                       "--eval-every", "10", "--steps", "10", "--eval-anchors", "2", "--eval-seqs", "2"]) == 0
    rollouts = tmp_path / "rollouts.json"
    args = ["--drafter", str(out), "--target", tdir, "--corpus", str(cdir), "--seqs", "6", "--anchors", "4",
            "--rollouts", str(rollouts)]
    assert calibrate.main(args + ["--write"]) == 0
    rep = json.load(open(out / "calibration_report.json"))
    # a refit from the saved rollouts: no target run, the same numbers
    saved = json.loads(rollouts.read_text())
    assert set(saved["stats"]) == {"greedy/fit", "greedy/test", "sampled/fit", "sampled/test"}
    (out / "sts_calibration.json").unlink(missing_ok=True)
    assert calibrate.main(args + ["--write"]) == 0
    rep2 = json.load(open(out / "calibration_report.json"))
    assert [rep2[t]["test_ece_after"] for t in ("T=0.0", "T=1.0")] == [rep[t]["test_ece_after"] for t in ("T=0.0", "T=1.0")]
    assert rep["T=0.0"]["objective"] == "nll" and "temperatures" in rep["T=0.0"]["ece_objective"]
    for t in ("T=0.0", "T=1.0"):
        r = rep[t]
        assert r["fit_records"] > 0 and r["test_records"] > 0 and r["test_blocks"] > 0
        assert len(r["temperatures"]) == 4 and all(x > 0 for x in r["temperatures"])
        assert len(r["test_ece_before"]) == len(r["test_ece_after"]) == 4
    helps = all(rep[t]["test_ece_mean_after"] < rep[t]["test_ece_mean_before"] for t in ("T=0.0", "T=1.0"))
    assert rep["lowers_test_ece"] == helps and rep["written"] == helps
    assert (out / "sts_calibration.json").exists() == helps
