"""scripts/trace_summary.py on a small hand-made trace: the batch-1 draft share and the steps
grouped by the bench request each rid belongs to."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("trace_summary", ROOT / "scripts" / "trace_summary.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _step(rids: list[str], draft_s: float, plain: bool, sources: list[str]) -> dict:
    n = len(rids)
    return {"batch_size": n, "rids": rids, "draft_s": draft_s, "schedule_s": 0.0, "verify_s": 0.08, "plain": plain,
            "sources": sources, "accepted": [1] * n, "verify_lens": [2] * n, "expected": [1.0] * n,
            "verify_tokens": 3 * n, "emitted": [2] * n}


def test_draft_share_and_groups(tmp_path, capsys) -> None:
    trace = tmp_path / "t.jsonl"
    steps = [_step(["a"], 0.02, False, ["model"]), _step(["a"], 0.02, False, ["model"]),
             _step(["b", "c"], 0.0, True, ["none", "none"]), _step(["a", "b"], 0.01, False, ["model", "none"])]
    trace.write_text("".join(json.dumps(s) + "\n" for s in steps))
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"requests": [
        {"rid": "a", "system": "dspark", "domain": "code", "concurrency": 1},
        {"rid": "b", "system": "dspark", "domain": "chat", "concurrency": 4},
        {"rid": "c", "system": "dspark", "domain": "chat", "concurrency": 4}]}))
    _load().main(str(trace), str(res))
    out = capsys.readouterr().out
    assert "batch-1 model-drafting steps: 2; draft phase median 20.0 ms, share of the step median 20.0%" in out
    rows = {tuple(line.split()[:3]): line.split() for line in out.splitlines() if line.startswith("dspark")}
    # the mixed step (rids of two groups) belongs to neither
    assert rows[("dspark", "code", "1")][3] == "2" and rows[("dspark", "chat", "4")][3] == "1"
    assert rows[("dspark", "chat", "4")][4] == "100%"  # its one step drafted nothing
