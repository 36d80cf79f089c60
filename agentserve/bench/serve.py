"""`agentserve bench serve`: the same prompts against several serving systems, one after
another on this machine, in one run; prints the headline against plain decoding and writes
JSON and PNG plots.

Systems are started one at a time (they would distort each other's timings on a small
machine). Each (temperature, concurrency) phase sends its own prompts of each domain at once
through the streaming client (agentserve/bench/client.py); the metrics are defined once in
agentserve/bench/metrics.py. Headline per system: end-to-end latency and time to first token
(mean, p95, ratio to plain) and total throughput (tokens over the makespan of the level, ratio
to plain); decode-only per-user tok/s and τ are secondary. Ratios, not absolute speeds, are
the point: machines are noisy. --warmup-s S measures warm servers (S seconds of warm-up
traffic each) instead of cold ones.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

from agentserve.bench import metrics, report
from agentserve.bench.args import add_warmup, expand_rounds, parse_list, parse_systems, positive_int
from agentserve.bench.client import RequestRecord, send, warm_up
from agentserve.bench.prom import scrape, spec_delta
from agentserve.bench.systems import REPO, SYSTEMS, log_name, system_profile
from agentserve.bench.workload import WARMUP_IDS, load_prompts, phase_slices, prompts_needed, warmup_prompts
from agentserve.profile import Profile, load_profile
from agentserve.server.procs import ServerProcess

KEYS = ("temperature", "concurrency", "domain")


def bench_system(name: str, base: Profile, prompts: dict[str, list[list[int]]], concurrencies: list[int], max_new: int,
                 temperatures: list[float], log_dir: Path, per_domain: int, warmup: list[list[int]] | None = None,
                 warmup_s: float = 0.0) -> tuple[list[RequestRecord], list[dict], float, int]:
    prof = system_profile(base, name)
    records: list[RequestRecord] = []
    spec: list[dict] = []
    with ServerProcess(prof, log_path=log_dir / f"bench-{log_name(name)}.log") as srv:
        start = srv.start_seconds or 0.0
        send(srv.url, WARMUP_IDS, 8)
        sent = warm_up(srv.url, warmup or [], warmup_s, max(concurrencies), max_new)
        if sent:
            print(f"  {name}: {sent} warm-up requests in {warmup_s:g} s", file=sys.stderr)
        slices = {dom: phase_slices(temperatures, concurrencies, per_domain, len(plist)) for dom, plist in prompts.items()}
        for temp in temperatures:
            for conc in concurrencies:
                _level(srv.url, name, prompts, slices, temp, conc, max_new, records, spec)
        rss = srv.peak_rss_bytes()
    return records, spec, start, rss


def _level(url: str, name: str, prompts: dict[str, list[list[int]]], slices: dict[str, dict], temp: float, conc: int,
           max_new: int, records: list[RequestRecord], spec: list[dict]) -> None:
    """One (temperature, concurrency) phase: each domain's own prompts, `conc` clients at once."""
    for dom, plist in prompts.items():
        jobs = plist[slices[dom][(temp, conc)]]  # distinct prompts, none seen earlier by this server
        labels = {"system": name, "temperature": temp, "concurrency": conc, "domain": dom}
        before = scrape(url)
        with cf.ThreadPoolExecutor(conc) as ex:
            # each request its own rid: the step trace's lines say whose steps they were
            level = list(ex.map(lambda ids: send(url, ids, max_new, temp, rid=uuid.uuid4().hex,
                                                 labels=labels), jobs))
        spec.append({**labels, **spec_delta(before, scrape(url))})
        records += level
        s = metrics.summary(level)
        print(f"  {name:11s} T={temp:g} c={conc:<2d} {dom:6s} e2e {s['e2e_mean']:6.2f} s, "
              f"total tok/s {s['total_tps'] or 0:6.2f}", file=sys.stderr)


def summarize(records: list[RequestRecord], spec: list[dict] | None = None) -> list[dict[str, Any]]:
    """One row per (temperature, concurrency, domain, system): the headline with ratios to
    plain, then the secondary columns; copy share from the worker's counters where known."""
    rows = metrics.group_rows(records, KEYS)
    for row in rows:
        counters = next((s for s in spec or [] if all(s[k] == row[k] for k in (*KEYS, "system"))), None)
        if row["copy_share"] is None and counters:
            row["copy_share"] = counters.get("copy_share")
    return rows


