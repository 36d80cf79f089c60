"""The one definition of each metric, on hand-built request records."""

from __future__ import annotations

import pytest

from agentserve.bench import metrics
from agentserve.bench.client import RequestRecord


def rec(system: str, send: float, first: float | None, end: float, tokens: int, *, status: int = 200,
        verify: int | None = None, **labels: object) -> RequestRecord:
    return RequestRecord(send, first, end, tokens, status=status, verify_ct=verify, labels={"system": system, **labels})


def test_per_request_definitions() -> None:
    r = rec("plain", 10.0, 10.5, 12.5, 21)
    assert metrics.e2e_s(r) == 2.5
    assert metrics.ttft_s(r) == 0.5
    assert metrics.decode_tps(r) == 20 / 2.0  # (tokens - 1) / (end - first)
    assert metrics.decode_tps(rec("plain", 0.0, 1.0, 1.0, 1)) is None  # one token: no decode span
    assert metrics.ttft_s(rec("plain", 0.0, None, 0.1, 0, status=429)) is None


def test_percentile_is_nearest_rank() -> None:
    assert metrics.percentile([1.0, 3.0], 0.95) == 3.0
    assert metrics.percentile(range(1, 21), 0.95) == 19  # round(0.95 * 19) = 18 -> the 19th value
    assert metrics.percentile([], 0.95) is None


def test_summary_of_a_level() -> None:
    # three requests sent at 0, 0 and 1 s; the level's makespan is 0 .. 5 s
    rs = [rec("plain", 0.0, 1.0, 3.0, 11, verify=5), rec("plain", 0.0, 2.0, 5.0, 31, verify=10),
          rec("plain", 1.0, 1.5, 2.0, 6), rec("plain", 1.0, None, 1.2, 0, status=503)]
    s = metrics.summary(rs)
    assert s["e2e_mean"] == pytest.approx((3.0 + 5.0 + 1.0) / 3) and s["e2e_p95"] == 5.0
    assert s["ttft_mean"] == pytest.approx((1.0 + 2.0 + 0.5) / 3) and s["ttft_p95"] == 2.0
    assert s["total_tps"] == pytest.approx(48 / 5.0)  # tokens over the makespan, refused request in the span
    assert s["user_tps"] == pytest.approx((10 / 2.0 + 30 / 3.0 + 5 / 0.5) / 3)
    assert s["tau"] == pytest.approx(42 / 15)  # over the requests with verify steps
    assert s["n"] == 3 and s["refused"] == 1 and s["tokens"] == 48 and s["makespan_s"] == 5.0


def test_window_counts_each_requests_share_inside() -> None:
    a = rec("x", 0.0, 10.0, 20.0, 11)  # first token at 10, 10 more over (10, 20]
    b = rec("x", 0.0, 0.0, 4.0, 5)
    assert metrics.window_tokens([a, b], 10.0, 20.0) == 11.0
    assert metrics.window_tokens([a, b], 15.0, 30.0) == 5.0
    assert metrics.window_tokens([a, b], 0.0, 12.0) == 1.0 + 2.0 + 5.0
    assert metrics.summary([a, b], window=(10.0, 20.0))["total_tps"] == pytest.approx(11.0 / 10.0)


def test_rows_ratios_against_plain_of_the_same_group() -> None:
    rs = [rec("plain", 0, 1, 4, 31, domain="chat", concurrency=1), rec("hybrid", 0, 1, 2, 31, domain="chat", concurrency=1),
          rec("plain", 0, 2, 10, 41, domain="code", concurrency=1), rec("hybrid", 0, 1, 5, 41, domain="code", concurrency=1)]
    rows = metrics.group_rows(rs, ("concurrency", "domain"))
    assert [(r["domain"], r["system"]) for r in rows] == [("chat", "plain"), ("chat", "hybrid"), ("code", "plain"), ("code", "hybrid")]
    chat = rows[1]
    assert chat["e2e_ratio"] == pytest.approx(2.0 / 4.0) and chat["ttft_ratio"] == 1.0
    assert chat["total_ratio"] == pytest.approx((31 / 2) / (31 / 4)) and chat["user_ratio"] == pytest.approx(3.0)
    assert rows[3]["e2e_ratio"] == pytest.approx(0.5) and rows[3]["ttft_ratio"] == pytest.approx(0.5)
    assert rows[0]["e2e_ratio"] == 1.0
    # the JSON's column order: labels, then the headline, then the secondary columns
    assert list(rows[0])[:11] == ["concurrency", "domain", "system", *metrics.HEADLINE]
    assert list(rows[0])[11:11 + len(metrics.SECONDARY)] == list(metrics.SECONDARY)


