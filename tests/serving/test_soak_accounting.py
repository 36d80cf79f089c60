"""The soak's bookkeeping without a server: how a status becomes an outcome, and what it
reads from SGLang's /metrics text (fast lane)."""

from __future__ import annotations

import httpx
import pytest

from agentserve.soak import Record, Soak, check_loopback, parse_metrics


def outcome(kind: str, status: int | None, headers: dict[str, str] | None = None) -> Record:
    s = Soak("http://127.0.0.1:1", ["t"], 1, 1, 1)
    return s._finish(Record("a", "t", kind, 0.0), status, httpx.Headers(headers or {}))


def test_statuses_map_to_outcomes() -> None:
    assert outcome("chat", 200).outcome == "answered"
    r = outcome("chat", 429, {"retry-after": "3"})
    assert r.outcome == "refused" and r.retry_after_s == 3.0
    assert outcome("stream", 503, {"retry-after": "10"}).outcome == "refused"
    # a 503 that does not say when to come back, a 5xx, or no status at all: failures
    assert outcome("chat", 503).outcome == "failed"
    assert outcome("chat", 500).outcome == "failed"
    assert outcome("chat", None).outcome == "failed"
    # bad requests must be rejected with a 4xx; a good one rejected, or a bad one answered, fails
    assert outcome("malformed", 400).outcome == "rejected"
    assert outcome("oversized", 400).outcome == "rejected"
    assert outcome("malformed", 200).outcome == "failed"
    assert outcome("chat", 400).outcome == "failed"


def test_metrics_text_is_summed_over_label_sets() -> None:
    text = "\n".join([
        "# HELP sglang:token_usage The token usage",
        'sglang:token_usage{model_name="m",tp_rank="0"} 0.25',
        'sglang:num_running_reqs{model_name="m",tp_rank="0"} 3.0',
        'sglang:num_running_reqs{model_name="m",tp_rank="1"} 2.0',
        'sglang:num_queue_reqs{model_name="m"} 1.0',
        'sglang:gen_throughput{model_name="m"} 9.0',
    ])
    assert parse_metrics(text) == {"token_usage": 0.25, "num_running_reqs": 5.0, "num_queue_reqs": 1.0}


def test_soak_refuses_a_non_loopback_url() -> None:
    check_loopback("http://127.0.0.1:30000")
    check_loopback("http://localhost:30000")
    with pytest.raises(SystemExit, match="--url"):
        check_loopback("http://10.0.0.5:30000")