def plot(rows: list[dict], out: Path, machine: str) -> list[Path]:
    """The headline (end-to-end and total-throughput ratios) per concurrency and domain at the
    first temperature, and the per-user/total frontier (paper Figure 7 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(r["temperature"] for r in rows)
    rows = [r for r in rows if r["temperature"] == t0]
    title = f"{machine}, T={t0:g}"
    paths = [report.plot_headline(rows, ("concurrency", "domain"), out / "headline.png",
                                  f"end-to-end latency and total throughput vs plain — {title}")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in dict.fromkeys(r["system"] for r in rows):
        pts = sorted({r["concurrency"] for r in rows})
        xs = [statistics.mean(r["user_tps"] or 0 for r in rows if r["system"] == s and r["concurrency"] == c) for c in pts]
        ys = [statistics.mean(r["total_tps"] or 0 for r in rows if r["system"] == s and r["concurrency"] == c) for c in pts]
        ax.plot(xs, ys, marker="o", label=s)
    ax.set(xlabel="decode-only per-user tok/s", ylabel="total tok/s (tokens ÷ makespan)")
    ax.set_title(f"throughput vs per-user speed — {title}", fontsize=9)
    ax.legend()
    paths.append(report.save_figure(fig, out / "frontier.png"))
    return paths


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="agentserve bench serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="agentserve bench tiers --help: interactivity tiers under rising load; "
                                        "agentserve bench replay --help: agent traces replayed turn by turn")
    ap.add_argument("--profile", default=str(REPO / "profiles" / "cpu-demo.yaml"),
                    help="base profile (model, server); its drafter is replaced per system")
    ap.add_argument("--systems", default="plain,ngram,dspark,hybrid", help=f"comma list from {sorted(SYSTEMS)}, each optionally with "
                         "@FIELD=VALUE profile overrides, e.g. dspark@drafter.path=drafters/new")
    ap.add_argument("--concurrency", default="1,8", help="comma list")
    ap.add_argument("--per-domain", type=positive_int, default=6)
    ap.add_argument("--max-new-tokens", type=positive_int, default=96)
    ap.add_argument("--temperature", default="0", help="comma list, e.g. 0,1 (each system runs every temperature)")
    ap.add_argument("--domains", default="code,math,chat,agent", help="comma list of code, math, chat, agent")
    ap.add_argument("--max-agent-prompt", type=positive_int, default=None,
                    help="cut agent traces before the last assistant turn starting within N tokens (default: last turn)")
    add_warmup(ap)
    ap.add_argument("--quick", action="store_true",
                    help="2 prompts per domain, 32 tokens, concurrency 1,4, agent prompts <= 1024 tokens unless given")
    ap.add_argument("--bracket", action="store_true",
                    help="run plain again after the other systems (as 'plain#2'): ratios count against the faster "
                         "plain run of each cell, and the report prints plain#2 ÷ plain, how far the machine's speed "
                         "drifted during the run")
    ap.add_argument("--rounds", type=positive_int, default=1,
                    help="run the systems this many times, one round after another, each in a new server "
                         "process ('hybrid', then 'hybrid#2', ...); prints a table pooled over the rounds too. "
                         "On a VM where one process decodes much faster than the next, one round is one draw")
    ap.add_argument("--out", default="bench_out")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.quick:
        a.per_domain, a.max_new_tokens = 2, 32
        if "--concurrency" not in argv:
            a.concurrency = "1,4"
        if a.max_agent_prompt is None:
            a.max_agent_prompt = 1024
    systems = parse_systems(ap, a.systems, SYSTEMS)
    if a.bracket:
        if "plain" not in systems:
            ap.error("--bracket: runs 'plain' again at the end; --systems must include plain")
        if a.rounds > 1:
            ap.error("--bracket: --rounds already runs plain in every round; use one of them")
        systems.append("plain#2")
    if any("#" in s for s in systems) and a.rounds > 1:
        ap.error("--systems: names with '#' are the rounds' own; leave them out with --rounds")
    systems = expand_rounds(systems, a.rounds)
    concs = parse_list(ap, "--concurrency", a.concurrency, int)
    temps = parse_list(ap, "--temperature", str(a.temperature), float)
    domains = [d for d in a.domains.split(",") if d]
    if not domains or set(domains) - {"code", "math", "chat", "agent"}:
        ap.error(f"--domains: expected a comma list of code, math, chat, agent (got {a.domains!r})")
    base = load_profile(a.profile)
    if "upstream" in systems and base.server.device == "cpu":
        ap.error("--systems: 'upstream' is SGLang's own DSPARK worker, which runs only on cuda, npu or xpu "
                 f"(the profile's server.device is cpu: {a.profile})")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base.model.path)
    need = prompts_needed(temps, concs, a.per_domain)
    prompts = {d: v for d, v in load_prompts(need, tok, max_agent_prompt=a.max_agent_prompt).items() if d in domains}
    for d, v in prompts.items():
        try:
            sl = phase_slices(temps, concs, a.per_domain, len(v))
        except ValueError as e:
            ap.error(f"--per-domain/--concurrency: {d}: {e}")
        if max(s.stop for s in sl.values()) < need:
            print(f"{d}: {len(v)} held-out prompts, so its phases send fewer than --per-domain "
                  f"({', '.join(f'c={c}: {s.stop - s.start}' for (_, c), s in sl.items())})", file=sys.stderr)
    warm = warmup_prompts(max(concs), tok, domains, need, a.max_agent_prompt or 1024) if a.warmup_s else []
    machine = report.machine(base.model.dtype)
    records: list[RequestRecord] = []
    spec: list[dict] = []
    starts: dict[str, float] = {}
    rss: dict[str, int] = {}
    for s in systems:
        print(f"system {s} ...", file=sys.stderr)
        rs, sp, starts[s], rss[s] = bench_system(s, base, prompts, concs, a.max_new_tokens, temps, out, a.per_domain,
                                                 warm, a.warmup_s)
        records += rs
        spec += sp
        print(f"  {s}: healthy after {starts[s]:.0f}s, resident memory {rss[s] / 2**30:.2f} GiB", file=sys.stderr)
    rows = summarize(records, spec)
    report.print_report(rows, KEYS, machine, a.warmup_s)
    drift = metrics.drift(rows, KEYS) if a.bracket or a.rounds > 1 else []
    if drift:
        report.print_drift(drift, KEYS)
    pooled = metrics.pool(rows, KEYS) if a.rounds > 1 else []
    if pooled:
        print(f"\npooled over {a.rounds} rounds (each value the mean of the processes'; ratios against plain's pooled row)")
        for line in report.table(pooled, KEYS):
            print(line)
    (out / "results.json").write_text(json.dumps(
        {"machine": machine, "mode": "warm" if a.warmup_s else "cold", "settings": vars(a), "columns": list(rows[0]),
         "summary": rows, "pooled": pooled, "drift": drift, "requests": [r.to_json() for r in records], "spec": spec,
         "start_seconds": starts, "rss_bytes": rss}, indent=1))
    from agentserve.bench.plots import plot_spec

    for p in plot(rows, out, machine) + plot_spec(spec, out, machine):
        print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
