"""`agentserve bench replay`: multi-turn agent traces replayed turn by turn.

Each trace is one agent session: the client opens an agentserve session, then for every
assistant turn sends the recorded conversation up to that turn (teacher forcing: the history is
the trace's, so every system sees the same prompts) and lets the server generate the turn. The
session keeps the conversation's KV in the radix cache and, for our worker, one draft index
across turns.

Traces come from a source (--source): `synthetic` = agentserve/bench/traces.py (tool calls with
JSON arguments, tool outputs echoed back, edits of files read earlier, retries, re-emitted
plans); another source is a function `(tokenizer, args) -> Iterable[ReplayTrace]`, registered in
SOURCES or named as `module:function`.

Systems run one after another in this process (plain, SGLang NGRAM, our worker with model drafts
only, and hybrid = model + session index + radix tree). Single-turn chat prompts run as a
control (hybrid should not lose there). Headline per system: end-to-end latency per turn and
time to first token (mean, p95, ratio to plain), total throughput (tokens over the makespan of
the level, ratio to plain); then decode-only per-user tok/s, τ and the issue's ratios (hybrid
τ ÷ dspark τ, hybrid tok/s ÷ NGRAM tok/s, chat hybrid ÷ dspark).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from agentserve.bench import metrics, report
from agentserve.bench.args import add_warmup, parse_list, parse_systems
from agentserve.bench.client import RequestRecord, close_session, open_session, send, warm_up
from agentserve.bench.systems import REPO, SYSTEMS, log_name, system_profile
from agentserve.profile import Profile, load_profile
from agentserve.server.procs import ServerProcess

KEYS = ("workload", "concurrency")


@dataclass
class ReplayTrace:
    kind: str  # what the trace is (a synthetic kind, or the public source's task name)
    tokens: list[int]  # the whole conversation, rendered with the served chat template
    spans: list[tuple[int, int]]  # [start, end) of each assistant turn to generate


TraceSource = Callable[[Any, argparse.Namespace], Iterable[ReplayTrace]]


def synthetic_source(tokenizer: Any, a: argparse.Namespace) -> Iterable[ReplayTrace]:
    """agentserve/bench/traces.py: --per-kind traces of each kind, seed --seed."""
    from agentserve.bench.traces import build_corpus, tokenize_trace

    for tr in build_corpus(a.per_kind, seed=a.seed):
        tt = tokenize_trace(tr, tokenizer)
        yield ReplayTrace(tr.kind, tt.tokens, tt.spans)


SOURCES: dict[str, TraceSource] = {"synthetic": synthetic_source}


def resolve_source(name: str) -> TraceSource:
    """A registered source, or `module:function`."""
    if name in SOURCES:
        return SOURCES[name]
    mod, colon, fn = name.partition(":")
    if not colon:
        raise ValueError(f"--source: unknown {name!r}; choose from {sorted(SOURCES)} or give module:function")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--source: cannot load {name!r} ({e})") from e


def build_workload(tokenizer: Any, a: argparse.Namespace, source: TraceSource = synthetic_source) -> list[ReplayTrace]:
    """The source's traces, each cut to its first --turns assistant turns (0 = all)."""
    out = []
    for tr in source(tokenizer, a):
        spans = tr.spans[: a.turns] if a.turns > 0 else tr.spans
        if spans:
            out.append(ReplayTrace(tr.kind, tr.tokens, spans))
    return out


def replay_trace(url: str, labels: dict[str, Any], t_index: int, tr: ReplayTrace, max_new: int) -> list[RequestRecord]:
    """One agent session: open it, replay every turn, close it."""
    headers = open_session(url, f"replay-{t_index}")
    out = []
    try:
        for k, (start, end) in enumerate(tr.spans):
            out.append(send(url, tr.tokens[:start], max(1, min(max_new, end - start)), headers=headers,
                            labels={**labels, "kind": tr.kind, "trace": t_index, "turn": k}))
    finally:
        close_session(url, headers)
    return out


def bench_system(name: str, base: Profile, traces: list[ReplayTrace], chat: list[list[int]], concs: list[int], max_new: int,
                 log_dir: Path, warmup: list[list[int]] | None = None, warmup_s: float = 0.0) -> list[RequestRecord]:
    # admission off: every system runs the same load (the tier gate would hold requests of a
    # speculative server back, which changes the concurrency being measured)
    prof = system_profile(base, name)
    res: list[RequestRecord] = []
    with ServerProcess(prof, log_path=log_dir / f"replay-{log_name(name)}.log") as srv:
        send(srv.url, chat[0] if chat else traces[0].tokens[:64], 4)  # warm-up
        warm_up(srv.url, warmup or [], warmup_s, max(concs), max_new)
        for conc in concs:
            labels = {"system": name, "workload": "replay", "concurrency": conc}
            with cf.ThreadPoolExecutor(conc) as ex:
                futs = [ex.submit(replay_trace, srv.url, labels, i, tr, max_new) for i, tr in enumerate(traces)]
                level = [r for f in futs for r in f.result()]
            res += level
            s = metrics.summary(level)
            print(f"  {name:7s} replay c={conc}: {len(level)} turns, e2e {s['e2e_mean']:.2f} s, "
                  f"total tok/s {s['total_tps'] or 0:.2f}", file=sys.stderr)
        for i, ids in enumerate(chat):
            res.append(send(srv.url, ids, max_new, headers={"x-agent-id": f"chat-{i}"},
                            labels={"system": name, "workload": "chat", "concurrency": 1, "kind": "chat", "trace": i, "turn": 0}))
    return res


