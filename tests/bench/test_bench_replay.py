"""The replay benchmark's workload, trace sources and summary, without a server."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agentserve.bench.client import RequestRecord
from agentserve.bench.replay import ReplayTrace, build_workload, goals, resolve_source, summarize

REPO = Path(__file__).resolve().parents[2]


def _r(system: str, workload: str, tokens: int, steps: int | None, e2e: float, conc: int = 1) -> RequestRecord:
    # sent at 0, first token at 0.1 s, done at e2e; 100 prompt tokens of which 80 cached
    return RequestRecord(0.0, 0.1, e2e, tokens, prompt_tokens=100, cached_tokens=80, verify_ct=steps,
                         labels={"system": system, "workload": workload, "concurrency": conc, "kind": "retry"})


def test_workload_turns_are_assistant_spans_of_the_rendered_trace() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "models" / "smollm2-135m-instruct")
    traces = build_workload(tok, argparse.Namespace(per_kind=1, seed=5, turns=3))
    assert [t.kind for t in traces] == ["tool_json", "file_edit", "retry", "plan", "echo"]
    for tr in traces:
        assert 1 <= len(tr.spans) <= 3
        for start, end in tr.spans:
            # every replayed prompt ends with the assistant header the template renders
            assert tok.decode(tr.tokens[:start]).endswith("<|im_start|>assistant\n") and end > start


def two_turns(tokenizer: object, a: argparse.Namespace):
    """A trace source of another kind (what a public-trace loader plugs in)."""
    yield ReplayTrace("public", list(range(20)), [(5, 8), (12, 15), (17, 19)])
    yield ReplayTrace("empty", [1, 2, 3], [])


def test_another_trace_source_plugs_in_by_name() -> None:
    source = resolve_source(f"{__name__}:two_turns")
    traces = build_workload(None, argparse.Namespace(turns=2), source)
    assert [(t.kind, t.spans) for t in traces] == [("public", [(5, 8), (12, 15)])]  # cut to 2 turns; no-turn trace dropped
    with pytest.raises(ValueError, match="--source"):
        resolve_source("nope")
    with pytest.raises(ValueError, match="--source"):
        resolve_source("agentserve.bench.replay:missing")


def test_summary_tau_ratios_and_goals() -> None:
    res = [_r("plain", "replay", 33, None, 3.3), _r("ngram", "replay", 33, 22, 2.1), _r("dspark", "replay", 33, 30, 3.0),
           _r("hybrid", "replay", 33, 11, 1.1), _r("dspark", "chat", 33, 32, 3.3), _r("hybrid", "chat", 33, 32, 3.3)]
    rows = summarize(res)
    h = next(r for r in rows if r["system"] == "hybrid" and r["workload"] == "replay")
    assert h["tau"] == 3.0 and next(r for r in rows if r["system"] == "plain")["tau"] == 1.0
    assert h["user_ratio"] == pytest.approx((32 / 1.0) / (32 / 3.2)) and h["cached_share"] == pytest.approx(0.8)
    assert h["e2e_ratio"] == pytest.approx(1.1 / 3.3) and h["total_ratio"] == pytest.approx(3.3 / 1.1)
    text = "\n".join(goals(rows))
    assert "hybrid tau / dspark tau = 2.73" in text  # 3.0 / 1.1
    assert "hybrid tok/s / ngram tok/s = 2.00" in text  # (32/1.0) / (32/2.0)
    assert "chat: hybrid tok/s / dspark tok/s = 1.00" in text
