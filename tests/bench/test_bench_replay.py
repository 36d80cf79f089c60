"""The replay benchmark's workload and summary, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentserve.bench.replay import TurnResult, build_workload, goals, summarize, tau

REPO = Path(__file__).resolve().parents[2]


def _r(system: str, workload: str, tokens: int, steps: int | None, e2e: float, conc: int = 1) -> TurnResult:
    return TurnResult(system, workload, "retry", 0, 0, conc, 100, 80, tokens, e2e, 0.1, None, steps)


def test_workload_turns_are_assistant_spans_of_the_rendered_trace() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "models" / "smollm2-135m-instruct")
    traces = build_workload(tok, 1, 3, seed=5)
    assert [k for k, _, _ in traces] == ["tool_json", "file_edit", "retry", "plan", "echo"]
    for _, toks, spans in traces:
        assert 1 <= len(spans) <= 3
        for start, end in spans:
            # every replayed prompt ends with the assistant header the template renders
            assert tok.decode(toks[:start]).endswith("<|im_start|>assistant\n") and end > start


def test_summary_tau_ratios_and_goals() -> None:
    res = [_r("plain", "replay", 33, None, 3.3), _r("ngram", "replay", 33, 22, 2.1), _r("dspark", "replay", 33, 30, 3.0),
           _r("hybrid", "replay", 33, 11, 1.1), _r("dspark", "chat", 33, 32, 3.3), _r("hybrid", "chat", 33, 32, 3.3)]
    assert tau(res[:1]) == 1.0 and tau(res[3:4]) == 3.0
    rows = summarize(res)
    h = next(r for r in rows if r["system"] == "hybrid" and r["workload"] == "replay")
    assert h["ratio_vs_plain"] == pytest.approx((32 / 1.0) / (32 / 3.2)) and h["cached_share"] == pytest.approx(0.8)
    text = "\n".join(goals(rows))
    assert "hybrid tau / dspark tau = 2.73" in text  # 3.0 / 1.1
    assert "hybrid tok/s / ngram tok/s = 2.00" in text  # (32/1.0) / (32/2.0)
    assert "chat: hybrid tok/s / dspark tok/s = 1.00" in text
