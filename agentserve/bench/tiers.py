"""`agentserve bench --tiers`: interactivity tiers under rising load, four systems in one run.

Systems (same model, prompts, tiers and load, started one after another):
  plain       no speculation, tiers only label requests (no admission control)
  verify_all  our worker (hybrid drafting), every draft verified, no admission control
  throughput  our worker, the paper's Algorithm 1 alone, no admission control
  tier_aware  our worker, Algorithm 1 with tier weights/caps + tier admission control
A system name may end in "+mixed": the same system with SGLang's --enable-mixed-chunk (a new
request's prefill runs in one batch with a decode token of every running request, so running
streams do not stand still while it is prefilled), e.g. --systems plain,plain+mixed; and in
"@FIELD=VALUE" (repeatable): the same system with that profile field set, e.g.
tier_aware@admission_margin=0 or tier_aware@server.chunked_prefill_size=256 (a dotted FIELD
is a nested one; an ablation in the same run; the value is YAML).
Load: at each concurrency C, C closed-loop clients (agent ids client-0..C-1, tiers assigned
round-robin from --mix) each send --requests prompts of --domain via /generate. Per tier:
attainment (completed requests whose per-user tok/s met the target), mean per-user tok/s,
completed ("done": under steady load, how much each tier got through), refused (429/503);
per level: total tok/s and verify budget per request (worker counters). Ratios against plain
at the same level are the headline. Steady load (--duration S): clients keep sending until S s
into the level, and only [--warmup, S] counts: total tok/s is the tokens generated in it (a
straddling request counts for its share), per-tier numbers are of the requests that finished
in it. A fixed request count ends in a tail where the tiers held back run alone at a small
batch; a server under an agent fleet's constant load has no such tail. Also per tier: when
its last request finished in the level (a tier held back finishes in a tail at a small
batch, which total tok/s pays for), and each refused request's status, wait and the gate's
reason.
Prefill stalls: the speculative systems run with AGENTSERVE_STEP_TRACE (one JSON line per
decode step: its requests, and the prefill seconds run since the previous decode step), and
each request is sent with its own rid, so every request's decode time splits into the time
its stream stood still while other requests were prefilled and the rest. Per tier the table
prints that stall share for the requests that met the target and for those that missed it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agentserve.bench import metrics, report
from agentserve.bench.args import add_warmup, parse_list, positive_int
from agentserve.bench.client import RequestRecord, send, warm_up
from agentserve.bench.prom import scrape, spec_delta
from agentserve.bench.systems import REPO
from agentserve.bench.tier_systems import DEFAULT_SYSTEMS, TIER_SYSTEMS, base_system, tier_profile
from agentserve.bench.tiers_report import plot, print_table
from agentserve.bench.workload import load_prompts, warmup_prompts
from agentserve.profile import Tier, load_profile
from agentserve.server.procs import ServerProcess

__all__ = ["TIER_SYSTEMS", "tier_profile", "run_level", "summarize", "add_stalls", "read_trace", "out_of_prompts"]


def one_request(url: str, agent: str, tier: str, ids: list[int], max_new: int, rid: str | None = None,
                labels: dict[str, Any] | None = None) -> RequestRecord:
    return send(url, ids, max_new, 0.0, headers={"x-agent-id": agent, "x-agent-tier": tier}, rid=rid,
                labels={**(labels or {}), "tier": tier})


def run_level(url: str, conc: int, mix: list[str], prompts: list[list[int]], per_client: int, max_new: int,
              tag: str = "", duration: float | None = None, labels: dict[str, Any] | None = None
              ) -> tuple[list[RequestRecord], float]:
    """`prompts`: this level's own conc x per_client prompts (a prompt an earlier level sent
    would be copied from the radix tree, which measures the cache, not the load).
    `duration`: steady load: a client starts no request after this many seconds into the
    level (per_client is then only the most it may send). The records' times come back as
    seconds into the level."""
    def client(k: int) -> list[RequestRecord]:
        tier = mix[k % len(mix)]
        out = []
        for j in range(per_client):
            if duration is not None and time.perf_counter() - t0 >= duration:
                break
            ids = prompts[(k * per_client + j) % len(prompts)]
            out.append(one_request(url, f"client-{k}", tier, ids, max_new, rid=f"{tag}c{conc}-{k}-{j}" if tag else None,
                                   labels={**(labels or {}), "concurrency": conc, "client": k}))
            if not out[-1].ok:
                time.sleep(1.0)  # back off as a client told Retry-After would
        return out

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(conc) as ex:
        res = [r for rs in ex.map(client, range(conc)) for r in rs]
    wall = time.perf_counter() - t0
    for r in res:  # seconds into the level: the window and each tier's tail are read on this clock
        r.t_send, r.t_end = r.t_send - t0, r.t_end - t0
        r.t_first = None if r.t_first is None else r.t_first - t0
    return res, wall


def read_trace(path: Path) -> list[dict]:
    """The decode-step trace lines written so far (none when the server wrote no trace)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


