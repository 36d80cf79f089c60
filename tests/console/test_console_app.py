"""The console against a fake agentserve: panels, agent table (sorting, drill-down), help,
404 on the agents endpoint, disconnect/reconnect, malformed metrics."""

from __future__ import annotations

import pytest
from conftest import screen_text, wait_for, widget_text
from console_fakes import FakeServer

from console.app import AgentScreen, ConsoleApp, HelpScreen, main
from console.widgets import StatusBar

SIZE = (140, 48)


def table_agents(app: ConsoleApp) -> list[str]:
    table = app.query_one("#agents")
    return [str(table.get_row_at(i)[0]) for i in range(table.row_count)]


@pytest.mark.asyncio
async def test_panels_table_sorting_drilldown_help(fake_server):
    app = ConsoleApp(fake_server.url, interval=0.2, timeout=5.0, window_s=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.polls >= 5 and app.query_one("#agents").row_count == 3, what="3 agent rows")
        assert app.win.seconds >= 0.5 and app.win.gen_tokens_per_s > 0   # rates over the window
        # panels
        load = widget_text(app, "#load-text")
        assert "running    5" in load and "queued    2" in load and "KV usage" in load and "42%" in load
        assert "verify budget/step 10.0" in load and "mean verify width 3.50" in load
        acc = widget_text(app, "#positions")
        assert "pos  1" in acc and "90.0%" in acc and "25.0%" in acc and "no_drafter=1" in acc
        assert "τ (accept length) 2." in widget_text(app, "#tau-label")
        assert len(app.query_one("#tau-spark").data) >= 3
        tiers = widget_text(app, "#tiers-text")
        assert "interactive" in tiers and "93%" in tiers and "refused 2" in tiers
        # the fake adds 0.25 stalled request-seconds per poll (0.2 s apart): ~1.2 streams stalled
        import re
        m = re.search(r"prefill-stalled (\d+\.\d)", tiers)
        assert m and 0.3 <= float(m.group(1)) <= 5.0, tiers
        assert "prefill-held 3" in tiers and tiers.count("prefill-held") == 1  # batch only
        assert "connected to" in widget_text(app, "#status")
        assert "• " in widget_text(app, "#scatter") or "•" in widget_text(app, "#scatter")

        # default sort: tok/s descending
        assert table_agents(app) == ["coder", "planner", "summarizer"]
        await pilot.press("r")                                   # ascending
        assert table_agents(app) == ["summarizer", "planner", "coder"]
        await pilot.press("s")                                   # next column: τ (ascending; n/a last)
        assert "sorted by τ (ascending)" in widget_text(app, "#agents-note")
        assert table_agents(app) == ["planner", "coder", "summarizer"]
        await pilot.press("S", "S", "S", "S")                    # back to TTFT p95
        assert "sorted by TTFT p95" in widget_text(app, "#agents-note")
        assert table_agents(app) == ["planner", "coder", "summarizer"]
        await pilot.press("r")
        assert table_agents(app) == ["summarizer", "coder", "planner"]
        # the sort survives the next polls
        polls = app.polls
        await wait_for(pilot, lambda: app.polls >= polls + 2, what="two more polls")
        assert table_agents(app) == ["summarizer", "coder", "planner"]
        # clicking a header sorts by it
        await pilot.click("#agents", offset=(3, 0))              # "agent" header
        assert "sorted by agent (descending)" in widget_text(app, "#agents-note")   # direction kept
        assert table_agents(app) == ["summarizer", "planner", "coder"]
        await pilot.click("#agents", offset=(3, 0))              # same header again: reversed
        assert "sorted by agent (ascending)" in widget_text(app, "#agents-note")
        assert table_agents(app) == ["coder", "planner", "summarizer"]

        # drill-down: the cursor row's agent
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, AgentScreen), what="agent screen")
        assert app.screen.agent_id == "planner"
        detail = widget_text(app, "#agent-detail")
        assert "TTFT p50 / p95        120 ms / 360 ms" in detail
        assert "meets tier target     yes" in detail and "tier attainment       93%" in detail
        # copy share 31 %, by source: half this session's index, half the agent's shared index
        assert "accepted by source    session 16% · shared 16% · radix 0% · model 69%" in detail
        # the main panels keep updating underneath, and the agent's tok/s history grows
        done_before = app.last_ok.requests_total
        spark_before = len(app.screen.query_one("#agent-spark").data)
        polls = app.polls
        await wait_for(pilot, lambda: app.polls >= polls + 2, what="polls while drilled down")
        assert len(app.screen.query_one("#agent-spark").data) >= spark_before + 2
        load_text = app.main_widget("#load-text").content.plain
        assert f"requests done {int(app.last_ok.requests_total)}" in load_text
        assert app.last_ok.requests_total > done_before
        await pilot.press("escape")
        assert not isinstance(app.screen, AgentScreen)

        # help
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert "sort the agent table" in widget_text(app, "#help-text")
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)

        # the footer lists the key bindings
        text = screen_text(app)
        for key in ("q quit", "? help", "s sort", "r reverse", "⏎ details"):
            assert key in text, key
        await pilot.press("q")
    assert app.return_code == 0


