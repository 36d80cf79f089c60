"""`agentserve bench --replay`: multi-turn agent traces replayed turn by turn.

Each trace (``agentserve/bench/traces.py``: tool calls with JSON arguments, tool outputs echoed
back, edits of files read earlier, retries, re-emitted plans) is one agent session: the client
opens an agentserve session, then for every assistant turn sends the recorded conversation up
to that turn (teacher forcing: the history is the trace's, so every system sees the same
prompts) and lets the server generate the turn. The session keeps the conversation's KV in the
radix cache and, for our worker, one draft index across turns.

Systems run one after another in this process (plain, SGLang NGRAM, our worker with model drafts
only, and hybrid = model + session index + radix tree). Single-turn chat prompts run as a
control (hybrid should not lose there). Printed per system: τ (tokens per verify step, from
SGLang's meta_info), per-user tok/s and the ratios the issue asks for (hybrid τ ÷ dspark τ,
hybrid tok/s ÷ NGRAM tok/s, chat hybrid ÷ dspark).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import platform
import statistics
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from agentserve.bench.serve import REPO, SYSTEMS, parse_list, save_figure
from agentserve.server.procs import ServerProcess
from agentserve.profile import Profile, load_profile


@dataclass
class TurnResult:
    system: str
    workload: str  # "replay" or "chat"
    kind: str  # trace kind or "chat"
    trace: int
    turn: int
    concurrency: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    e2e_s: float
    ttft_s: float
    accept_length: float | None
    verify_ct: int | None

    @property
    def user_tps(self) -> float:
        decode = self.e2e_s - self.ttft_s
        return (self.completion_tokens - 1) / decode if decode > 0 and self.completion_tokens > 1 else 0.0


def build_workload(tokenizer, per_kind: int, turns: int, seed: int) -> list[tuple[str, list[int], list[tuple[int, int]]]]:
    """(kind, tokens, assistant spans) per trace, cut to its first `turns` assistant turns."""
    from agentserve.bench.traces import build_corpus, tokenize_trace

    out = []
    for tr in build_corpus(per_kind, seed=seed):
        tt = tokenize_trace(tr, tokenizer)
        out.append((tr.kind, tt.tokens, tt.spans[:turns] if turns > 0 else tt.spans))
    return out


def _generate(url: str, ids: list[int], max_new: int, headers: dict[str, str]) -> dict:
    body = {"input_ids": ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new}}
    r = requests.post(url + "/generate", json=body, headers=headers, timeout=1800)
    r.raise_for_status()
    return r.json()["meta_info"]


def replay_trace(url: str, system: str, t_index: int, kind: str, tokens: list[int], spans: list[tuple[int, int]],
                 max_new: int, conc: int) -> list[TurnResult]:
    """One agent session: open it, replay every turn, close it."""
    agent = f"replay-{t_index}"
    r = requests.post(url + "/agentserve/v1/sessions", json={"agent_id": agent}, timeout=60)
    r.raise_for_status()
    sid = r.json()["id"]
    headers = {"x-agent-id": agent, "x-session-id": sid}
    out = []
    try:
        for k, (start, end) in enumerate(spans):
            m = _generate(url, tokens[:start], max(1, min(max_new, end - start)), headers)
            out.append(TurnResult(system, "replay", kind, t_index, k, conc, int(m["prompt_tokens"]),
                                  int(m.get("cached_tokens") or 0), int(m["completion_tokens"]), float(m["e2e_latency"]),
                                  float(m.get("first_token_latency") or 0.0), m.get("spec_accept_length"),
                                  m.get("spec_verify_ct")))
    finally:
        requests.delete(url + f"/agentserve/v1/sessions/{sid}", headers={"x-agent-id": agent}, timeout=60)
    return out


def run_chat(url: str, system: str, prompts: list[list[int]], max_new: int) -> list[TurnResult]:
    out = []
    for i, ids in enumerate(prompts):
        m = _generate(url, ids, max_new, {"x-agent-id": f"chat-{uuid.uuid4().hex[:6]}"})
        out.append(TurnResult(system, "chat", "chat", i, 0, 1, int(m["prompt_tokens"]), int(m.get("cached_tokens") or 0),
                              int(m["completion_tokens"]), float(m["e2e_latency"]), float(m.get("first_token_latency") or 0.0),
                              m.get("spec_accept_length"), m.get("spec_verify_ct")))
    return out


def bench_system(name: str, base: Profile, traces: list, chat: list[list[int]], concs: list[int], max_new: int,
                 log_dir: Path) -> list[TurnResult]:
    # admission off: every system runs the same load (the tier gate would hold requests of a
    # speculative server back, which changes the concurrency being measured; bench --tiers
    # measures admission)
    prof = base.model_copy(update={"drafter": SYSTEMS[name], "admission_control": False})
    res: list[TurnResult] = []
    with ServerProcess(prof, log_path=log_dir / f"replay-{name}.log") as srv:
        _generate(srv.url, chat[0] if chat else traces[0][1][:64], 4, {})  # warm-up
        for conc in concs:
            with cf.ThreadPoolExecutor(conc) as ex:
                futs = [ex.submit(replay_trace, srv.url, name, i, kind, toks, spans, max_new, conc)
                        for i, (kind, toks, spans) in enumerate(traces)]
                for f in futs:
                    res += f.result()
            rs = [r for r in res if r.concurrency == conc and r.workload == "replay"]
            print(f"  {name:7s} replay c={conc}: {len(rs)} turns, user tok/s {statistics.mean(r.user_tps for r in rs):.2f}",
                  file=sys.stderr)
        res += run_chat(srv.url, name, chat, max_new)
    return res


def tau(rs: list[TurnResult]) -> float:
    """Tokens per verify step over all turns (1.0 without speculation)."""
    steps = sum(r.verify_ct or 0 for r in rs)
    return sum(r.completion_tokens for r in rs) / steps if steps else 1.0


def summarize(results: list[TurnResult]) -> list[dict]:
    rows = []
    groups = sorted({(r.workload, r.concurrency) for r in results})
    for wl, conc in groups:
        by = {s: [r for r in results if r.system == s and r.workload == wl and r.concurrency == conc]
              for s in dict.fromkeys(r.system for r in results)}
        base = by.get("plain") or []
        base_tps = statistics.mean(r.user_tps for r in base) if base else None
        for s, rs in by.items():
            if not rs:
                continue
            tps = statistics.mean(r.user_tps for r in rs)
            rows.append({"workload": wl, "concurrency": conc, "system": s, "turns": len(rs), "tau": tau(rs),
                         "user_tps": tps, "ratio_vs_plain": tps / base_tps if base_tps else None,
                         "cached_share": sum(r.cached_tokens for r in rs) / max(1, sum(r.prompt_tokens for r in rs))})
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
        if h and n and n["user_tps"]:
            lines.append(f"replay c={conc}: hybrid tok/s / ngram tok/s = {h['user_tps'] / n['user_tps']:.2f} (goal >= 1.3)")
    h, d = get("chat", 1, "hybrid"), get("chat", 1, "dspark")
    if h and d and d["user_tps"]:
        lines.append(f"chat: hybrid tok/s / dspark tok/s = {h['user_tps'] / d['user_tps']:.2f} (goal >= 1.0)")
    return lines


def print_table(rows: list[dict], machine: str) -> None:
    print(f"\nmachine: {machine}")
    print(f"{'workload':8} {'conc':>4} {'system':8} {'turns':>5} {'tau':>6} {'user tok/s':>10} {'x plain':>8} {'cached':>7}")
    for r in rows:
        ratio = f"{r['ratio_vs_plain']:.2f}" if r["ratio_vs_plain"] else "-"
        print(f"{r['workload']:8} {r['concurrency']:>4} {r['system']:8} {r['turns']:>5} {r['tau']:>6.2f} "
              f"{r['user_tps']:>10.2f} {ratio:>8} {r['cached_share']:>7.0%}")
    for line in goals(rows):
        print(line)


def plot(rows: list[dict], out: Path, machine: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["workload"], r["concurrency"]) for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    w = 0.8 / max(1, len(systems))
    for ax, metric, label in ((axes[0], "tau", "τ (tokens per verify step)"), (axes[1], "ratio_vs_plain", "per-user tok/s ÷ plain")):
        for i, s in enumerate(systems):
            vals = [next((r[metric] or 0 for r in rows if r["system"] == s and (r["workload"], r["concurrency"]) == g), 0)
                    for g in groups]
            ax.bar([j + i * w for j in range(len(groups))], vals, w, label=s)
        ax.set_xticks([j + w * (len(systems) - 1) / 2 for j in range(len(groups))], [f"{g[0]} c={g[1]}" for g in groups])
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"agent traces replayed turn by turn — {machine}", fontsize=9)
    return save_figure(fig, out / "replay.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="agentserve bench --replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=str(REPO / "profiles" / "cpu-demo.yaml"), help="base profile; its drafter is replaced per system")
    ap.add_argument("--systems", default="plain,ngram,dspark,hybrid", help=f"comma list from {sorted(SYSTEMS)}")
    ap.add_argument("--per-kind", type=int, default=1, help="traces per kind (5 kinds)")
    ap.add_argument("--turns", type=int, default=6, help="assistant turns replayed per trace (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="cap per turn (a turn never asks for more than the recorded one)")
    ap.add_argument("--concurrency", default="1", help="comma list: traces replayed at once")
    ap.add_argument("--chat", type=int, default=4, help="single-turn chat prompts as a control")
    ap.add_argument("--seed", type=int, default=100, help="trace seed (the drafter was trained on seed 0 traces)")
    ap.add_argument("--quick", action="store_true", help="3 turns per trace, 32 tokens, 2 chat prompts")
    ap.add_argument("--out", default="bench_out/replay")
    a = ap.parse_args(argv)
    if a.quick:
        a.turns, a.max_new_tokens, a.chat = 3, 32, 2
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"--systems: unknown {unknown}; choose from {sorted(SYSTEMS)}")
    concs = parse_list(ap, "--concurrency", a.concurrency, int)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_profile(a.profile)
    from transformers import AutoTokenizer

    from agentserve.bench.serve import load_prompts

    tok = AutoTokenizer.from_pretrained(base.model.path)
    traces = build_workload(tok, a.per_kind, a.turns, a.seed)
    chat = load_prompts(a.chat, tok)["chat"][: a.chat] if a.chat > 0 else []
    machine = f"{platform.machine()} {__import__('os').cpu_count()} cores, {base.model.dtype}"
    results: list[TurnResult] = []
    for s in systems:
        print(f"system {s} ...", file=sys.stderr)
        results += bench_system(s, base, traces, chat, concs, a.max_new_tokens, out)
    rows = summarize(results)
    print_table(rows, machine)
    (out / "replay.json").write_text(json.dumps({"machine": machine, "settings": vars(a), "summary": rows,
                                                 "goals": goals(rows), "turns": [asdict(r) | {"user_tps": r.user_tps} for r in results]},
                                                indent=1))
    print(f"wrote {plot(rows, out, machine)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
