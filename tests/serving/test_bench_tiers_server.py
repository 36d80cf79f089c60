"""The tier bench's steady-load loop against a real server: clients stop sending at the
deadline, and the window counts only what was generated inside it."""

from __future__ import annotations

import time

import pytest

from agentserve.bench import metrics
from agentserve.bench.client import send
from agentserve.bench.metrics import window_tokens
from agentserve.bench.tiers import out_of_prompts, run_level, summarize
from agentserve.profile import Tier

pytestmark = pytest.mark.server


def test_steady_load_stops_sending_at_the_deadline(plain_server) -> None:
    prompts = [[100 + k, 2000 + 7 * k, 3000 + k, 400, 500 + k] for k in range(60)]  # distinct: no cache hits
    # the deadline must allow a few requests per client at this machine's current speed (a
    # shared, loaded CPU can take seconds per 4-token request): 5 back to back at twice a lone
    # request's time (two clients share the CPU), and at least 4 s
    probe = send(plain_server.url, [99, 1999, 2999, 401, 499], 4)
    duration = max(4.0, 5 * metrics.e2e_s(probe) * 2)
    w0 = duration / 5
    res, wall = run_level(plain_server.url, 2, ["standard"], prompts, 30, 4, tag=f"steady{time.time_ns()}-",
                          duration=duration)
    assert all(r.ok for r in res)
    assert all(r.t_send < duration for r in res)  # none sent after the deadline (times are seconds into the level)
    # the streaming client saw each request's first token between sending it and its end
    assert all(r.t_send < r.t_first <= r.t_end and r.tokens >= 1 for r in res)
    per_client = [sum(1 for r in res if r.labels["client"] == k) for k in range(2)]
    # closed loop: the clients went on sending until the deadline ended it, not the cap (one
    # slow first prefill may leave a client at one request: the sum says the loop ran)
    assert min(per_client) >= 1 and sum(per_client) >= 3 and max(per_client) < 30, per_client
    assert out_of_prompts(res, 2, 30, (w0, duration)) == []
    assert max(r.t_end for r in res) > duration  # the last ones drained after it
    tokens = sum(r.tokens for r in res)
    inside = window_tokens(res, w0, duration)
    assert 0 < inside < tokens  # the warm-up and the drain are left out
    row = summarize("plain", 2, res, wall, {}, [Tier(name="standard", target_tokens_per_s=5.0, priority=0)],
                    window=(w0, duration))
    assert row["total_tps"] == pytest.approx(inside / (duration - w0))
    assert row["tiers"]["standard"]["completed"] == sum(1 for r in res if w0 < r.t_end <= duration)
    assert row["e2e_mean"] is not None and row["ttft_mean"] is not None