@pytest.mark.asyncio
async def test_agents_endpoint_404_shows_na(fake_server):
    fake_server.agents = None
    app = ConsoleApp(fake_server.url, interval=0.2, timeout=5.0)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.polls >= 2, what="two polls")
        assert "n/a" in widget_text(app, "#tiers-text") and "404" in widget_text(app, "#tiers-text")
        assert "per-agent data n/a" in widget_text(app, "#agents-note")
        assert app.query_one("#agents").row_count == 0
        await pilot.press("enter", "s", "r")                     # nothing to drill into; no crash
        assert not isinstance(app.screen, AgentScreen)
        assert "running    5" in widget_text(app, "#load-text")  # metrics still shown


@pytest.mark.asyncio
async def test_disconnect_and_reconnect_on_same_port():
    srv = FakeServer().start()
    port = srv.port
    app = ConsoleApp(srv.url, interval=0.2, timeout=5.0)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.snapshot is not None and app.snapshot.connected, what="connected")
            assert app.query_one("#agents").row_count == 3
            srv.stop()
            await wait_for(pilot, lambda: "DISCONNECTED" in widget_text(app, "#status"), what="disconnected")
            assert app.query_one(StatusBar).has_class("down")
            assert app.query_one("#acceptance").has_class("stale")
            assert "running    5" in widget_text(app, "#load-text")   # last values kept
            srv = FakeServer(port=port).start()                       # counters restart from 1
            await wait_for(pilot, lambda: "connected to" in widget_text(app, "#status"), what="reconnected")
            assert not app.query_one(StatusBar).has_class("down")
            assert not app.query_one("#acceptance").has_class("stale")
            polls = app.polls
            await wait_for(pilot, lambda: app.polls >= polls + 2, what="polls after reconnect")
            assert app.query_one("#agents").row_count == 3
            assert "verify budget/step 10.0" in widget_text(app, "#load-text")
    finally:
        srv.stop()


@pytest.mark.asyncio
async def test_malformed_metrics_do_not_crash(fake_server):
    fake_server.metrics_text = ("sglang:num_running_reqs 7\n"
                                "sglang:num_queue_reqs{{{ broken\n"
                                "agentserve:verify_budget_tokens_count 3\n"
                                "agentserve:spec_verified_drafts_total{position=\"x\"} 5\n"
                                "agentserve:spec_accepted_drafts_total{position=\"1\"} 9\n")
    fake_server.agents = '{"agents": [{"agent_id": 1, "tokens_per_s": "fast"}], "tiers": "nope"'  # cut JSON
    app = ConsoleApp(fake_server.url, interval=0.2, timeout=5.0)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.polls >= 2, what="two polls")
        assert "malformed metric lines skipped" in widget_text(app, "#status")
        assert "running    7" in widget_text(app, "#load-text")
        assert "malformed agents JSON" in widget_text(app, "#tiers-text")
        # valid JSON with wrong types, then garbage of every kind
        fake_server.agents = {"agents": [{"agent_id": 1, "tokens_per_s": "fast", "tier": 3}], "tiers": "nope"}
        await wait_for(pilot, lambda: app.query_one("#agents").row_count == 1, what="one tolerant agent row")
        assert table_agents(app) == ["1"]
        for garbage in ("sglang:num_running_reqs 1 2 3 4\n# TYPE x histogram\nx_bucket{le=\"a\"} 1\n",
                        "", "\x00\x01\x02", "sglang:num_running_reqs NaN\n", "<html>502</html>"):
            fake_server.metrics_text = garbage
            polls = app.polls
            await wait_for(pilot, lambda: app.polls >= polls + 2, what=f"polls of {garbage!r}")
            assert app.is_running
        assert "running  n/a" in widget_text(app, "#load-text")
        assert "no sglang metrics exported" in widget_text(app, "#status")
        await pilot.press("s", "enter", "question_mark", "escape")
        assert app.is_running


def test_main_rejects_bad_interval(capsys):
    assert main(["--interval", "0"]) == 2
    assert main(["--window", "-1"]) == 2
    assert "--interval and --window must be > 0" in capsys.readouterr().out


def test_main_screenshot_headless(fake_server, tmp_path):
    out = tmp_path / "shot.svg"
    assert main(["--url", fake_server.url, "--interval", "0.2", "--screenshot", str(out), "--after", "1.5", "--timeout", "5",
                 "--size", "120x40"]) == 0
    svg = out.read_text()
    assert svg.startswith("<svg") and "coder" in svg and "interactive" in svg
