"""Parsing /metrics and the agents JSON into snapshots, and windows between snapshots."""

from __future__ import annotations

import math

from console.metrics import (Histogram, agents_from_json, parse_samples, snapshot_from_text,
                             window)
from console_fakes import crafted_agents, crafted_metrics


def test_crafted_metrics_parse_into_snapshot():
    s = snapshot_from_text(crafted_metrics(3), t=10.0)
    assert s.connected and s.malformed_lines == 0
    assert (s.running, s.queued, s.token_usage) == (5.0, 2.0, 0.42)
    assert math.isclose(s.accept_length, 2.3)
    assert s.accept_rate == 0.55
    assert s.generation_tokens == 300.0 and s.requests_total == 9.0
    assert s.verify_budget.count == 12 and s.verify_budget.mean == 10.0
    assert s.verify_width.mean == 3.5
    assert set(s.step_seconds) == {"draft", "schedule", "verify"}
    assert math.isclose(s.step_seconds["verify"].mean, 0.03)
    assert s.verified_by_pos == {1: 300.0, 2: 300.0, 3: 300.0, 4: 300.0}
    assert s.accepted_by_pos[1] == 270.0
    assert s.fallbacks == {"no_drafter": 1.0}
    assert s.itl is None  # not exported by the fake


def test_window_rates_and_per_position_acceptance():
    a = snapshot_from_text(crafted_metrics(2), t=10.0)
    b = snapshot_from_text(crafted_metrics(4), t=12.0)
    w = window(a, b)
    assert w.seconds == 2.0
    assert w.gen_tokens_per_s == 100.0        # (400 - 200) / 2
    assert w.requests_per_s == 3.0
    assert w.verify_budget_mean == 10.0 and w.steps == 8
    assert w.batch_size_mean == (16 * 4 + 2 - (16 * 2 + 1)) / 8
    assert {p: round(v, 3) for p, v in w.acceptance_by_pos.items()} == {1: 0.9, 2: 0.7, 3: 0.5, 4: 0.25}
    # TTFT in the window: 2 of 6 under 0.1 s, the rest under 0.5 s
    assert 0.1 < w.ttft_p50 < 0.5
    # prefill stalls: (1.0 - 0.5) request-seconds in 2 s = 0.25 streams stalled on average
    assert w.stalled_streams == {"interactive": 0.25}
    assert window(None, b).stalled_streams == {}  # no rate without a previous poll
    # requests held back by prefill pacing: a gauge, as of the last poll (tiers at 0 left out)
    assert b.prefill_held == {"batch": 3.0, "interactive": 0.0} and w.held == {"batch": 3.0}


def test_window_after_server_restart_does_not_go_negative():
    before = snapshot_from_text(crafted_metrics(50), t=1.0)
    after = snapshot_from_text(crafted_metrics(1), t=2.0)   # counters reset
    w = window(before, after)
    assert w.gen_tokens_per_s is None
    assert w.verify_budget_mean == 10.0                   # lifetime of the new process
    assert all(0 <= v <= 1 for v in w.acceptance_by_pos.values())


def test_plain_server_without_speculation_shows_no_tau():
    text = ('sglang:spec_accept_length{tp_rank="0"} 0.0\nsglang:spec_accept_rate{tp_rank="0"} 0.0\n'
            'sglang:num_running_reqs{tp_rank="0"} 1.0\n')
    s = snapshot_from_text(text)
    assert s.accept_length is None and s.accept_rate is None and s.running == 1.0


def test_histogram_quantile_and_delta():
    h = Histogram([(0.1, 2.0), (1.0, 6.0), (math.inf, 8.0)], sum=5.0, count=8.0)
    assert h.quantile(0.25) == 0.1
    assert math.isclose(h.quantile(0.5), 0.1 + 0.9 * (4 - 2) / 4)
    assert h.quantile(1.0) == 1.0                          # +Inf bucket: the last finite bound
    assert Histogram().quantile(0.5) is None
    d = h.minus(Histogram([(0.1, 1.0), (1.0, 1.0), (math.inf, 1.0)], sum=0.05, count=1.0))
    assert d.count == 7.0 and d.buckets[0] == (0.1, 1.0)


def test_malformed_text_skips_bad_lines_and_keeps_good_ones():
    text = ("# TYPE sglang:num_running_reqs gauge\n"
            "sglang:num_running_reqs{tp_rank=\"0\"} 3.0\n"
            "this is not { a metric\n"
            "sglang:num_queue_reqs{tp_rank=\"0\"} notanumber\n"
            "sglang:token_usage 0.5\n"
            "agentserve:verify_budget_tokens_count 4\n")        # a histogram without buckets/sum
    s = snapshot_from_text(text)
    assert s.running == 3.0 and s.token_usage == 0.5 and s.queued is None
    assert s.malformed_lines == 2
    assert s.verify_budget is not None and s.verify_budget.count == 4 and s.verify_budget.quantile(0.5) is None
    for garbage in ("", "\x00\xff binary", "<html><body>502 Bad Gateway</body></html>", "{{{{", "a b c d e"):
        g = snapshot_from_text(garbage)
        assert g.running is None and not g.has_metrics


def test_parse_samples_drops_nan():
    samples, bad = parse_samples('x{a="1"} NaN\ny 2\n')
    assert "x" not in samples and samples["y"][0][1] == 2.0 and bad == 0


def test_agents_json_typed_and_tolerant():
    a = agents_from_json(crafted_agents())
    assert a.available and [r.agent_id for r in a.agents] == ["planner", "coder", "summarizer"]
    assert a.agents[2].accept_length is None and a.tiers[0].attainment == 0.93
    bad = agents_from_json({"agents": [{"agent_id": "x", "requests": "many", "ttft_p50_s": float("nan")},
                                       {"no_id": 1}, "junk"],
                            "tiers": [{"name": 3}, {"name": "t", "attainment": True}]})
    assert [r.agent_id for r in bad.agents] == ["x"]
    assert bad.agents[0].requests is None and bad.agents[0].ttft_p50_s is None
    assert [t.name for t in bad.tiers] == ["t"] and bad.tiers[0].attainment is None
    assert not agents_from_json(["not", "a", "dict"]).available
