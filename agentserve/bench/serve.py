"""`agentserve bench`: the same prompts against several serving systems, one after another on
this machine, in one run; prints ratios against plain decoding and writes JSON and PNG plots.

Systems are started one at a time (they would distort each other's timings on a small
machine). Per request: tokens/s seen by that user = (completion tokens - 1) / (end-to-end
latency - time to first token), τ = SGLang's spec_accept_length (tokens per verify step).
Ratios, not absolute speeds, are the headline: machines are noisy.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from agentserve.server.procs import ServerProcess
from agentserve.profile import DrafterSpec, Profile, load_profile

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "prompts"
DOMAIN_FILES = {"code": ["humaneval.jsonl", "mbpp.jsonl"], "math": ["gsm8k.jsonl"], "chat": ["mt-bench.jsonl"]}

# name -> drafter settings layered on the base profile
SYSTEMS: dict[str, DrafterSpec] = {
    "plain": DrafterSpec(algorithm="none"),
    "ngram": DrafterSpec(algorithm="ngram", num_draft_tokens=8),
    # our worker, model drafts only
    "dspark": DrafterSpec(algorithm="agentspark", path=str(REPO / "drafters" / "smollm2-135m-dspark"), num_draft_tokens=8,
                          radix_drafting=False),
    # our worker, model drafts + copied continuations from the session index
    "hybrid": DrafterSpec(algorithm="agentspark", path=str(REPO / "drafters" / "smollm2-135m-dspark"), num_draft_tokens=8,
                          radix_drafting=True),
    # ablation: hybrid with every row padded to the step's widest (SGLang's uniform verify layout)
    "hybrid_padded": DrafterSpec(algorithm="agentspark", path=str(REPO / "drafters" / "smollm2-135m-dspark"),
                                 num_draft_tokens=8, radix_drafting=True, ragged_verify=False),
    # SGLang's own DSPARK worker on the same checkpoint (CUDA/NPU/XPU only: a GPU baseline)
    "upstream": DrafterSpec(algorithm="dspark", path=str(REPO / "drafters" / "smollm2-135m-dspark"), num_draft_tokens=8),
}


@dataclass
class RequestResult:
    system: str
    domain: str
    concurrency: int
    temperature: float
    completion_tokens: int
    e2e_s: float
    ttft_s: float
    accept_length: float | None
    verify_ct: int | None

    @property
    def user_tps(self) -> float:
        decode = self.e2e_s - self.ttft_s
        return (self.completion_tokens - 1) / decode if decode > 0 and self.completion_tokens > 1 else 0.0


@dataclass
class BenchResult:
    machine: str
    settings: dict
    requests: list[dict] = field(default_factory=list)
    start_seconds: dict[str, float] = field(default_factory=dict)
    rss_bytes: dict[str, int] = field(default_factory=dict)


def load_prompts(per_domain: int, tokenizer, seed: int = 0, max_agent_prompt: int | None = None) -> dict[str, list[list[int]]]:
    """Held-out prompts as token ids: the last `per_domain` lines of each domain's files
    (drafter training uses the head), plus multi-turn agent traces cut before their last
    assistant turn (tool calls with JSON arguments, tool outputs echoed, file edits, retries)."""
    out: dict[str, list[list[int]]] = {}
    for dom, files in DOMAIN_FILES.items():
        lines: list[str] = []
        for f in files:
            p = DATA / f
            if p.is_file():
                rows = [json.loads(l)["turns"][0] for l in p.read_text().splitlines() if l.strip()]
                lines += rows[-per_domain:]
        if lines:
            out[dom] = [_chat_ids(tokenizer, t) for t in lines[:per_domain]]
    out["agent"] = agent_prompts(per_domain, tokenizer, seed, max_agent_prompt)
    return out


def agent_prompts(n: int, tokenizer, seed: int = 0, max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Each trace cut before its last assistant turn, or before the last one that starts
    within `max_prompt_tokens` (prefill of a whole 2-3k-token trace takes ~40 s on 2 cores)."""
    from agentserve.bench.traces import TRACE_KINDS, build_trace, tokenize_trace

    prompts = []
    for i in range(n):
        tt = tokenize_trace(build_trace(TRACE_KINDS[i % len(TRACE_KINDS)], seed + i), tokenizer)
        starts = [a for a, _ in tt.spans]
        fit = [a for a in starts if max_prompt_tokens is None or a <= max_prompt_tokens]
        prompts.append(tt.tokens[: (fit or starts[:1])[-1]])  # ends with "<|im_start|>assistant\n"
    return prompts


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Prometheus samples of our worker (agentserve:*) as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=60).text
    out: dict[tuple[str, tuple], float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name.startswith("agentserve:spec_") or smp.name.startswith("agentserve:verify_budget"):
                out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


def spec_delta(before: dict, after: dict) -> dict:
    """Per-position conditional acceptance and verify budget of one workload, from counters."""
    def d(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    positions = {}
    for pos in range(1, 65):
        reached = d("agentserve:spec_reached_drafts_total", position=str(pos))
        if reached <= 0:
            break
        positions[pos] = {"reached": reached, "accepted": d("agentserve:spec_accepted_drafts_total", position=str(pos))}
    steps = d("agentserve:verify_budget_tokens_count")
    batch = d("agentserve:spec_batch_size_sum")
    return {"positions": positions, "steps": steps,
            "budget_per_step": d("agentserve:verify_budget_tokens_sum") / steps if steps else None,
            "budget_per_request": d("agentserve:verify_budget_tokens_sum") / batch if batch else None,
            "batch_per_step": batch / steps if steps else None}


def run_one(url: str, ids: list[int], max_new: int, temperature: float) -> dict:
    body = {"input_ids": ids, "sampling_params": {"temperature": temperature, "max_new_tokens": max_new}}
    r = requests.post(url + "/generate", json=body, timeout=1800)
    r.raise_for_status()
    return r.json()["meta_info"]


WARMUP_IDS = [1, 9690, 198, 31530, 15, 44, 339, 2]


def phase_slices(temperatures: list[float], concurrencies: list[int], per_domain: int) -> dict[tuple[float, int], slice]:
    """Each (temperature, concurrency) phase gets its own max(concurrency, per_domain) prompts
    per domain. Reusing a prompt would let every cache-aware system (SGLang's n-gram corpus,
    our radix-tree copies) replay the earlier phase's output, which measures the cache rather
    than decoding."""
    out, start = {}, 0
    for temp in temperatures:
        for conc in concurrencies:
            n = max(conc, per_domain)
            out[(temp, conc)] = slice(start, start + n)
            start += n
    return out


def prompts_needed(temperatures: list[float], concurrencies: list[int], per_domain: int) -> int:
    return max(s.stop for s in phase_slices(temperatures, concurrencies, per_domain).values())


def bench_system(name: str, base: Profile, prompts: dict[str, list[list[int]]], concurrencies: list[int],
                 max_new: int, temperatures: list[float], log_dir: Path, per_domain: int
                 ) -> tuple[list[RequestResult], list[dict], float, int]:
    # admission off: every system runs the same load (the tier gate would hold requests of a
    # speculative server back, which changes the concurrency being measured; bench --tiers
    # measures admission)
    prof = base.model_copy(update={"drafter": SYSTEMS[name], "admission_control": False})
    results: list[RequestResult] = []
    spec: list[dict] = []
    with ServerProcess(prof, log_path=log_dir / f"bench-{name}.log") as srv:
        start = srv.start_seconds or 0.0
        run_one(srv.url, WARMUP_IDS, 8, 0.0)  # warm-up (a prompt no workload uses)
        for (temp, conc), sl in phase_slices(temperatures, concurrencies, per_domain).items():
            for dom, plist in prompts.items():
                jobs = plist[sl]  # distinct prompts, none seen earlier by this server
                before = scrape(srv.url)
                with cf.ThreadPoolExecutor(conc) as ex:
                    metas = list(ex.map(lambda ids: run_one(srv.url, ids, max_new, temp), jobs))
                spec.append({"system": name, "temperature": temp, "concurrency": conc, "domain": dom,
                             **spec_delta(before, scrape(srv.url))})
                for m in metas:
                    results.append(RequestResult(name, dom, conc, temp, int(m["completion_tokens"]), float(m["e2e_latency"]),
                                                 float(m.get("first_token_latency") or 0.0), m.get("spec_accept_length"),
                                                 m.get("spec_verify_ct")))
                print(f"  {name:11s} T={temp:g} c={conc:<2d} {dom:6s} user tok/s "
                      f"{statistics.mean(r.user_tps for r in results[-len(metas):]):6.2f}", file=sys.stderr)
        rss = srv.peak_rss_bytes()
    return results, spec, start, rss


def summarize(results: list[RequestResult]) -> list[dict]:
    rows = []
    keys = sorted({(r.temperature, r.concurrency, r.domain) for r in results})
    systems = list(dict.fromkeys(r.system for r in results))
    for temp, conc, dom in keys:
        def pick(s: str) -> list[RequestResult]:
            return [r for r in results if r.system == s and r.temperature == temp and r.concurrency == conc and r.domain == dom]

        base = [r.user_tps for r in pick("plain")]
        base_tps = statistics.mean(base) if base else None
        for s in systems:
            rs = pick(s)
            if not rs:
                continue
            tps = statistics.mean(r.user_tps for r in rs)
            taus = [r.accept_length for r in rs if r.accept_length]
            total_tps = sum(r.completion_tokens for r in rs) / max(max(r.e2e_s for r in rs), 1e-9)
            rows.append({"temperature": temp, "concurrency": conc, "domain": dom, "system": s, "user_tps": tps,
                         "ratio_vs_plain": tps / base_tps if base_tps else None,
                         "tau": statistics.mean(taus) if taus else 1.0, "total_tps": total_tps, "n": len(rs)})
    return rows


def print_table(rows: list[dict], machine: str) -> None:
    print(f"\nmachine: {machine}")
    print(f"{'temp':>4} {'conc':>4} {'domain':7} {'system':12} {'user tok/s':>10} {'x plain':>8} {'tau':>6} {'total tok/s':>11}")
    for r in rows:
        ratio = f"{r['ratio_vs_plain']:.2f}" if r["ratio_vs_plain"] else "-"
        print(f"{r['temperature']:>4g} {r['concurrency']:>4} {r['domain']:7} {r['system']:12} {r['user_tps']:>10.2f} {ratio:>8} "
              f"{r['tau']:>6.2f} {r['total_tps']:>11.2f}")


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(rows: list[dict], out: Path, machine: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    t0 = min(r["temperature"] for r in rows)  # headline figures: the first temperature
    rows = [r for r in rows if r["temperature"] == t0]
    machine = f"{machine}, T={t0:g}"
    systems = list(dict.fromkeys(r["system"] for r in rows))
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    for metric, label, fname in (("tau", "τ (tokens per verify step)", "tau_per_domain.png"),
                                 ("ratio_vs_plain", "per-user tok/s ÷ plain", "speedup_per_domain.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        conc = min(r["concurrency"] for r in rows)
        w = 0.8 / max(1, len(systems))
        for i, s in enumerate(systems):
            vals = [next((r[metric] or 0 for r in rows if r["system"] == s and r["domain"] == d and r["concurrency"] == conc), 0) for d in domains]
            ax.bar([j + i * w for j in range(len(domains))], vals, w, label=s)
        ax.set_xticks([j + w * (len(systems) - 1) / 2 for j in range(len(domains))], domains)
        ax.set_ylabel(label)
        ax.set_title(f"{label}, concurrency {conc} — {machine}", fontsize=9)
        ax.legend()
        paths.append(save_figure(fig, out / fname))
    # throughput vs per-user speed frontier (paper Figure 7 style)
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in systems:
        pts = sorted({r["concurrency"] for r in rows})
        xs = [statistics.mean(r["user_tps"] for r in rows if r["system"] == s and r["concurrency"] == c) for c in pts]
        ys = [statistics.mean(r["total_tps"] for r in rows if r["system"] == s and r["concurrency"] == c) for c in pts]
        ax.plot(xs, ys, marker="o", label=s)
    ax.set_xlabel("per-user tok/s")
    ax.set_ylabel("total tok/s")
    ax.set_title(f"throughput vs per-user speed — {machine}", fontsize=9)
    ax.legend()
    paths.append(save_figure(fig, out / "frontier.png"))
    return paths


def plot_spec(spec: list[dict], out: Path, machine: str) -> list[Path]:
    """Conditional acceptance per position (paper Figure 2 style) and verify budget vs
    concurrency (Figure 8 style), from the worker's counters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = [s for s in spec if s["steps"]]
    if not spec:
        return []
    paths = []
    temps = sorted({s["temperature"] for s in spec})
    systems = list(dict.fromkeys(s["system"] for s in spec))
    conc = min(s["concurrency"] for s in spec)
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4), squeeze=False)
    for ax, temp in zip(axes[0], temps):
        for sysname in systems:
            for dom in dict.fromkeys(s["domain"] for s in spec):
                rs = [s for s in spec if s["system"] == sysname and s["domain"] == dom and s["temperature"] == temp
                      and s["concurrency"] == conc]
                pos = sorted({k for s in rs for k in s["positions"]})
                ys = []
                for k in pos:
                    reached = sum(s["positions"].get(k, {}).get("reached", 0) for s in rs)
                    ys.append(sum(s["positions"].get(k, {}).get("accepted", 0) for s in rs) / reached if reached else None)
                if pos:
                    ax.plot(pos, ys, marker="o", label=f"{sysname} {dom}")
        ax.set_xlabel("position k in the block")
        ax.set_ylabel("P(accept k | accepted < k)")
        ax.set_ylim(0, 1)
        ax.set_title(f"conditional acceptance, c={conc}, T={temp:g} — {machine}", fontsize=8)
        ax.legend(fontsize=6)
    paths.append(save_figure(fig, out / "acceptance_per_position.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for sysname in systems:
        for temp in temps:
            concs = sorted({s["concurrency"] for s in spec if s["system"] == sysname and s["temperature"] == temp})
            ys = []
            for c in concs:
                rs = [s for s in spec if s["system"] == sysname and s["temperature"] == temp and s["concurrency"] == c]
                steps = sum(s["steps"] for s in rs)
                ys.append(sum((s["budget_per_step"] or 0) * s["steps"] for s in rs) / steps if steps else 0)
            ax.plot(concs, ys, marker="o", label=f"{sysname} T={temp:g}")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("draft tokens verified per step (all requests)")
    ax.set_title(f"verify budget vs concurrency — {machine}", fontsize=9)
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "verify_budget_vs_concurrency.png"))
    return paths


def positive_int(value: str) -> int:
    """argparse type for counts and token limits: argparse names the flag in its error."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (got {value!r})")
    return n


def parse_list(ap: argparse.ArgumentParser, flag: str, value: str, kind: type) -> list:
    """A comma list flag, or a usage error naming the flag (never a traceback)."""
    try:
        out = [kind(x) for x in value.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or (kind is int and min(out) < 1):
        ap.error(f"{flag}: expected {'positive integers' if kind is int else 'numbers'} separated by commas (got {value!r})")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--tiers" in argv:  # the tier load benchmark has its own workload and systems
        from agentserve.bench import tiers as bench_tiers

        return bench_tiers.main([x for x in argv if x != "--tiers"])
    if "--replay" in argv:  # multi-turn agent traces replayed turn by turn, with sessions
        from agentserve.bench import replay as bench_replay

        return bench_replay.main([x for x in argv if x != "--replay"])
    ap = argparse.ArgumentParser(prog="agentserve bench", description=__doc__,
                                 epilog="agentserve bench --tiers --help: interactivity tiers under rising load; "
                                        "agentserve bench --replay --help: agent traces replayed turn by turn")
    ap.add_argument("--profile", default=str(REPO / "profiles" / "cpu-demo.yaml"), help="base profile (model, server); its drafter is replaced per system")
    ap.add_argument("--systems", default="plain,ngram,dspark,hybrid", help=f"comma list from {sorted(SYSTEMS)}")
    ap.add_argument("--concurrency", default="1,8", help="comma list")
    ap.add_argument("--per-domain", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", default="0", help="comma list, e.g. 0,1 (each system runs every temperature)")
    ap.add_argument("--domains", default="code,math,chat,agent", help="comma list of code, math, chat, agent")
    ap.add_argument("--max-agent-prompt", type=positive_int, default=None,
                    help="cut agent traces before the last assistant turn starting within N tokens (default: last turn)")
    ap.add_argument("--quick", action="store_true",
                    help="2 prompts per domain, 32 tokens, concurrency 1,4, agent prompts <= 1024 tokens unless given")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    if a.quick:
        a.per_domain, a.max_new_tokens = 2, 32
        if "--concurrency" not in argv:
            a.concurrency = "1,4"
        if a.max_agent_prompt is None:
            a.max_agent_prompt = 1024
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"--systems: unknown {unknown}; choose from {sorted(SYSTEMS)}")
    concs = parse_list(ap, "--concurrency", a.concurrency, int)
    temps = parse_list(ap, "--temperature", str(a.temperature), float)
    base = load_profile(a.profile)
    if "upstream" in systems and base.server.device == "cpu":
        ap.error("--systems: 'upstream' is SGLang's own DSPARK worker, which runs only on cuda, npu or xpu "
                 f"(the profile's server.device is cpu: {a.profile})")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base.model.path)
    need = prompts_needed(temps, concs, a.per_domain)
    prompts = {d: v for d, v in load_prompts(need, tok, max_agent_prompt=a.max_agent_prompt).items() if d in a.domains.split(",")}
    short = {d: len(v) for d, v in prompts.items() if len(v) < need}
    if short:
        ap.error(f"--per-domain/--concurrency: {need} distinct prompts per domain needed, only {short} held out")
    machine = f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cores, {base.model.dtype}".strip()
    res = BenchResult(machine=machine, settings=vars(a))
    all_results: list[RequestResult] = []
    all_spec: list[dict] = []
    for s in systems:
        print(f"system {s} ...", file=sys.stderr)
        rs, spec, start, rss = bench_system(s, base, prompts, concs, a.max_new_tokens, temps, out, a.per_domain)
        all_results += rs
        all_spec += spec
        res.start_seconds[s] = start
        res.rss_bytes[s] = rss
        print(f"  {s}: healthy after {start:.0f}s, resident memory {rss / 2**30:.2f} GiB", file=sys.stderr)
    res.requests = [asdict(r) | {"user_tps": r.user_tps} for r in all_results]
    rows = summarize(all_results)
    print_table(rows, machine)
    (out / "results.json").write_text(json.dumps({"machine": machine, "settings": vars(a), "summary": rows,
                                                  "requests": res.requests, "spec": all_spec, "start_seconds": res.start_seconds,
                                                  "rss_bytes": res.rss_bytes}, indent=1))
    for p in plot(rows, out, machine) + plot_spec(all_spec, out, machine):
        print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