def add_stalls(res: list[RequestRecord], steps: list[dict]) -> None:
    """Each request's prefill stall: the prefill seconds of the gaps before the decode steps
    it was waiting in (it was in the step before too), and that as a share of its decode time."""
    stall: dict[str, float] = {}
    for st in steps:
        for rid, waited in zip(st.get("rids") or [], st.get("waited") or []):
            if waited:
                stall[rid] = stall.get(rid, 0.0) + float(st.get("prefill_s") or 0.0)
    for r in res:
        if r.rid and (r.rid in stall or steps):
            decode = r.t_end - r.t_first if r.t_first is not None else None
            r.extra["stall_s"] = stall.get(r.rid, 0.0)
            r.extra["stall_share"] = r.extra["stall_s"] / decode if decode else None


def _stall_share(rs: list[RequestRecord]) -> float | None:
    return metrics.mean(r.extra.get("stall_share") for r in rs)


def tier_summary(t: Tier, rs: list[RequestRecord]) -> dict[str, Any]:
    """One tier's numbers at one level: attainment (completed requests whose decode-only tok/s
    met the target), latency and time to first token (admission queue + prefill: what holding
    requests back costs shows here, not in tok/s), stalls, and when its last request finished."""
    done = [r for r in rs if r.ok and metrics.decode_tps(r) is not None]
    target = t.target_tokens_per_s
    met = [r for r in done if target and (metrics.decode_tps(r) or 0) >= target]
    missed = [r for r in done if target and (metrics.decode_tps(r) or 0) < target]
    s = metrics.summary(done)
    return {"sent": len(rs), "completed": len(done), "refused": len(rs) - len(done),
            "attainment": len(met) / len(done) if target and done else None, "user_tps": s["user_tps"],
            "e2e_mean": s["e2e_mean"], "e2e_p95": s["e2e_p95"], "ttft_mean": s["ttft_mean"], "ttft_p95": s["ttft_p95"],
            "stall_share": _stall_share(done), "stall_share_met": _stall_share(met), "stall_share_missed": _stall_share(missed),
            "done_at": max((r.t_end for r in rs), default=None)}


