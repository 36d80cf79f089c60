"""The tier benchmark's systems and its per-tier summary, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentserve.bench.client import RequestRecord
from agentserve.bench.prom import spec_delta
from agentserve.bench.tiers import TIER_SYSTEMS, add_stalls, print_table, read_trace, summarize, tier_profile
from agentserve.server.launcher import build_plan
from agentserve.profile import Tier, load_profile

REPO = Path(__file__).resolve().parents[2]
def rec(tier: str, send: float, first: float | None, end: float, tokens: int, status: int = 200, rid: str | None = None,
        client: int = 0, reason: str | None = None) -> RequestRecord:
    """A request as run_level returns it: times in seconds into the level."""
    return RequestRecord(send, first, end, tokens, status=status, rid=rid, reason=reason,
                         labels={"tier": tier, "client": client})


TIERS = [Tier(name="interactive", target_tokens_per_s=8.0, priority=0), Tier(name="standard", target_tokens_per_s=4.0, priority=1),
         Tier(name="batch", priority=2)]


@pytest.mark.parametrize("system", list(TIER_SYSTEMS))
def test_each_system_is_a_valid_profile(system: str) -> None:
    prof = tier_profile(load_profile(REPO / "profiles" / "cpu-dspark.yaml"), system, TIERS)
    assert prof.default_tier == "batch" and prof.admission_control == system.startswith("tier_aware")
    assert (prof.drafter.algorithm == "none") == (system == "plain")
    if system != "plain":
        assert prof.drafter.scheduler == {"verify_all": "verify_all", "throughput": "throughput", "tier_aware": "tier_aware"}[system]
    assert build_plan(prof).argv  # the launcher accepts it


def test_summary_counts_attainment_and_refusals() -> None:
    res = [rec("interactive", 0.0, 1.0, 5.0, 41),  # 40 tokens in 4 s: 10 tok/s, meets 8
           rec("interactive", 0.5, 3.5, 9.5, 37),  # 36 in 6 s: 6 tok/s, misses
           rec("standard", 0.0, None, 0.1, 0, status=429, reason="x-agent-tier: tier 'interactive' is below its target"),
           rec("batch", 0.0, 1.0, 10.0, 10)]
    row = summarize("tier_aware", 4, res, 10.0, {"budget_per_request": 2.5}, TIERS)
    assert row["total_tps"] == 8.8 and row["budget_per_request"] == 2.5
    assert row["e2e_mean"] == pytest.approx((5.0 + 9.0 + 10.0) / 3) and row["ttft_p95"] == 3.0 and row["refused"] == 1
    assert row["tiers"]["interactive"] == {"sent": 2, "completed": 2, "refused": 0, "attainment": 0.5, "user_tps": 8.0,
                                           "e2e_mean": 7.0, "e2e_p95": 9.0, "ttft_mean": 2.0, "ttft_p95": 3.0,
                                           "stall_share": None, "stall_share_met": None, "stall_share_missed": None,
                                           "done_at": 9.5}  # waits of 1 s and 3 s
    assert row["tiers"]["standard"]["refused"] == 1 and row["tiers"]["standard"]["attainment"] is None
    assert row["tiers"]["batch"]["attainment"] is None and row["tiers"]["batch"]["user_tps"] == 1.0
    assert row["requests"][2]["status"] == 429 and row["requests"][0]["user_tps"] == 10.0


def test_table_shows_the_headline_each_tiers_tail_and_why_requests_were_refused(capsys) -> None:
    from agentserve.bench import metrics

    res = [rec("interactive", 0.0, 1.0, 5.0, 40),
           rec("batch", 1.0, None, 61.0, 0, status=503, reason="x-agent-tier: queued 60 s without capacity"),
           rec("batch", 61.0, 62.0, 91.0, 20)]
    rows = [summarize("tier_aware", 2, res, 91.0, {}, TIERS), summarize("plain", 2, res[:1], 91.0, {}, TIERS)]
    metrics.add_ratios(rows, ("concurrency",))
    print_table(rows, TIERS, "test machine")
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if "e2e s" in line)
    assert head.split()[:5] == ["concurrency", "system", "e2e", "s", "p95"]  # the headline comes first
    line = next(line for line in out.splitlines() if line.split()[:2] == ["2", "tier_aware"])
    assert line.split()[2:4] == ["17.50", "30.00"]  # e2e mean and p95 over the completed requests
    assert line.split()[4] == "3.50"  # ÷ plain's 5 s
    tail = next(line for line in out.splitlines() if line.startswith("   2 tier_aware") and "of 91" in line)
    assert "interactive      5" in tail and "batch     91" in tail
    assert "batch 503 after 60 s: x-agent-tier: queued 60 s without capacity" in out


def test_spec_delta_conditional_acceptance() -> None:
    def key(name: str, **labels: str) -> tuple:
        return (name, tuple(sorted(labels.items())))

    before = {key("agentserve:spec_reached_drafts_total", position="1"): 10.0}
    after = {key("agentserve:spec_reached_drafts_total", position="1"): 30.0,
             key("agentserve:spec_accepted_drafts_total", position="1"): 15.0,
             key("agentserve:spec_reached_drafts_total", position="2"): 12.0,
             key("agentserve:spec_accepted_drafts_total", position="2"): 6.0,
             key("agentserve:verify_budget_tokens_count"): 10.0, key("agentserve:verify_budget_tokens_sum"): 40.0,
             key("agentserve:spec_batch_size_sum"): 20.0}
    d = spec_delta(before, after)
    assert d["positions"] == {1: {"reached": 20.0, "accepted": 15.0}, 2: {"reached": 12.0, "accepted": 6.0}}
    assert d["budget_per_step"] == 4.0 and d["budget_per_request"] == 2.0 and d["batch_per_step"] == 2.0


def test_prefill_stalls_from_the_step_trace(tmp_path: Path) -> None:
    # Steps of a real trace's shape: "a" waits through two prefills (0.5 s and 0.25 s), "b"
    # is prefilled in the first gap (not waiting: its own prefill is its time to first token)
    # and waits through the second.
    import json

    trace = tmp_path / "t.jsonl"
    steps = [{"rids": ["a"], "waited": [False], "prefill_s": 0.0},
             {"rids": ["a", "b"], "waited": [True, False], "prefill_s": 0.5},
             {"rids": ["a", "b"], "waited": [True, True], "prefill_s": 0.0},
             {"rids": ["a", "b"], "waited": [True, True], "prefill_s": 0.25}]
    trace.write_text("\n".join(json.dumps(s) for s in steps) + "\n{partial")
    res = [rec("interactive", 0.0, 1.0, 4.0, 30, rid="a"),  # 29 tokens in 3 s: 9.7 tok/s, meets 8
           rec("interactive", 0.0, 1.0, 2.0, 5, rid="b"),  # 4 in 1 s: misses
           rec("batch", 0.0, 1.0, 2.0, 30, rid="c")]
    add_stalls(res, read_trace(trace))
    assert [r.extra["stall_s"] for r in res] == [0.75, 0.25, 0.0]
    assert res[0].extra["stall_share"] == 0.25 and res[1].extra["stall_share"] == 0.25
    row = summarize("tier_aware", 2, res, 10.0, {}, TIERS)
    assert row["tiers"]["interactive"]["stall_share_met"] == 0.25 and row["tiers"]["interactive"]["stall_share_missed"] == 0.25
    assert read_trace(tmp_path / "none.jsonl") == []


def test_mixed_suffix_adds_sglang_mixed_chunk() -> None:
    base = load_profile(REPO / "profiles" / "cpu-dspark.yaml")
    prof = tier_profile(base, "tier_aware+mixed", TIERS)
    assert prof.server.extra_args[-1] == "--enable-mixed-chunk" and prof.admission_control
    assert "--enable-mixed-chunk" in build_plan(prof).argv
    assert "--enable-mixed-chunk" not in build_plan(tier_profile(base, "tier_aware", TIERS)).argv


def test_field_suffix_sets_a_profile_field_with_validation() -> None:
    base = load_profile(REPO / "profiles" / "cpu-dspark.yaml")
    prof = tier_profile(base, "tier_aware@admission_margin=0@admission_predict=false", TIERS)
    assert prof.admission_margin == 0.0 and prof.admission_predict is False and prof.drafter.scheduler == "tier_aware"
    assert tier_profile(base, "tier_aware", TIERS).admission_margin == base.admission_margin
    with pytest.raises(Exception, match="admission_margin"):
        tier_profile(base, "tier_aware@admission_margin=abc", TIERS)
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        tier_profile(base, "tier_aware@admission_margin", TIERS)
    nested = tier_profile(base, "tier_aware@server.chunked_prefill_size=256@server.prefill_decode_interval=2", TIERS)
    assert nested.server.chunked_prefill_size == 256 and nested.server.prefill_decode_interval == 2
    assert nested.server.port == base.server.port and nested.drafter.scheduler == "tier_aware"  # the rest kept
    plan = build_plan(nested).argv
    assert plan[plan.index("--chunked-prefill-size") + 1] == "256"
    assert plan[plan.index("--prefill-decode-interval") + 1] == "2"
    with pytest.raises(Exception, match="chunked_prefill_size"):
        tier_profile(base, "tier_aware@server.chunked_prefill_size=-1", TIERS)
    with pytest.raises(ValueError, match="'admission_margin' is not a profile section"):
        tier_profile(base, "tier_aware@admission_margin.x=1", TIERS)


def test_steady_window_leaves_out_warmup_and_drain() -> None:
    res = [rec("interactive", 0.0, 1.0, 6.0, 11),  # finished in the warm-up
           rec("interactive", 6.0, 7.0, 12.0, 11),  # 2 tok/s: misses 8
           rec("interactive", 12.0, 13.0, 18.0, 11)]  # finished in the drain
    row = summarize("plain", 1, res, 18.0, {}, TIERS, window=(7.0, 15.0))
    assert row["span_tps"] == 33 / 18.0
    # none of the first, all 11 of the second, 1 + 10*(2/5) of the third, over 8 s
    assert row["total_tps"] == pytest.approx((11.0 + 5.0) / 8.0)
    v = row["tiers"]["interactive"]
    assert v["completed"] == 1 and v["attainment"] == 0.0 and v["user_tps"] == 2.0
    assert row["e2e_mean"] == 6.0 and row["n"] == 1  # latencies of the requests finished inside
    assert len(row["requests"]) == 3  # all kept for the json


def test_a_client_out_of_prompts_before_the_window_ends_is_named() -> None:
    from agentserve.bench.tiers import out_of_prompts

    res = [rec("x", 0.0, 1.0, 5.0, 2, client=0), rec("x", 5.0, 6.0, 9.0, 2, client=0), rec("x", 0.0, 1.0, 8.0, 2, client=1),
           rec("x", 8.0, 9.0, 14.0, 2, client=1)]
    assert out_of_prompts(res, 2, 2, (2.0, 10.0)) == [0]
    assert out_of_prompts(res, 2, 3, (2.0, 10.0)) == []
    assert out_of_prompts(res, 2, 2, None) == []


def test_table_names_the_steady_window(capsys) -> None:
    res = [rec("interactive", 4.0, 5.0, 10.0, 46)]  # 45 tokens in 5 s after the first: 9 tok/s
    print_table([summarize("plain", 1, res, 12.0, {}, TIERS, window=(2.0, 12.0))], TIERS, "test machine")
    out = capsys.readouterr().out
    assert "tokens generated in [2, 12] s" in out
    head = next(l for l in out.splitlines() if l.split()[:2] == ["1", "plain"])
    assert head.split()[1:4] == ["plain", "6.00", "6.00"] and head.split()[8] == "4.60"  # e2e, p95; 46 tokens / 10 s
    assert head.rstrip().endswith("3.83")  # level: 46 tokens over the whole 12 s
    line = next(l for l in out.splitlines() if l.startswith("   1 plain"))
    assert "| " + " " * 11 + " 100%   9.0    1   0 |" in line + " |"  # attainment, tok/s, done, refused
    assert "not steady" not in out
    row = summarize("plain", 1, res, 12.0, {}, TIERS, window=(2.0, 12.0))
    row["ran_out"] = [0]
    print_table([row], TIERS, "test machine")
    assert "not steady: c=1 plain: clients [0] sent all their requests" in capsys.readouterr().out
