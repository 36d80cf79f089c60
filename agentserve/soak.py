"""`agentserve soak`: many simulated agents against one server on loopback, bounded in time
and in requests, with an account of every request and the server's memory over time.

Each agent opens a session (the agent API's /agentserve/v1/sessions), runs multi-turn
conversations with tools in the request (tool calls answered with tool results appended),
streamed and not, in every tier of the profile (x-agent-tier), and mixes in faults: streams
cancelled mid-answer, malformed bodies or headers, prompts longer than the context.

Every request ends in one outcome: answered (2xx), rejected (4xx other than 429: expected for
the malformed and oversized ones), refused (429/503 with Retry-After), cancelled (by the agent,
mid-stream) or failed (no status, 5xx, a 503 without Retry-After, or an outcome its kind does
not allow: a malformed request answered 200 fails). Sampled every few seconds: server RSS
(the process tree), SGLang's KV token usage and running/queued requests (/metrics), open
sessions (/agentserve/v1/agents). Writes soak.json and soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

TOOLS = [
    {"type": "function", "function": {"name": "read_file", "description": "Read a file of the repository",
                                      "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                                                     "required": ["path"]}}},
    {"type": "function", "function": {"name": "run_tests", "description": "Run the test suite, optionally one file",
                                      "parameters": {"type": "object", "properties": {"target": {"type": "string"}}}}},
]
TASKS = ["Fix the failing test in tests/test_math.py.", "Add a docstring to utils.parse_args.",
         "Find why the CLI crashes on an empty config file.", "Rename the helper load() to load_config().",
         "List the files that import requests."]
TOOL_RESULT = "def add(a, b):\n    return a - b  # bug\n\ndef test_add():\n    assert add(2, 2) == 4\n"
# one agent's actions cycle through this plan, each agent starting at a different place, so a
# short run with a few agents already has every kind
PLAN = ["chat", "stream", "chat", "cancel", "stream", "malformed", "chat", "stream", "oversized", "chat",
        "stream", "chat", "cancel", "chat", "stream", "chat"]
MUST_BE_4XX = ("malformed", "oversized")
MAX_OUTCOMES = ("answered", "rejected", "refused", "cancelled", "failed")


@dataclass
class Record:
    agent: str
    tier: str
    kind: str
    t0: float
    t1: float = 0.0
    status: int | None = None
    outcome: str = "failed"
    ttft_s: float | None = None
    tokens: int | None = None
    error: str | None = None
    retry_after_s: float | None = None


@dataclass
class Soak:
    url: str
    tiers: list[str]
    agents: int
    seconds: float
    max_requests: int
    max_tokens: int = 48
    context_tokens: int = 8192
    seed: int = 0
    request_timeout_s: float = 300.0
    records: list[Record] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    t_start: float = 0.0

    # ---- one request
    def _finish(self, rec: Record, status: int | None, headers: httpx.Headers | None = None,
                error: str | None = None) -> Record:
        rec.t1, rec.status, rec.error = time.monotonic(), status, error
        if status is None:
            rec.outcome = "failed"
        elif 200 <= status < 300:
            rec.outcome = "answered"
        elif status in (429, 503) and headers is not None and headers.get("retry-after"):
            rec.outcome = "refused"
            try:
                rec.retry_after_s = float(headers["retry-after"])
            except ValueError:
                pass
        elif 400 <= status < 500 and status != 429:
            rec.outcome = "rejected"
        else:
            rec.outcome = "failed"
        if rec.kind in MUST_BE_4XX and rec.outcome == "answered":
            rec.outcome, rec.error = "failed", f"a {rec.kind} request was answered {status}"
        if rec.kind not in MUST_BE_4XX and rec.outcome == "rejected":
            rec.outcome, rec.error = "failed", f"{status}: {error or ''}"[:300]
        self.records.append(rec)
        return rec

    async def _post_chat(self, c: httpx.AsyncClient, rec: Record, headers: dict[str, str], body: dict[str, Any],
                         cancel_after: int | None = None) -> dict[str, Any] | None:
        """Send one chat request; returns the assistant message when answered."""
        try:
            if not body.get("stream"):
                r = await c.post("/v1/chat/completions", json=body, headers=headers)
                if r.status_code != 200:
                    self._finish(rec, r.status_code, r.headers, r.text[:300])
                    return None
                data = r.json()
                rec.tokens = (data.get("usage") or {}).get("completion_tokens")
                self._finish(rec, 200, r.headers)
                return data["choices"][0]["message"]
            async with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    await r.aread()
                    self._finish(rec, r.status_code, r.headers, r.text[:300])
                    return None
                content, calls, n, done = [], {}, 0, False
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(payload)
                    if chunk.get("usage"):
                        rec.tokens = chunk["usage"].get("completion_tokens")
                    for ch in chunk.get("choices") or []:
                        d = ch.get("delta") or {}
                        if d.get("content") or d.get("tool_calls"):
                            if rec.ttft_s is None:
                                rec.ttft_s = time.monotonic() - rec.t0
                            n += 1
                        if d.get("content"):
                            content.append(d["content"])
                        for tc in d.get("tool_calls") or []:
                            slot = calls.setdefault(tc.get("index", 0), {"id": tc.get("id"), "type": "function",
                                                                         "function": {"name": "", "arguments": ""}})
                            fn = tc.get("function") or {}
                            slot["id"] = slot["id"] or tc.get("id")
                            slot["function"]["name"] += fn.get("name") or ""
                            slot["function"]["arguments"] += fn.get("arguments") or ""
                    if cancel_after is not None and n >= cancel_after:
                        rec.outcome = "cancelled"
                        break  # leaving the block closes the connection mid-answer
                if rec.outcome == "cancelled":
                    rec.t1, rec.status = time.monotonic(), 200
                    self.records.append(rec)
                    return None
                if not done:
                    self._finish(rec, None, error="stream ended without [DONE]")
                    return None
                self._finish(rec, 200, r.headers)
                msg: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
                if calls:
                    msg["tool_calls"] = [calls[i] for i in sorted(calls)]
                return msg
        except (httpx.HTTPError, ValueError, KeyError) as e:
            self._finish(rec, None, error=f"{type(e).__name__}: {e}"[:300])
            return None

    async def _bad(self, c: httpx.AsyncClient, rec: Record, headers: dict[str, str], variant: int) -> None:
        try:
            if rec.kind == "oversized":
                words = " ".join(["data"] * (self.context_tokens + 2000))
                r = await c.post("/v1/chat/completions", headers=headers, json={
                    "model": "default", "messages": [{"role": "user", "content": words}], "max_tokens": 8})
            elif variant % 3 == 0:
                r = await c.post("/v1/chat/completions", headers={**headers, "content-type": "application/json"},
                                 content=b'{"model": "default", "messages": [')
            elif variant % 3 == 1:
                r = await c.post("/v1/chat/completions", headers=headers,
                                 json={"model": "default", "messages": "not a list", "max_tokens": 8})
            else:
                r = await c.post("/v1/chat/completions", headers={**headers, "x-agent-tier": "no-such-tier"},
                                 json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
            self._finish(rec, r.status_code, r.headers, r.text[:200])
        except httpx.HTTPError as e:
            self._finish(rec, None, error=f"{type(e).__name__}: {e}"[:300])

    # ---- one agent
    async def agent(self, i: int, c: httpx.AsyncClient) -> None:
        rng = random.Random(self.seed * 1000 + i)
        aid, tier = f"soak-{i:03d}", self.tiers[i % len(self.tiers)]
        base = {"x-agent-id": aid, "x-agent-tier": tier}
        step = i
        deadline = self.t_start + self.seconds
        while time.monotonic() < deadline and len(self.records) < self.max_requests:
            rec = Record(aid, tier, "session_open", time.monotonic())
            sid = None
            try:
                r = await c.post("/agentserve/v1/sessions", json={"agent_id": aid}, headers=base)
                self._finish(rec, r.status_code, r.headers, r.text[:200] if r.status_code != 201 else None)
                sid = r.json()["id"] if r.status_code == 201 else None
            except (httpx.HTTPError, ValueError, KeyError) as e:
                self._finish(rec, None, error=f"{type(e).__name__}: {e}"[:300])
            headers = {**base, **({"x-session-id": sid} if sid else {})}
            messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a coding agent. Use the tools."},
                                              {"role": "user", "content": rng.choice(TASKS)}]
            for _turn in range(rng.randint(2, 4)):
                if time.monotonic() >= deadline or len(self.records) >= self.max_requests:
                    break
                kind = PLAN[step % len(PLAN)]
                step += 1
                rec = Record(aid, tier, kind, time.monotonic())
                if kind in MUST_BE_4XX:
                    await self._bad(c, rec, headers, step)
                    continue
                body = {"model": "default", "messages": messages, "tools": TOOLS, "max_tokens": self.max_tokens,
                        "temperature": 0.7, "seed": rng.randrange(1 << 30), "stream": kind in ("stream", "cancel")}
                if body["stream"]:
                    body["stream_options"] = {"include_usage": True}
                msg = await self._post_chat(c, rec, headers, body, cancel_after=rng.randint(1, 4) if kind == "cancel" else None)
                if rec.outcome == "refused":  # back off as told (at most 5 s: the soak is bounded)
                    await asyncio.sleep(min(5.0, rec.retry_after_s or 1.0) * rng.uniform(0.5, 1.5))
                if msg is None:
                    continue
                messages.append(msg)
                for tc in msg.get("tool_calls") or []:  # the tool's result goes back to the model
                    messages.append({"role": "tool", "tool_call_id": tc.get("id") or "call_0",
                                     "content": TOOL_RESULT})
                if not msg.get("tool_calls"):
                    messages.append({"role": "user", "content": "Good. Now run the tests and tell me the result."})
                await asyncio.sleep(rng.uniform(0.1, 1.0))  # the agent "thinks"
            if sid:
                rec = Record(aid, tier, "session_close", time.monotonic())
                try:
                    r = await c.delete(f"/agentserve/v1/sessions/{sid}", headers=base)
                    self._finish(rec, r.status_code, r.headers, r.text[:200] if r.status_code != 200 else None)
                except httpx.HTTPError as e:
                    self._finish(rec, None, error=f"{type(e).__name__}: {e}"[:300])

    # ---- the server over time
    async def sample(self, c: httpx.AsyncClient, pid: int | None) -> dict[str, Any]:
        s: dict[str, Any] = {"t": time.monotonic() - self.t_start, "rss_bytes": tree_rss(pid) if pid else None}
        try:
            s.update(parse_metrics((await c.get("/metrics", timeout=10)).text))
        except httpx.HTTPError:
            pass
        try:
            s["open_sessions"] = (await c.get("/agentserve/v1/agents", timeout=10)).json()["sessions"]["open"]
        except (httpx.HTTPError, ValueError, KeyError):
            s["open_sessions"] = None
        return s

    async def sampler(self, c: httpx.AsyncClient, pid: int | None, every_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.samples.append(await self.sample(c, pid))
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except asyncio.TimeoutError:
                pass
        self.samples.append(await self.sample(c, pid))

    async def run(self, pid: int | None, sample_s: float = 2.0) -> dict[str, Any]:
        limits = httpx.Limits(max_connections=self.agents + 4, max_keepalive_connections=self.agents + 4)
        timeout = httpx.Timeout(self.request_timeout_s, connect=30)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=timeout) as c, \
                httpx.AsyncClient(base_url=self.url, timeout=30) as side:
            baseline = await self.sample(side, pid)
            self.t_start = time.monotonic()
            stop = asyncio.Event()
            sampler = asyncio.create_task(self.sampler(side, pid, sample_s, stop))
            await asyncio.gather(*(self.agent(i, c) for i in range(self.agents)))
            wall = time.monotonic() - self.t_start
            await asyncio.sleep(1.0)  # let the server's gauges catch up with the last answers
            stop.set()
            await sampler
        return self.report(baseline, wall)

    def report(self, baseline: dict[str, Any], wall_s: float) -> dict[str, Any]:
        recs = self.records
        totals = {k: sum(r.outcome == k for r in recs) for k in MAX_OUTCOMES}
        totals["sent"] = len(recs)
        totals["status_5xx"] = sum(1 for r in recs if r.status is not None and r.status >= 500)
        totals["no_status"] = sum(1 for r in recs if r.status is None)
        by_tier: dict[str, Any] = {}
        for t in self.tiers:
            rs = [r for r in recs if r.tier == t and r.kind in ("chat", "stream")]
            lat = sorted(r.t1 - r.t0 for r in rs if r.outcome == "answered")
            ttft = sorted(r.ttft_s for r in rs if r.outcome == "answered" and r.ttft_s is not None)
            by_tier[t] = {"sent": len(rs), **{k: sum(r.outcome == k for r in rs) for k in MAX_OUTCOMES},
                          "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
                          "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95)}
        by_kind = {k: {o: sum(1 for r in recs if r.kind == k and r.outcome == o) for o in MAX_OUTCOMES}
                   for k in sorted({r.kind for r in recs})}
        statuses: dict[str, int] = {}
        for r in recs:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        rss = [s["rss_bytes"] for s in self.samples if s.get("rss_bytes")]
        return {"config": {"url": self.url, "agents": self.agents, "seconds": self.seconds, "tiers": self.tiers,
                           "max_requests": self.max_requests, "max_tokens": self.max_tokens, "seed": self.seed},
                "wall_s": wall_s, "totals": totals, "by_tier": by_tier, "by_kind": by_kind, "statuses": statuses,
                "failures": [asdict(r) for r in recs if r.outcome == "failed"][:30],
                "baseline": baseline, "final": self.samples[-1] if self.samples else None,
                "rss_bytes": {"first": rss[0] if rss else None, "max": max(rss) if rss else None,
                              "last": rss[-1] if rss else None},
                "draft_index_memory": {k: {"first": xs[0], "max": max(xs), "last": xs[-1]}
                                       for k in INDEX_GAUGES if (xs := [s[k] for s in self.samples if s.get(k) is not None])},
                "samples": self.samples,
                "requests": [{"t0": r.t0 - self.t_start, "t1": r.t1 - self.t_start, "tier": r.tier, "kind": r.kind,
                              "status": r.status, "outcome": r.outcome} for r in recs]}


def pct(xs: list[float], q: float) -> float | None:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def tree_rss(pid: int) -> int | None:
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root] + root.children(recursive=True))
    except psutil.Error:
        return None


_METRIC = re.compile(r"^(sglang:(?:token_usage|num_running_reqs|num_queue_reqs)|agentserve:[a-z_]*index[a-z_]*)(?:\{[^}]*\})?\s+(\S+)$")


INDEX_GAUGES = ("draft_index_session_tokens", "draft_index_shared_tokens", "draft_index_sessions")


def parse_metrics(text: str) -> dict[str, float]:
    """SGLang's KV token usage and running/queued requests (summed over label sets), and any
    agentserve gauge about draft indexes, from Prometheus text."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            key = m.group(1).split(":", 1)[1]
            out[key] = out.get(key, 0.0) + float(m.group(2))
    return out