def summarize(system: str, conc: int, res: list[RequestRecord], wall: float, spec: dict, tiers: list[Tier],
              window: tuple[float, float] | None = None) -> dict:
    """One level of one system (record times in seconds into the level). The headline is over
    every tier's requests. `window` (steady load): total tok/s is the tokens generated inside
    it over its length, and latencies and the per-tier numbers are of the requests that
    finished inside it; the warm-up burst before it and the drain after it are left out."""
    every = res
    if window:
        res = [r for r in res if window[0] < r.t_end <= window[1]]
    head = metrics.summary(res)
    head["total_tps"] = metrics.summary(every, window)["total_tps"] if window else sum(r.tokens for r in every) / wall
    row = {"system": system, "concurrency": conc, **head, "span_tps": sum(r.tokens for r in every) / wall,
           "window": window, "budget_per_request": spec.get("budget_per_request"),
           "tiers": {t.name: tier_summary(t, [r for r in res if r.labels.get("tier") == t.name]) for t in tiers}}
    row["requests"] = [r.to_json() for r in every]  # each request's tier, status, tokens, times and τ
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="agentserve bench tiers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=str(REPO / "profiles" / "cpu-dspark.yaml"))
    ap.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"from {','.join(TIER_SYSTEMS)}")
    ap.add_argument("--concurrency", default="1,2,4", help="levels; a 2-core CPU saturates at a few agents")
    ap.add_argument("--targets", default="interactive=20,standard=10,batch=0", help="tier=tok/s in priority order; 0 = best effort")
    ap.add_argument("--mix", default="interactive,standard,batch,standard", help="tiers of clients 0,1,2,.. round-robin")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--domain", default="code", choices=["code", "math", "chat", "agent"],
                    help="prompt set (agent traces are 1-3.5k tokens: slow to prefill on a CPU)")
    ap.add_argument("--max-agent-prompt", type=positive_int, default=768,
                    help="agent domain: cut each trace before the last assistant turn starting within this many tokens")
    ap.add_argument("--duration", type=float, default=0.0,
                    help="steady load: clients keep sending for this many seconds per level (--requests is then "
                         "the most each may send); total tok/s counts the tokens generated between --warmup and "
                         "this, per-tier numbers the requests that finished in that window. 0 = fixed request counts")
    ap.add_argument("--warmup", type=float, default=20.0, help="steady load: seconds of the level left out at its start")
    add_warmup(ap)
    ap.add_argument("--quick", action="store_true", help="levels 1,4 and 1 request per client")
    ap.add_argument("--out", default="bench_out/tiers")
    a = ap.parse_args(argv)
    if a.quick:
        a.concurrency, a.requests = "1,4", 1
    systems = [s for s in a.systems.split(",") if s]
    try:
        bad = [s for s in systems if base_system(s) not in TIER_SYSTEMS]
    except ValueError as e:
        ap.error(str(e))
    if bad:
        ap.error(f"--systems: unknown {bad}; choose from {list(TIER_SYSTEMS)}")
    # --targets sets each tier's speed and order; a tier the base profile names keeps its min_share
    base = load_profile(a.profile)
    floors = {t.name: t.min_share for t in base.interactivity_tiers}
    tiers = []
    for prio, item in enumerate(a.targets.split(",")):
        name, _, val = item.partition("=")
        try:
            target = float(val)
        except ValueError:
            ap.error(f"--targets: '{item}' is not tier=tok/s")
        tiers.append(Tier(name=name, target_tokens_per_s=target or None, priority=prio, on_overload="queue",
                          queue_timeout_s=60.0, min_share=floors.get(name)))
    if a.duration < 0 or (a.duration and not 0 <= a.warmup < a.duration):
        ap.error("--duration/--warmup: need 0 <= warmup < duration")
    window = (a.warmup, a.duration) if a.duration else None
    mix = a.mix.split(",")
    if set(mix) - {t.name for t in tiers}:
        ap.error(f"--mix: tiers {sorted(set(mix) - {t.name for t in tiers})} are not in --targets")
    concs = parse_list(ap, "--concurrency", a.concurrency, int)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    profiles = {}
    for s in systems:  # every system's profile before any server starts: a bad @FIELD=VALUE is named now
        try:
            profiles[s] = tier_profile(base, s, tiers)
        except ValidationError as e:
            ap.error(f"--systems: '{s}': " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))
        except ValueError as e:
            ap.error(str(e))
    from transformers import AutoTokenizer

    need = 1 + sum(c * a.requests for c in concs)  # one for the warm-up
    tok = AutoTokenizer.from_pretrained(base.model.path)
    prompts = load_prompts(need, tok, max_agent_prompt=a.max_agent_prompt).get(a.domain) or []
    if len(prompts) < need:
        ap.error(f"--domain: {need} distinct '{a.domain}' prompts needed for these levels, {len(prompts)} held out")
    starts = {c: 1 + sum(x * a.requests for x in concs[:i]) for i, c in enumerate(concs)}
    warm = warmup_prompts(max(concs), tok, [a.domain], need, a.max_agent_prompt) if a.warmup_s else []
    machine = report.machine(base.model.dtype)
    rows = []
    for s in systems:
        print(f"system {s} ...", file=sys.stderr)
        trace = out / f"trace-{s}.jsonl"
        trace.unlink(missing_ok=True)
        env = {"AGENTSERVE_STEP_TRACE": str(trace.resolve())} if TIER_SYSTEMS[base_system(s)][0] != "plain" else {}
        with ServerProcess(profiles[s], log_path=out / f"bench-tiers-{s}.log", extra_env=env) as srv:
            one_request(srv.url, "warmup", tiers[-1].name, prompts[0], 8)
            warm_up(srv.url, warm, a.warmup_s, max(concs), a.max_new_tokens,
                    headers={"x-agent-id": "warmup", "x-agent-tier": tiers[-1].name})
            for c in concs:
                before = scrape(srv.url)
                level = prompts[starts[c]: starts[c] + c * a.requests]
                res, wall = run_level(srv.url, c, mix, level, a.requests, a.max_new_tokens, tag=f"{s}-",
                                      duration=a.duration or None, labels={"system": s})
                add_stalls(res, read_trace(trace))
                rows.append(summarize(s, c, res, wall, spec_delta(before, scrape(srv.url)), tiers, window))
                short = rows[-1]["ran_out"] = out_of_prompts(res, c, a.requests, window)
                if short:
                    print(f"  warning: clients {short} sent all {a.requests} requests before the window ended "
                          "(the load was not steady): raise --requests", file=sys.stderr)
                print(f"  {s:19s} c={c:<2d} e2e {rows[-1]['e2e_mean'] or 0:6.2f} s, total tok/s {rows[-1]['total_tps']:6.2f} "
                      + " ".join(f"{k}:{v['attainment'] if v['attainment'] is None else round(v['attainment'], 2)}"
                                 for k, v in rows[-1]["tiers"].items()), file=sys.stderr)
    metrics.add_ratios(rows, ("concurrency",), lambda name: base_system(name) == "plain")
    print_table(rows, tiers, machine, a.warmup_s)
    (out / "tiers.json").write_text(json.dumps({"machine": machine, "mode": "warm" if a.warmup_s else "cold",
                                                "settings": vars(a), "rows": rows}, indent=1))
    for p in plot(rows, tiers, out, machine):
        print(f"wrote {p}", file=sys.stderr)
    return 0


def out_of_prompts(res: list[RequestRecord], conc: int, per_client: int, window: tuple[float, float] | None) -> list[int]:
    """Steady load: the clients that ran out of prompts before the window's end."""
    if not window:
        return []
    sent = [[r for r in res if r.labels.get("client") == k] for k in range(conc)]
    return [k for k, rs in enumerate(sent) if len(rs) >= per_client and max(r.t_end for r in rs) < window[1]]


if __name__ == "__main__":
    sys.exit(main())
