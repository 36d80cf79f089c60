"""`agentserve soak` against the plain test server: every request is accounted for with a
status, none fails, nothing 5xx, and the server is back to its baseline after the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentserve.soak import MAX_OUTCOMES, main

pytestmark = pytest.mark.server
REPO = Path(__file__).resolve().parents[2]


def test_short_soak_accounts_for_every_request(plain_server, tmp_path: Path) -> None:
    rc = main(["--profile", str(REPO / "tests" / "profiles" / "plain-fp32.yaml"), "--url", plain_server.url,
               "--agents", "8", "--seconds", "30", "--max-tokens", "16", "--sample-s", "2", "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "soak.json").read_text())
    t = rep["totals"]
    assert rc == 0, rep["failures"]
    assert t["sent"] == sum(t[k] for k in MAX_OUTCOMES) == len(rep["requests"])
    assert t["failed"] == 0 and t["status_5xx"] == 0 and t["no_status"] == 0, rep["failures"]
    assert all(r["status"] is not None for r in rep["requests"])
    assert t["answered"] > 0
    # the faults the agents mix in were all sent and met the answer they must get
    kinds = rep["by_kind"]
    m = kinds["malformed"]  # refused by the middleware before admission: always a 4xx
    assert m["rejected"] >= 1 and sum(m.values()) == m["rejected"], m
    o = kinds["oversized"]  # well-formed, so it may meet the tier gate first: a 503 + Retry-After under load
    assert o["rejected"] >= 1 and sum(o.values()) == o["rejected"] + o["refused"], o
    assert kinds["cancel"]["cancelled"] + kinds["cancel"]["answered"] + kinds["cancel"]["refused"] >= 1
    assert kinds["session_open"]["answered"] >= 8 and kinds["session_close"]["answered"] >= 1
    # every tier of the profile got traffic and a latency where something was answered
    assert set(rep["by_tier"]) == {"standard", "solo", "single-file"}
    for tier, s in rep["by_tier"].items():
        assert s["sent"] >= 1, tier
        if s["answered"]:
            assert 0 < s["latency_p50_s"] <= s["latency_p95_s"]
    # sampled over time: memory of the server tree, KV usage, open sessions
    samples = rep["samples"]
    assert len(samples) >= 5 and all(x["rss_bytes"] and x["rss_bytes"] > 50 * 2**20 for x in samples)
    assert all("token_usage" in x and x["open_sessions"] is not None for x in samples)
    assert max(x["open_sessions"] for x in samples) > rep["baseline"]["open_sessions"]
    # afterwards: every session closed, nothing running
    assert rep["final"]["open_sessions"] == rep["baseline"]["open_sessions"]
    assert rep["final"]["num_running_reqs"] == 0
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
