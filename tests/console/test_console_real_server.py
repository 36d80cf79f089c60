"""The console against a real SGLang server (the bundled model) under a little load."""

from __future__ import annotations

import threading

import pytest
import requests
from conftest import wait_for, widget_text

from console.app import ConsoleApp
from console.metrics import AGENTS_PATH

pytestmark = pytest.mark.server
N_REQUESTS = 4


def _chat(url: str, i: int, stream: bool, results: list) -> None:
    body = {"model": "default", "max_tokens": 12, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": f"Say hello to agent number {i}."}]}
    try:
        r = requests.post(url + "/v1/chat/completions", json=body, timeout=600, stream=stream,
                          headers={"x-agent-id": f"console-test-{i % 2}"})
        if stream:
            for _ in r.iter_lines():
                pass
        results.append(r.status_code)
    except requests.RequestException as e:
        results.append(repr(e))


@pytest.mark.asyncio
async def test_console_follows_real_server_under_load(plain_server):
    url = plain_server.url
    app = ConsoleApp(url, interval=0.5, timeout=5.0)
    async with app.run_test(size=(140, 48)) as pilot:
        await wait_for(pilot, lambda: app.last_ok is not None and app.last_ok.has_metrics, timeout=60,
                       what="first metrics from the real server")
        base = app.last_ok
        base_reqs = base.requests_total or 0.0
        base_tokens = base.generation_tokens or 0.0
        results: list = []
        threads = [threading.Thread(target=_chat, args=(url, i, i % 2 == 0, results), daemon=True)
                   for i in range(N_REQUESTS)]
        for t in threads:
            t.start()
        await wait_for(pilot, lambda: (app.last_ok.requests_total or 0.0) >= base_reqs + N_REQUESTS, timeout=600, what=f"{N_REQUESTS} more finished requests in the metrics")
        for t in threads:
            t.join(timeout=60)
        assert results == [200] * N_REQUESTS

        snap = app.last_ok
        assert snap.connected and snap.malformed_lines == 0
        assert snap.generation_tokens > base_tokens
        assert snap.ttft is not None and snap.ttft.count >= N_REQUESTS
        load = widget_text(app, "#load-text")
        assert f"requests done {int(snap.requests_total)}" in load
        assert f"tokens generated {int(snap.generation_tokens)}" in load
        assert "TTFT p50/p95 n/a" not in load          # latency percentiles from the real histogram
        assert "connected to" in widget_text(app, "#status")
        # the plain server does not speculate: tau and per-position acceptance are n/a, not 0
        assert "τ (accept length) n/a" in widget_text(app, "#tau-label")
        assert "per-position acceptance: n/a" in widget_text(app, "#positions")
        if requests.get(url + AGENTS_PATH, timeout=10).status_code == 404:
            assert "n/a" in widget_text(app, "#tiers-text")
            assert "per-agent data n/a" in widget_text(app, "#agents-note")
        else:  # the per-agent endpoint is served: our two agents are in the table
            await wait_for(pilot, lambda: {"console-test-0", "console-test-1"} <= set(app.row_order),
                           timeout=30, what="the test's agents in the agent table")
            table = app.main_widget("#agents")
            assert table.row_count >= 2
            await pilot.press("s", "r")                   # sorting a live table
            assert {"console-test-0", "console-test-1"} <= set(app.row_order)
        assert app.is_running