def test_no_plain_no_ratio_and_the_fastest_base_wins() -> None:
    rows = metrics.group_rows([rec("hybrid", 0, 1, 2, 5, concurrency=1)], ("concurrency",))
    assert rows[0]["e2e_ratio"] is None and rows[0]["total_ratio"] is None
    rs = [rec("plain", 0, 1, 4, 41, concurrency=2), rec("plain+mixed", 0, 1, 2, 41, concurrency=2),
          rec("tier_aware", 0, 1, 2, 82, concurrency=2)]
    rows = metrics.group_rows(rs, ("concurrency",), is_base=lambda s: s.startswith("plain"))
    assert rows[2]["total_ratio"] == pytest.approx(2.0)  # against plain+mixed (20.5 tok/s), not plain (10.25)


def test_a_bracketing_plain_run_is_a_base_and_its_drift_is_reported() -> None:
    # plain at the start (4 s, 31 tokens), the machine slows, plain#2 at the end (8 s): hybrid (2 s)
    # counts against the faster plain; a plain with overrides is a system, not a base
    rs = [rec("plain", 0, 1, 4, 31, concurrency=1), rec("hybrid", 0, 1, 2, 31, concurrency=1),
          rec("plain@server.cpu_attention=native", 0, 1, 1, 31, concurrency=1), rec("plain#2", 0, 1, 8, 31, concurrency=1)]
    assert metrics.is_plain("plain#2") and not metrics.is_plain("plain@server.cpu_attention=native")
    rows = metrics.group_rows(rs, ("concurrency",))
    assert [r["system"] for r in rows] == ["plain", "hybrid", "plain@server.cpu_attention=native", "plain#2"]
    assert rows[1]["e2e_ratio"] == pytest.approx(2.0 / 4.0)  # the start's plain was the faster one
    assert rows[3]["e2e_ratio"] == pytest.approx(2.0)
    (d,) = metrics.drift(rows, ("concurrency",))
    assert d["concurrency"] == 1 and d["e2e_ratio"] == pytest.approx(2.0) and d["total_ratio"] == pytest.approx(0.5)
    assert metrics.drift(rows[:3], ("concurrency",)) == []  # no second plain run, no drift


def test_rounds_pool_processes_not_requests() -> None:
    # two plain processes (4 s and 8 s per request), two hybrid ones (2 s and 2 s): each pooled value
    # is the mean of the processes' values; throughput is per process, never over both makespans
    rs = [rec("plain", 0, 1, 4, 31, concurrency=1), rec("hybrid", 10, 11, 12, 31, concurrency=1),
          rec("plain#2", 20, 21, 28, 31, concurrency=1), rec("hybrid#2", 40, 41, 42, 31, concurrency=1)]
    rows = metrics.group_rows(rs, ("concurrency",))
    pooled = metrics.pool(rows, ("concurrency",))
    assert [(p["system"], p["processes"], p["n"]) for p in pooled] == [("plain", 2, 2), ("hybrid", 2, 2)]
    plain, hybrid = pooled
    assert plain["e2e_mean"] == pytest.approx(6.0) and hybrid["e2e_mean"] == pytest.approx(2.0)
    assert plain["total_tps"] == pytest.approx((31 / 4 + 31 / 8) / 2)  # not 62 tokens over 28 s
    assert hybrid["e2e_ratio"] == pytest.approx(2.0 / 6.0) and plain["e2e_ratio"] == pytest.approx(1.0)
    assert hybrid["total_ratio"] == pytest.approx((31 / 2) / ((31 / 4 + 31 / 8) / 2))


def test_rounds_of_a_system_with_overrides_pool_apart_from_the_plain_system() -> None:
    # expand_rounds tags the second process 'dspark#2@drafter.x=1': it pools with 'dspark@drafter.x=1',
    # not with 'dspark' (which once merged the two systems' second rounds)
    from agentserve.bench.args import expand_rounds

    names = expand_rounds(["plain", "dspark@drafter.x=1", "dspark"], 2)
    assert [metrics.round_of(n) for n in names] == ["plain", "dspark@drafter.x=1", "dspark"] * 2
    rs = [rec(n, 10 * i, 10 * i + 1, 10 * i + 2 + i, 31, concurrency=1) for i, n in enumerate(names)]
    pooled = metrics.pool(metrics.group_rows(rs, ("concurrency",)), ("concurrency",))
    assert sorted((p["system"], p["processes"]) for p in pooled) == [
        ("dspark", 2), ("dspark@drafter.x=1", 2), ("plain", 2)]
