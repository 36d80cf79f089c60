"""Closed-loop agent replay (bench/agents.py): one turn in flight per agent, turns in order
with the history growing, think time, the agent count, and the per-run numbers."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from agentserve.bench.agents import accepted_by_source, replay_agents, run_row
from agentserve.bench.client import RequestRecord


@dataclass
class _Trace:
    id: str


class _Conv:
    """A conversation whose turn k prompt is k+1 blocks long (each turn extends the last)."""

    def __init__(self, i: int, turns: int) -> None:
        self.trace, self.turns = _Trace(f"t{i}"), turns

    def prompt(self, k: int, answers: list[str]) -> list[int]:
        return [int(self.trace.id[1:])] * (k + 1)


class _Recorder:
    """Stands in for the HTTP send: records who sent what and when; takes `work_s` per turn."""

    def __init__(self, work_s: float) -> None:
        self.work_s, self.lock = work_s, threading.Lock()
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.max_total = 0
        self.calls: list[tuple[str, str, int, int, float]] = []

    def __call__(self, url: str, ids: list[int], max_new: int, headers: dict[str, str], labels: dict[str, Any]) -> RequestRecord:
        aid = headers["x-agent-id"]
        t0 = time.perf_counter()
        with self.lock:
            self.in_flight[aid] = self.in_flight.get(aid, 0) + 1
            self.max_in_flight[aid] = max(self.max_in_flight.get(aid, 0), self.in_flight[aid])
            self.max_total = max(self.max_total, sum(self.in_flight.values()))
            self.calls.append((aid, labels["trace"], labels["turn"], len(ids), t0))
        time.sleep(self.work_s)
        with self.lock:
            self.in_flight[aid] -= 1
        t1 = time.perf_counter()
        return RequestRecord(t0, t0 + self.work_s / 4, t1, max_new, verify_ct=max_new // 2, labels=dict(labels))


@pytest.mark.parametrize("agents", [1, 3])
def test_closed_loop_keeps_one_turn_per_agent_in_order(agents: int) -> None:
    convs = [_Conv(i, turns=3) for i in range(5)]
    rec = _Recorder(0.02)
    out, wall = replay_agents("http://unused", convs, agents, 8, think_s=0.03, sender=rec, sessions=False)  # type: ignore[arg-type]
    assert len(out) == 15 and rec.max_total == agents and set(rec.max_in_flight.values()) == {1}
    assert len(rec.max_in_flight) == agents
    for i in range(5):  # each conversation: turns 0,1,2 by one agent, prompts growing, think time between
        mine = [c for c in rec.calls if c[1] == f"t{i}"]
        assert [c[2] for c in mine] == [0, 1, 2] and [c[3] for c in mine] == [1, 2, 3]
        assert len({c[0] for c in mine}) == 1 and mine[0][0] == f"agent-{i % agents}"
        assert all(b[4] - a[4] >= 0.02 + 0.03 - 1e-3 for a, b in zip(mine, mine[1:]))
    # with A agents the run takes about ceil(5/A) conversations x 3 turns, not 15 turns
    assert wall < (-(-5 // agents)) * 3 * 0.05 + 0.5


def test_run_numbers_and_copy_share_by_source() -> None:
    recs = [RequestRecord(0.0, 0.5, 2.0, 16, verify_ct=8, labels={"agent": "a"}),
            RequestRecord(1.0, 1.5, 3.0, 16, verify_ct=4, labels={"agent": "b"})]
    key = lambda src, agent: ("agentserve:agent_spec_accepted_drafts_total", (("agent", agent), ("source", src)))  # noqa: E731
    before = {key("session", "a"): 10.0, key("model", "a"): 5.0}
    after = {key("session", "a"): 16.0, key("shared", "b"): 3.0, key("model", "a"): 8.0, key("radix", "b"): 0.0}
    by = accepted_by_source(before, after)
    assert by == {"session": 6.0, "shared": 3.0, "model": 3.0, "radix": 0.0}
    row = run_row("hybrid", 2, recs, 4.0, by)
    assert row["turns"] == 2 and row["total_tps"] == 8.0 and row["turns_per_min"] == 30.0
    assert row["tau"] == 32 / 12 and row["ttft_mean"] == 0.5
    assert row["copy_share"] == {"session": 0.5, "shared": 0.25, "model": 0.25, "radix": 0.0}


def test_agents_must_be_positive() -> None:
    with pytest.raises(ValueError, match="agents"):
        replay_agents("http://unused", [], 0, 8)


def test_repeat_runs_each_agents_traces_again_in_order() -> None:
    convs = [_Conv(i, turns=2) for i in range(3)]
    rec = _Recorder(0.0)
    out, _ = replay_agents("http://unused", convs, 2, 8, sender=rec, sessions=False, repeat=2)  # type: ignore[arg-type]
    assert len(out) == 12
    mine = [(r.labels["trace"], r.labels["turn"], r.labels["pass"]) for r in out if r.labels["agent"] == "agent-0"]
    assert mine == [("t0", 0, 0), ("t0", 1, 0), ("t2", 0, 0), ("t2", 1, 0),
                    ("t0", 0, 1), ("t0", 1, 1), ("t2", 0, 1), ("t2", 1, 1)]
    row = run_row("hybrid", 2, out, 1.0, {})
    assert [p["pass"] for p in row["passes"]] == [0, 1] and all(p["n"] == 6 for p in row["passes"])


def _rec(system: str, trace: str, turn: int, ids: list[int], stop: int | None = None, p: int = 0) -> RequestRecord:
    return RequestRecord(0.0, 0.1, 1.0, len(ids), labels={"system": system, "agents": 1, "trace": trace, "turn": turn,
                                                        "pass": p}, output_ids=ids, stop_token=stop)


def test_identity_counts_divergences_against_plain_only() -> None:
    from agentserve.bench import identity

    recs = [_rec("plain", "a", 0, [1, 2, 3]), _rec("hybrid", "a", 0, [1, 2, 3]),
            _rec("plain", "a", 1, [1, 2, 3]), _rec("hybrid", "a", 1, [1, 9, 3]),
            # one stopped (stop token 0) where the other went on: a divergence at position 2
            _rec("plain", "b", 0, [5, 6], stop=0), _rec("hybrid", "b", 0, [5, 6, 7]),
            # max_new reached by one only: nothing to compare there
            _rec("plain", "b", 1, [5, 6]), _rec("hybrid", "b", 1, [5, 6, 7]),
            # the other pass of the same turn is its own comparison
            _rec("plain", "a", 0, [4], p=1), _rec("hybrid", "a", 0, [4], p=1),
            _rec("hybrid@drafter.shared_index=off", "a", 0, [1, 2, 4])]
    counts, diffs = identity.compare(recs)
    assert counts == {"hybrid": {"compared": 5, "identical": 3}, "hybrid@drafter.shared_index=off": {"compared": 1, "identical": 0}}
    got = sorted((d.system, d.trace, d.turn, d.position, d.plain_token, d.other_token) for d in diffs)
    assert got == [("hybrid", "a", 1, 1, 2, 9), ("hybrid", "b", 0, 2, 0, 7), ("hybrid@drafter.shared_index=off", "a", 0, 2, 3, 4)]
    diffs[0].pair_gap, diffs[0].flagged = 0.5, True
    rep = identity.report(counts, diffs, 0.25)
    assert rep["systems"]["hybrid"] == {"compared": 5, "identical": 3, "diverged": 2, "scored": 1, "flagged": 1, "max_gap": 0.5}
    assert "hybrid 3/5 turns identical; 2 diverged, 1 scored on plain, 1 above 0.25 nats" in identity.lines(rep)[0]


def test_send_records_the_answer_ids_and_stop_token(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from agentserve.bench import client

    chunks = [{"output_ids": [7], "meta_info": {"completion_tokens": 1}},
              {"output_ids": [7, 8], "meta_info": {"completion_tokens": 2}},
              {"output_ids": [7, 8, 9], "meta_info": {"completion_tokens": 3,
                                                      "finish_reason": {"type": "stop", "matched": 2}}}]

    class _Resp:
        status_code = 200

        def __enter__(self) -> "_Resp":
            return self

        def __exit__(self, *a: object) -> None:
            pass

        def raise_for_status(self) -> None:
            pass

        def iter_lines(self, chunk_size: Any = None) -> Any:
            for c in chunks:
                yield b"data: " + json.dumps(c).encode()
            yield b"data: [DONE]"

    monkeypatch.setattr(client.requests, "post", lambda *a, **k: _Resp())
    r = client.send("http://unused", [1, 2], 8)
    assert r.output_ids == [7, 8, 9] and r.stop_token == 2 and r.tokens == 3
    chunks[:] = [{"output_ids": [7], "meta_info": {"completion_tokens": 1}},  # incremental streaming: deltas
                 {"output_ids": [8, 9], "meta_info": {"completion_tokens": 3, "finish_reason": {"type": "length"}}}]
    r = client.send("http://unused", [1, 2], 8)
    assert r.output_ids == [7, 8, 9] and r.stop_token is None


def test_identity_control_compares_plain_with_itself_across_agent_counts() -> None:
    from agentserve.bench import identity

    def rec(agents: int, turn: int, ids: list[int], system: str = "plain") -> RequestRecord:
        return RequestRecord(0.0, 0.1, 1.0, len(ids), labels={"system": system, "agents": agents, "trace": "a",
                                                            "turn": turn}, output_ids=ids)

    recs = [rec(1, 0, [1, 2]), rec(1, 1, [3, 4]), rec(4, 0, [1, 2]), rec(4, 1, [3, 5]), rec(8, 0, [1, 9]),
            rec(4, 0, [7], system="hybrid")]
    assert identity.control(recs) == {"plain@4 vs plain@1": {"compared": 2, "identical": 1},
                                      "plain@8 vs plain@1": {"compared": 1, "identical": 0}}
    rep = identity.report({}, [], 0.25, identity.control(recs))
    assert identity.lines(rep) == ["control, plain against itself at another batch: plain@4 vs plain@1 1/2 turns identical",
                                   "control, plain against itself at another batch: plain@8 vs plain@1 0/1 turns identical"]
    assert identity.control(recs[:2]) == {}


def test_each_system_is_compared_with_the_plain_run_under_its_own_server_settings() -> None:
    from agentserve.bench import identity

    ex = "@server.deterministic=true"
    recs = [_rec("plain", "a", 0, [1, 2]), _rec("plain" + ex, "a", 0, [1, 3]),
            _rec("hybrid", "a", 0, [1, 2]), _rec("hybrid" + ex, "a", 0, [1, 3]),
            _rec("hybrid@drafter.shared_index=off", "a", 0, [1, 2]), _rec("hybrid@drafter.shared_index=off" + ex, "a", 0, [1, 3])]
    counts, diffs = identity.compare(recs)
    assert not diffs and all(c == {"compared": 1, "identical": 1} for c in counts.values()) and len(counts) == 4
    assert identity.reference("ngram" + ex, ["plain"]) == "plain"  # no plain with its settings: bare plain
    ctl = identity.control(recs + [RequestRecord(0.0, 0.1, 1.0, 2, labels={"system": "plain" + ex, "agents": 4, "trace": "a",
                                                                         "turn": 0, "pass": 0}, output_ids=[1, 3])])
    assert ctl == {f"plain{ex}@4 vs plain{ex}@1": {"compared": 1, "identical": 1}}


def test_two_rounds_give_ratios_drift_and_a_pooled_table() -> None:
    """bench agents --rounds 2: systems run as 'plain', 'hybrid', 'plain#2', 'hybrid#2'; every
    row gets its ratio to the plain of its own round's cell, drift is plain#2 ÷ plain, and the
    pooled row averages the processes (its copy_share dict is not a number to average)."""
    from agentserve.bench.agents import headline
    from agentserve.bench.args import expand_rounds

    assert expand_rounds(["plain", "hybrid"], 2) == ["plain", "hybrid", "plain#2", "hybrid#2"]

    def rec(t0: float, end: float) -> RequestRecord:
        return RequestRecord(t0, t0 + 0.5, end, 16, verify_ct=8, labels={"agent": "a"})

    rows = [run_row("plain", 4, [rec(0, 4.0)], 4.0, {}), run_row("hybrid", 4, [rec(0, 2.0)], 2.0, {"session": 4.0}),
            run_row("plain#2", 4, [rec(0, 8.0)], 8.0, {}), run_row("hybrid#2", 4, [rec(0, 2.0)], 2.0, {"session": 2.0})]
    ratios, drift, pooled = headline(rows, 2)
    by = {r["system"]: r for r in ratios}
    # the faster plain (4 s) is each cell's base, as with bench serve --bracket
    assert by["hybrid"]["e2e_ratio"] == 0.5 and by["hybrid#2"]["total_ratio"] == 2.0
    assert drift == [{"agents": 4, "total_ratio": 0.5, "e2e_ratio": 2.0}]
    pb = {r["system"]: r for r in pooled}
    assert pb["plain"]["processes"] == 2 and pb["plain"]["e2e_mean"] == 6.0 and pb["plain"]["n"] == 2
    assert pb["hybrid"]["e2e_ratio"] == 2.0 / 6.0 and pb["hybrid"]["copy_share"] is None
    assert headline(rows[:2], 1)[1:] == ([], [])