def server_pid_for(url: str) -> int | None:
    """The process listening on the URL's port (loopback), for RSS sampling."""
    port = httpx.URL(url).port
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except psutil.Error:
        pass
    return None


def check_loopback(url: str) -> None:
    host = httpx.URL(url).host
    if host not in ("localhost", "::1") and not host.startswith("127."):
        raise SystemExit(f"agentserve soak: --url: {url} is not a loopback address (the soak only runs on loopback)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="agentserve soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=str(Path(__file__).resolve().parent.parent / "profiles" / "cpu-demo.yaml"))
    ap.add_argument("--url", default=None, help="a running server on loopback (default: start one from --profile)")
    ap.add_argument("--agents", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=None, help="overrides --minutes")
    ap.add_argument("--max-requests", type=int, default=100_000, help="stop starting requests after this many")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--out", default="soak-out", help="directory for soak.json, soak.png and the server log")
    a = ap.parse_args(argv)
    if a.agents < 1 or a.max_requests < 1:
        ap.error("--agents and --max-requests must be at least 1")
    from agentserve.profile import load_profile

    prof = load_profile(a.profile)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tiers = [t.name for t in prof.interactivity_tiers] or ["default"]
    srv = None
    if a.url:
        check_loopback(a.url)
        url, pid = a.url.rstrip("/"), server_pid_for(a.url)
    else:
        from agentserve.server.procs import ServerProcess

        srv = ServerProcess(prof, log_path=out / "server.log")
        print(f"agentserve soak: starting {prof.name} on {srv.url} (log {out / 'server.log'})", file=sys.stderr)
        srv.start(timeout=900)
        url, pid = srv.url, srv.proc.pid if srv.proc else None
    try:
        soak = Soak(url, tiers, a.agents, a.seconds if a.seconds is not None else a.minutes * 60, a.max_requests,
                    max_tokens=a.max_tokens, context_tokens=prof.model.context_length or 8192, seed=a.seed)
        rep = asyncio.run(soak.run(pid, a.sample_s))
    finally:
        if srv is not None:
            srv.stop()
    rep["profile"] = prof.name
    (out / "soak.json").write_text(json.dumps(rep, indent=1, default=float))
    from agentserve.soak_plot import plot

    plot(rep, out / "soak.png")
    print(summary(rep))
    print(f"agentserve soak: wrote {out / 'soak.json'} and {out / 'soak.png'}")
    t = rep["totals"]
    return 0 if t["failed"] == 0 and t["status_5xx"] == 0 else 1


def summary(rep: dict[str, Any]) -> str:
    t = rep["totals"]
    mib = (lambda b: f"{b / 2**20:.0f} MiB" if b else "?")
    lines = [f"sent {t['sent']}: answered {t['answered']}, rejected(4xx) {t['rejected']}, refused(429/503+Retry-After) "
             f"{t['refused']}, cancelled {t['cancelled']}, failed {t['failed']}; 5xx {t['status_5xx']}; "
             f"wall {rep['wall_s']:.0f} s",
             f"server RSS first {mib(rep['rss_bytes']['first'])}, max {mib(rep['rss_bytes']['max'])}, "
             f"last {mib(rep['rss_bytes']['last'])}"]
    for name, s in rep["by_tier"].items():
        f = (lambda x: f"{x:.1f}s" if x is not None else "-")
        lines.append(f"  {name:>12}: {s['answered']}/{s['sent']} answered, {s['refused']} refused, latency p50 "
                     f"{f(s['latency_p50_s'])} p95 {f(s['latency_p95_s'])}, ttft p50 {f(s['ttft_p50_s'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
