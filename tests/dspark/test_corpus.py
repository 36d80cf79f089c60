"""Corpus planning: the fixed held-out rule, stable plans, resumable shards (no server here;
the build itself runs against the real server: `agentserve corpus build`)."""
from __future__ import annotations

import json
import zlib

from sglang_ext.dspark.corpus import (ShardWriter, is_eval, job_key, load_corpus, plan_jobs, prompt_pool,
                                      shared_prompts)
from sglang_ext.dspark.data import is_heldout


def _prompts(tmp_path):  # type: ignore[no-untyped-def]
    for fn in ("gsm8k.jsonl", "mbpp.jsonl", "mt-bench.jsonl"):
        with open(tmp_path / fn, "w") as f:
            for i in range(50):
                f.write(json.dumps({"turns": [f"{fn} question {i}", "follow-up"]}) + "\n")
    return str(tmp_path)


def test_split_rule_is_fixed_and_matches_data_module(tmp_path) -> None:
    ps = shared_prompts(_prompts(tmp_path))
    assert len(ps) == 150
    for p in ps:
        assert is_eval(p.key) == is_heldout(p.key) == (zlib.crc32(p.key.encode()) % 10 == 0)
    assert 5 <= sum(is_eval(p.key) for p in ps) <= 30


def test_plan_is_deterministic_interleaved_and_has_both_variants(tmp_path) -> None:
    d = _prompts(tmp_path)
    a = [job_key(j) for j in plan_jobs(prompt_pool(d, None), seed=0)]
    b = [job_key(j) for j in plan_jobs(prompt_pool(d, None), seed=0)]
    assert a == b and len(a) == len(set(a)) == 300
    assert {k.split("#")[1] for k in a} == {"greedy", "sampled"}
    assert {k.split(":")[0] for k in a[:6]} == {"gsm8k.jsonl", "mbpp.jsonl", "mt-bench.jsonl"}
    temps = {j.temperature for j in plan_jobs(prompt_pool(d, None), seed=0) if j.variant == "sampled"}
    assert temps <= {0.7, 0.85, 1.0} and len(temps) >= 2


def test_shards_append_and_dedupe(tmp_path) -> None:
    for run in range(2):
        w = ShardWriter(tmp_path)
        for i in range(3):
            w.write({"key": f"k{i + run}", "split": "train" if i else "eval", "ids": [1, 2, 3], "prompt_len": 1})
        w.close()
    ShardWriter(tmp_path).close()  # an empty run leaves no shard
    assert len(list((tmp_path / "shards").glob("*.gz"))) == 2
    assert [r["key"] for r in load_corpus(tmp_path)] == ["k0", "k1", "k2", "k3"]
    assert [r["key"] for r in load_corpus(tmp_path, "eval")] == ["k0"]
