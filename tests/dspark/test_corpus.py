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


def test_followups_build_on_the_corpus_own_first_answers_and_keep_the_split(tmp_path) -> None:
    from sglang_ext.dspark.corpus import followup_prompts, turn_of

    d = tmp_path / "prompts"
    d.mkdir()
    _prompts(d)
    out = tmp_path / "corpus"
    w = ShardWriter(out)
    for i in (3, 7):  # two MT-Bench first turns answered greedily, one only sampled
        w.write({"key": f"mt-bench.jsonl:{i}/t1#greedy", "split": "train", "ids": [9, 9, 40 + i, 41], "prompt_len": 2})
    w.write({"key": "mt-bench.jsonl:8/t1#sampled", "split": "train", "ids": [9, 5], "prompt_len": 1})
    w.close()
    fu = followup_prompts(str(d), out, lambda ids: " ".join(map(str, ids)))
    # gsm8k and mbpp lines have two turns too in this fixture, but no answered first turn
    assert [p.key for p in fu] == ["mt-bench.jsonl:3", "mt-bench.jsonl:7"]
    assert [m["role"] for m in fu[0].messages] == ["user", "assistant", "user"]
    assert fu[0].messages[1]["content"] == "43 41" and fu[0].messages[2]["content"] == "follow-up"
    keys = [job_key(j) for j in plan_jobs(fu, seed=0)]
    assert keys == ["mt-bench.jsonl:3/t2#greedy", "mt-bench.jsonl:3/t2#sampled",
                    "mt-bench.jsonl:7/t2#greedy", "mt-bench.jsonl:7/t2#sampled"]
    first = [p for p in shared_prompts(str(d)) if p.key == "mt-bench.jsonl:3"][0]
    assert turn_of(first) == "t1" and is_eval(first.key) == is_eval(fu[0].key)
