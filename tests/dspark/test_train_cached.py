"""Corpus training on a tiny random HF target: corpus shards -> feature cache -> truncated-vocab
training with held-out tau, best checkpoint and resume; and the cached loss pieces."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sglang_ext.dspark.corpus import ShardWriter, corpus_stats, load_corpus
from sglang_ext.dspark.drafter import DSparkDrafter
from sglang_ext.dspark.features import FeatureCache, build_token_map, target_topk_probs
from sglang_ext.dspark.train import main

from test_train_pipeline import TEXTS, tiny_target  # noqa: F401  (fixture)


def _corpus(tdir: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tdir)
    model = AutoModelForCausalLM.from_pretrained(tdir).eval()
    w = ShardWriter(out)
    for i in range(24):
        ids = tok(TEXTS[i % len(TEXTS)] + f" ({i})")["input_ids"]
        gen = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        w.write({"key": f"t:{i}#greedy", "src": "gsm8k", "domain": "math", "split": "eval" if i % 6 == 0 else "train",
                 "variant": "greedy", "temperature": 0.0, "seed": i, "prompt_len": len(ids), "ids": gen[0].tolist()})
    w.close()


def test_corpus_training_end_to_end(tiny_target, tmp_path) -> None:  # noqa: F811
    tdir, _ = tiny_target
    cdir = tmp_path / "corpus"
    _corpus(tdir, cdir)
    with open(next((cdir / "shards").glob("*.gz")), "ab") as f:
        f.write(b"\x1f\x8b\x08\x00torn")  # a killed run's torn tail is skipped
    assert len(load_corpus(cdir, "train")) == 20 and len(load_corpus(cdir, "eval")) == 4
    assert corpus_stats(cdir)["answer_tokens"] > 0
    out, fc = tmp_path / "draft", tmp_path / "features"
    common = ["--target", tdir, "--out", str(out), "--corpus", str(cdir), "--block-size", "4", "--layers", "1",
              "--markov-rank", "8", "--target-layers", "3", "--device", "cpu", "--anchors", "4", "--no-progress",
              "--draft-vocab", "64", "--topk", "8", "--feature-cache", str(fc), "--eval-every", "10",
              "--save-every", "10", "--warmup", "5", "--eval-anchors", "4"]
    assert main(common + ["--steps", "20"]) == 0
    cached = list(fc.rglob("*.pt"))
    distinct = {tuple(r["ids"]) for r in load_corpus(cdir, "train")}
    assert len(cached) == len(distinct)  # one entry per train sequence, none for eval
    d = DSparkDrafter.from_pretrained(str(out))
    assert d.config.draft_vocab_size == 64 and d.token_map is not None and d.token_map.numel() == 64
    rep = json.load(open(out / "train_report.json"))
    assert 1.0 <= rep["T=0.0"]["all"]["tau"] <= 5.0 and len(rep["T=0.0"]["all"]["cond_accept"]) == 4
    log = [json.loads(x) for x in open(out / ".train" / "train_log.jsonl")]
    assert [e["step"] for e in log if "eval" in e] == [10, 20]
    mtime = {p: p.stat().st_mtime for p in cached}
    assert main(common + ["--steps", "30", "--resume"]) == 0
    log = [json.loads(x) for x in open(out / ".train" / "train_log.jsonl")]
    assert [e["step"] for e in log if "eval" in e] == [10, 20, 30]
    assert all(p.stat().st_mtime == t for p, t in mtime.items())  # the cache was reused, not rebuilt
    assert torch.equal(DSparkDrafter.from_pretrained(str(out)).token_map, d.token_map)  # kept across resume
    # --init-from: a trained drafter (no train state needed) trained further with a fresh schedule;
    # its architecture and token map come from the checkpoint, not from the flags
    more = tmp_path / "more"
    args = [x if x != str(out) else str(more) for x in common]
    args[args.index("--markov-rank") + 1] = "16"  # ignored: the checkpoint's config wins
    assert main(args + ["--steps", "10", "--init-from", str(out)]) == 0
    e = DSparkDrafter.from_pretrained(str(more))
    assert e.config.markov_rank == 8 and torch.equal(e.token_map, d.token_map)
    assert e.config.extra["dspark_training"]["init_from"] == os.path.abspath(out)
    log = [json.loads(x) for x in open(more / ".train" / "train_log.jsonl")]
    assert [x["step"] for x in log if "eval" in x] == [10]


def test_topk_probs_exact_and_token_map() -> None:
    logits = torch.randn(3, 10)
    top_v, top_i = logits.topk(10, -1)
    p = target_topk_probs(top_v, top_i, torch.logsumexp(logits, -1), None, 10)
    assert torch.allclose(p, torch.softmax(logits, -1), atol=1e-6)
    t2d = torch.full((10,), -1)
    t2d[torch.tensor([2, 5, 7])] = torch.arange(3)
    ps = target_topk_probs(top_v, top_i, torch.logsumexp(logits, -1), t2d, 3)
    assert torch.allclose(ps, torch.softmax(logits, -1)[:, [2, 5, 7]], atol=1e-6)
    recs = [{"ids": [9, 9, 1, 1, 1, 4, 4, 3], "prompt_len": 2}]
    assert build_token_map(recs, 3, 10, always=[8]).tolist() == [1, 4, 8]


def test_feature_cache_key_depends_on_layers(tiny_target, tmp_path) -> None:  # noqa: F811
    tdir, _ = tiny_target
    a = FeatureCache(tdir, [1, 2], 8, tmp_path)
    b = FeatureCache(tdir, [1, 3], 8, tmp_path)
    assert a.dir != b.dir and a.path([1, 2, 3]) != a.path([1, 2, 4])
    assert os.path.isdir(a.dir)
