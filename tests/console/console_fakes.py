"""A tiny stdlib HTTP server standing in for agentserve: /metrics and /agentserve/v1/agents
from mutable fields, so tests can change what the console sees, stop it and restart it on the
same port."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from console.metrics import AGENTS_PATH


def crafted_metrics(step: int = 1) -> str:
    """SGLang + agentserve metrics as a speculative server under load would export them; the
    counters grow with ``step`` so that windows between polls have deltas."""
    n = max(1, step)
    lab = 'model_name="m",tp_rank="0"'
    lines = [
        "# HELP sglang:num_running_reqs The number of running requests.",
        "# TYPE sglang:num_running_reqs gauge",
        f"sglang:num_running_reqs{{{lab}}} 5.0",
        "# TYPE sglang:num_queue_reqs gauge",
        f"sglang:num_queue_reqs{{{lab}}} 2.0",
        "# TYPE sglang:token_usage gauge",
        f"sglang:token_usage{{{lab}}} 0.42",
        "# TYPE sglang:spec_accept_length gauge",
        f"sglang:spec_accept_length{{{lab}}} {2.0 + 0.1 * (n % 7)}",
        "# TYPE sglang:spec_accept_rate gauge",
        f"sglang:spec_accept_rate{{{lab}}} 0.55",
        "# TYPE sglang:generation_tokens_total counter",
        f"sglang:generation_tokens_total{{{lab}}} {100.0 * n}",
        "# TYPE agentserve:tier_prefill_stall_seconds_total counter",
        f'agentserve:tier_prefill_stall_seconds_total{{tier="interactive"}} {0.25 * n}',
        "# TYPE agentserve:tier_prefill_held_requests gauge",
        'agentserve:tier_prefill_held_requests{tier="batch"} 3.0',
        'agentserve:tier_prefill_held_requests{tier="interactive"} 0.0',
        "# TYPE sglang:num_requests_total counter",
        f"sglang:num_requests_total{{{lab}}} {3.0 * n}",
        "# TYPE sglang:time_to_first_token_seconds histogram",
        f'sglang:time_to_first_token_seconds_bucket{{{lab},le="0.1"}} {1.0 * n}',
        f'sglang:time_to_first_token_seconds_bucket{{{lab},le="0.5"}} {3.0 * n}',
        f'sglang:time_to_first_token_seconds_bucket{{{lab},le="+Inf"}} {3.0 * n}',
        f"sglang:time_to_first_token_seconds_sum{{{lab}}} {0.6 * n}",
        f"sglang:time_to_first_token_seconds_count{{{lab}}} {3.0 * n}",
        "# TYPE agentserve:verify_budget_tokens histogram",
        f'agentserve:verify_budget_tokens_bucket{{le="8.0"}} {2.0 * n}',
        f'agentserve:verify_budget_tokens_bucket{{le="16.0"}} {4.0 * n}',
        f'agentserve:verify_budget_tokens_bucket{{le="+Inf"}} {4.0 * n}',
        f"agentserve:verify_budget_tokens_sum {40.0 * n}",
        f"agentserve:verify_budget_tokens_count {4.0 * n}",
        "# TYPE agentserve:verify_width histogram",
        f'agentserve:verify_width_bucket{{le="4.0"}} {4.0 * n}',
        f'agentserve:verify_width_bucket{{le="+Inf"}} {4.0 * n}',
        f"agentserve:verify_width_sum {14.0 * n}",
        f"agentserve:verify_width_count {4.0 * n}",
        "# TYPE agentserve:spec_batch_size histogram",
        f'agentserve:spec_batch_size_bucket{{le="5.0"}} {4.0 * n}',
        f'agentserve:spec_batch_size_bucket{{le="+Inf"}} {4.0 * n}',
        f"agentserve:spec_batch_size_sum {16.0 * n + n // 2}",
        f"agentserve:spec_batch_size_count {4.0 * n}",
        "# TYPE agentserve:spec_step_seconds histogram",
    ]
    for phase, mean in (("draft", 0.002), ("schedule", 0.0005), ("verify", 0.03)):
        lines += [
            f'agentserve:spec_step_seconds_bucket{{phase="{phase}",le="+Inf"}} {4.0 * n}',
            f'agentserve:spec_step_seconds_sum{{phase="{phase}"}} {mean * 4 * n}',
            f'agentserve:spec_step_seconds_count{{phase="{phase}"}} {4.0 * n}',
        ]
    lines += ["# TYPE agentserve:spec_verified_drafts_total counter",
              "# TYPE agentserve:spec_accepted_drafts_total counter"]
    for pos, frac in ((1, 0.9), (2, 0.7), (3, 0.5), (4, 0.25)):
        lines.append(f'agentserve:spec_verified_drafts_total{{position="{pos}"}} {100.0 * n}')
        lines.append(f'agentserve:spec_accepted_drafts_total{{position="{pos}"}} {100.0 * frac * n}')
    lines += ["# TYPE agentserve:drafter_fallback_total counter",
              'agentserve:drafter_fallback_total{reason="no_drafter"} 1.0']
    return "\n".join(lines) + "\n"


def crafted_agents() -> dict[str, Any]:
    def agent(aid, tier, reqs, run, ttft, itl, tps, tau, copy):
        return {"agent_id": aid, "tier": tier, "requests": reqs, "running": run,
                "ttft_p50_s": ttft, "ttft_p95_s": ttft * 3, "itl_p50_s": itl, "itl_p95_s": itl * 2,
                "tokens_per_s": tps, "accept_length": tau, "copy_share": copy,
                "source_share": {} if copy is None else {"session": copy / 2, "shared": copy / 2, "radix": 0.0,
                                                         "model": 1 - copy}}
    return {
        "agents": [
            agent("planner", "interactive", 12, 2, 0.120, 0.020, 48.5, 2.6, 0.31),
            agent("coder", "interactive", 30, 3, 0.300, 0.015, 75.0, 3.4, 0.62),
            agent("summarizer", "batch", 5, 0, 1.500, 0.040, 12.0, None, None),
        ],
        "tiers": [
            {"name": "interactive", "target_tokens_per_s": 40.0, "attainment": 0.93,
             "admitted": 42, "queued": 1, "refused": 0},
            {"name": "batch", "target_tokens_per_s": None, "attainment": None,
             "admitted": 5, "queued": 1, "refused": 2},
        ],
    }


class FakeServer:
    def __init__(self, port: int = 0):
        self.port = port
        self.step = 0
        self.metrics_text: str | None = None      # None: crafted_metrics(step), step += 1 per GET
        self.agents: Any = crafted_agents()        # None: 404
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: str, ctype: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    if fake.metrics_text is None:
                        fake.step += 1
                        body = crafted_metrics(fake.step)
                    else:
                        body = fake.metrics_text
                    self._send(200, body, "text/plain; version=0.0.4")
                elif self.path == AGENTS_PATH and fake.agents is not None:
                    body = fake.agents if isinstance(fake.agents, str) else json.dumps(fake.agents)
                    self._send(200, body, "application/json")
                else:
                    self._send(404, '{"detail": "Not Found"}', "application/json")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