def summarize(records: list[RequestRecord]) -> list[dict[str, Any]]:
    rows = metrics.group_rows(records, KEYS)
    for row in rows:
        rs = [r for r in records if all(r.labels[k] == row[k] for k in (*KEYS, "system"))]
        row["cached_share"] = sum(r.cached_tokens for r in rs) / max(1, sum(r.prompt_tokens for r in rs))
    return rows


def goals(rows: list[dict]) -> list[str]:
    """The issue's ratios, where the systems they compare were run."""
    def get(wl: str, conc: int, s: str) -> dict | None:
        return next((r for r in rows if r["workload"] == wl and r["concurrency"] == conc and r["system"] == s), None)

    lines = []
    for conc in sorted({r["concurrency"] for r in rows if r["workload"] == "replay"}):
        h, d, n = get("replay", conc, "hybrid"), get("replay", conc, "dspark"), get("replay", conc, "ngram")
        if h and d:
            lines.append(f"replay c={conc}: hybrid tau / dspark tau = {h['tau'] / d['tau']:.2f} (goal >= 1.5)")
        if h and n and n["user_tps"] and h["user_tps"]:
            lines.append(f"replay c={conc}: hybrid tok/s / ngram tok/s = {h['user_tps'] / n['user_tps']:.2f} (goal >= 1.3)")
    h, d = get("chat", 1, "hybrid"), get("chat", 1, "dspark")
    if h and d and d["user_tps"] and h["user_tps"]:
        lines.append(f"chat: hybrid tok/s / dspark tok/s = {h['user_tps'] / d['user_tps']:.2f} (goal >= 1.0)")
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="agentserve bench replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=str(REPO / "profiles" / "cpu-demo.yaml"), help="base profile; its drafter is replaced per system")
    ap.add_argument("--systems", default="plain,ngram,dspark,hybrid", help=f"comma list from {sorted(SYSTEMS)}")
    ap.add_argument("--source", default="synthetic", help=f"trace source: {sorted(SOURCES)} or module:function")
    ap.add_argument("--per-kind", type=int, default=1, help="synthetic: traces per kind (5 kinds)")
    ap.add_argument("--turns", type=int, default=6, help="assistant turns replayed per trace (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="cap per turn (a turn never asks for more than the recorded one)")
    ap.add_argument("--concurrency", default="1", help="comma list: traces replayed at once")
    ap.add_argument("--chat", type=int, default=4, help="single-turn chat prompts as a control")
    ap.add_argument("--seed", type=int, default=100, help="synthetic: trace seed (the drafter was trained on seed 0 traces)")
    add_warmup(ap)
    ap.add_argument("--quick", action="store_true", help="3 turns per trace, 32 tokens, 2 chat prompts")
    ap.add_argument("--out", default="bench_out/replay")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.quick:
        a.turns, a.max_new_tokens, a.chat = 3, 32, 2
    systems = parse_systems(ap, a.systems, SYSTEMS)
    concs = parse_list(ap, "--concurrency", a.concurrency, int)
    try:
        source = resolve_source(a.source)
    except ValueError as e:
        ap.error(str(e))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_profile(a.profile)
    from transformers import AutoTokenizer

    from agentserve.bench.workload import load_prompts, warmup_prompts

    tok = AutoTokenizer.from_pretrained(base.model.path)
    traces = build_workload(tok, a, source)
    if not traces:
        ap.error(f"--source: {a.source!r} gave no trace with an assistant turn")
    chat = load_prompts(a.chat, tok)["chat"][: a.chat] if a.chat > 0 else []
    warm = warmup_prompts(max(concs) + 2, tok, ["agent", "chat"], a.chat) if a.warmup_s else []
    machine = report.machine(base.model.dtype)
    records: list[RequestRecord] = []
    for s in systems:
        print(f"system {s} ...", file=sys.stderr)
        records += bench_system(s, base, traces, chat, concs, a.max_new_tokens, out, warm, a.warmup_s)
    rows = summarize(records)
    report.print_report(rows, KEYS, machine, a.warmup_s, extra=[("cached_share", "cached", 6, ".0%")])
    for line in goals(rows):
        print(line)
    (out / "replay.json").write_text(json.dumps(
        {"machine": machine, "mode": "warm" if a.warmup_s else "cold", "settings": vars(a), "columns": list(rows[0]),
         "summary": rows, "goals": goals(rows), "turns": [r.to_json() for r in records]}, indent=1))
    path = report.plot_headline(rows, KEYS, out / "replay.png", f"agent traces replayed turn by turn — {machine}")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
