"""`agentserve bench --tiers`: interactivity tiers under rising load, four systems in one run.

Systems (same model, prompts, tiers and load, started one after another):
  plain       no speculation, tiers only label requests (no admission control)
  verify_all  our worker (hybrid drafting), every draft verified, no admission control
  throughput  our worker, the paper's Algorithm 1 alone, no admission control
  tier_aware  our worker, Algorithm 1 with tier weights/caps + tier admission control
  tier_aware_live  tier_aware with admission rule (b) on the running streams' live speed
              (admission_live: true); an ablation, not in the default run
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
import platform
import statistics
import sys
import time
from pathlib import Path

import requests
from pydantic import ValidationError

from agentserve.bench.serve import REPO, SYSTEMS, load_prompts, parse_list, positive_int, save_figure, scrape, spec_delta
from agentserve.server.procs import ServerProcess
from agentserve.profile import Profile, Tier, load_profile

TIER_SYSTEMS = {  # system -> (drafter system in bench.SYSTEMS, scheduler, admission control)
    "plain": ("plain", "tier_aware", False),
    "verify_all": ("hybrid", "verify_all", False),
    "throughput": ("hybrid", "throughput", False),
    "tier_aware": ("hybrid", "tier_aware", True),
    "tier_aware_live": ("hybrid", "tier_aware", True),
}
DEFAULT_SYSTEMS = "plain,verify_all,throughput,tier_aware"


MIXED = "+mixed"


def _split(system: str) -> tuple[str, dict[str, object]]:
    """'name[+mixed][@field=value...]' -> ('name[+mixed]', {field: value})."""
    import yaml

    name, *sets = system.split("@")
    fields: dict[str, object] = {}
    for item in sets:
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--systems: '{item}' in '{system}' is not FIELD=VALUE")
        fields[key] = yaml.safe_load(val)
    return name, fields


def _base_system(system: str) -> str:
    name = _split(system)[0]
    return name[: -len(MIXED)] if name.endswith(MIXED) else name


def tier_profile(base: Profile, system: str, tiers: list[Tier]) -> Profile:
    name = _base_system(system)
    drafter_sys, sched, admission = TIER_SYSTEMS[name]
    drafter = SYSTEMS[drafter_sys].model_copy(update={"scheduler": sched})
    update: dict = {"drafter": drafter, "interactivity_tiers": tiers, "default_tier": tiers[-1].name,
                    "admission_control": admission, "agents": {}, "admission_live": name == "tier_aware_live"}
    if _split(system)[0].endswith(MIXED):
        update["server"] = base.server.model_copy(update={"extra_args": [*base.server.extra_args, "--enable-mixed-chunk"]})
    prof = base.model_copy(update=update)
    fields = _split(system)[1]
    if fields:  # validated like a profile file: a bad field or value names itself
        data = prof.model_dump()
        for key, val in fields.items():  # a dotted key sets a nested field: server.chunked_prefill_size=256
            *path, leaf = key.split(".")
            node = data
            for part in path:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"--systems: '{key}' in '{system}': '{part}' is not a profile section")
                node = node[part]
            node[leaf] = val
        prof = Profile.model_validate(data)
    return prof


def one_request(url: str, agent: str, tier: str, ids: list[int], max_new: int, rid: str | None = None) -> dict:
    t0 = time.perf_counter()
    body: dict = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": max_new}}
    if rid:
        body["rid"] = rid
    r = requests.post(url + "/generate", headers={"x-agent-id": agent, "x-agent-tier": tier}, timeout=1800, json=body)
    wall = time.perf_counter() - t0
    if r.status_code in (429, 503):
        try:  # the gate's error names the tier and why it held the request
            reason = r.json()["message"]
        except (ValueError, KeyError, TypeError):
            reason = r.text[:300]
        return {"tier": tier, "status": r.status_code, "tokens": 0, "user_tps": None, "wall": wall, "reason": reason}
    r.raise_for_status()
    m = r.json()["meta_info"]
    n, e2e, ttft = int(m["completion_tokens"]), float(m["e2e_latency"]), float(m.get("first_token_latency") or 0)
    tps = (n - 1) / (e2e - ttft) if n > 1 and e2e > ttft else None
    return {"tier": tier, "status": 200, "tokens": n, "user_tps": tps, "wall": wall, "tau": m.get("spec_accept_length"),
            "rid": rid, "decode_s": max(0.0, e2e - ttft)}


def run_level(url: str, conc: int, mix: list[str], prompts: list[list[int]], per_client: int, max_new: int,
              tag: str = "", duration: float | None = None) -> tuple[list[dict], float]:
    """`prompts`: this level's own conc x per_client prompts (a prompt an earlier level sent
    would be copied from the radix tree, which measures the cache, not the load).
    `duration`: steady load: a client starts no request after this many seconds into the
    level (per_client is then only the most it may send)."""
    def client(k: int) -> list[dict]:
        tier = mix[k % len(mix)]
        out = []
        for j in range(per_client):
            start = time.perf_counter() - t0
            if duration is not None and start >= duration:
                break
            ids = prompts[(k * per_client + j) % len(prompts)]
            out.append(one_request(url, f"client-{k}", tier, ids, max_new, rid=f"{tag}c{conc}-{k}-{j}" if tag else None))
            out[-1]["start"] = start
            out[-1]["end"] = time.perf_counter() - t0  # when it finished in the level (each tier's tail)
            out[-1]["client"] = k
            if out[-1]["status"] != 200:
                time.sleep(1.0)  # back off as a client told Retry-After would
        return out

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(conc) as ex:
        res = [r for rs in ex.map(client, range(conc)) for r in rs]
    return res, time.perf_counter() - t0


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


def add_stalls(res: list[dict], steps: list[dict]) -> None:
    """Each request's prefill stall: the prefill seconds of the gaps before the decode steps
    it was waiting in (it was in the step before too), and that as a share of its decode time."""
    stall: dict[str, float] = {}
    for st in steps:
        for rid, waited in zip(st.get("rids") or [], st.get("waited") or []):
            if waited:
                stall[rid] = stall.get(rid, 0.0) + float(st.get("prefill_s") or 0.0)
    for r in res:
        if r.get("rid") in stall or (steps and r.get("rid")):
            r["stall_s"] = stall.get(r["rid"], 0.0)
            r["stall_share"] = r["stall_s"] / r["decode_s"] if r.get("decode_s") else None


def first_token(done: list[dict]) -> dict:
    """Time to first token as the client saw it (admission queue + prefill): mean and p95.
    What holding requests back for a promise costs shows here, not in per-user tok/s."""
    xs = sorted(r["wall"] - r["decode_s"] for r in done if r.get("decode_s") is not None and r.get("wall") is not None)
    if not xs:
        return {"ttft_mean": None, "ttft_p95": None}
    return {"ttft_mean": statistics.mean(xs), "ttft_p95": xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]}


def window_tokens(res: list[dict], w0: float, w1: float) -> float:
    """Tokens generated within [w0, w1] s into the level. A request's first token is placed at
    its time to first token, the rest spread evenly over its decode time (end - decode_s ..
    end): a request that straddles an edge counts only for its share inside."""
    total = 0.0
    for r in res:
        n = r.get("tokens") or 0
        if n <= 0 or r.get("end") is None:
            continue
        end = r["end"]
        first = end - (r.get("decode_s") or 0.0)
        total += 1.0 if w0 <= first <= w1 else 0.0
        if n > 1 and end > first:
            total += (n - 1) * max(0.0, min(end, w1) - max(first, w0)) / (end - first)
        elif n > 1 and w0 <= end <= w1:  # no decode span: all at once
            total += n - 1
    return total


def summarize(system: str, conc: int, res: list[dict], wall: float, spec: dict, tiers: list[Tier],
              window: tuple[float, float] | None = None) -> dict:
    """`window` (steady load): total tok/s is the tokens generated inside it over its length,
    and the per-tier numbers are of the requests that finished inside it; the warm-up burst
    before it and the drain after it (clients stop sending at its end) are left out."""
    span_tps = sum(r["tokens"] for r in res) / wall
    row = {"system": system, "concurrency": conc, "span_tps": span_tps, "window": window,
           "total_tps": window_tokens(res, *window) / (window[1] - window[0]) if window else span_tps,
           "budget_per_request": spec.get("budget_per_request"), "tiers": {}}
    every = res
    if window:
        res = [r for r in res if r.get("end") is not None and window[0] < r["end"] <= window[1]]
    for t in tiers:
        rs = [r for r in res if r["tier"] == t.name]
        done = [r for r in rs if r["status"] == 200 and r["user_tps"] is not None]
        att = (sum(1 for r in done if r["user_tps"] >= t.target_tokens_per_s) / len(done)
               if t.target_tokens_per_s and done else None)
        def share(rs: list[dict]) -> float | None:
            xs = [r["stall_share"] for r in rs if r.get("stall_share") is not None]
            return statistics.mean(xs) if xs else None

        met = [r for r in done if t.target_tokens_per_s and r["user_tps"] >= t.target_tokens_per_s]
        missed = [r for r in done if t.target_tokens_per_s and r["user_tps"] < t.target_tokens_per_s]
        row["tiers"][t.name] = {"sent": len(rs), "completed": len(done), "refused": len(rs) - len(done),
                                "attainment": att, "user_tps": statistics.mean(r["user_tps"] for r in done) if done else None,
                                "stall_share": share(done), "stall_share_met": share(met), "stall_share_missed": share(missed),
                                **first_token(done), "done_at": max((r["end"] for r in rs if "end" in r), default=None)}
    row["requests"] = every  # each request's tier, status, tokens, tok/s, wall and τ (to see which missed)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="agentserve bench --tiers", description=__doc__,
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
    ap.add_argument("--quick", action="store_true", help="levels 1,4 and 1 request per client")
    ap.add_argument("--out", default="bench_out/tiers")
    a = ap.parse_args(argv)
    if a.quick:
        a.concurrency, a.requests = "1,4", 1
    systems = [s for s in a.systems.split(",") if s]
    try:
        bad = [s for s in systems if _base_system(s) not in TIER_SYSTEMS]
    except ValueError as e:
        ap.error(str(e))
    if bad:
        ap.error(f"--systems: unknown {bad}; choose from {list(TIER_SYSTEMS)}")
    tiers = []
    for prio, item in enumerate(a.targets.split(",")):
        name, _, val = item.partition("=")
        try:
            target = float(val)
        except ValueError:
            ap.error(f"--targets: '{item}' is not tier=tok/s")
        tiers.append(Tier(name=name, target_tokens_per_s=target or None, priority=prio, on_overload="queue",
                          queue_timeout_s=60.0))
    if a.duration < 0 or (a.duration and not 0 <= a.warmup < a.duration):
        ap.error("--duration/--warmup: need 0 <= warmup < duration")
    window = (a.warmup, a.duration) if a.duration else None
    mix = a.mix.split(",")
    if set(mix) - {t.name for t in tiers}:
        ap.error(f"--mix: tiers {sorted(set(mix) - {t.name for t in tiers})} are not in --targets")
    concs = parse_list(ap, "--concurrency", a.concurrency, int)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_profile(a.profile)
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
    prompts = load_prompts(need, AutoTokenizer.from_pretrained(base.model.path),
                           max_agent_prompt=a.max_agent_prompt).get(a.domain) or []
    if len(prompts) < need:
        ap.error(f"--domain: {need} distinct '{a.domain}' prompts needed for these levels, {len(prompts)} held out")
    starts = {c: 1 + sum(x * a.requests for x in concs[:i]) for i, c in enumerate(concs)}
    machine = f"{platform.machine()} {__import__('os').cpu_count()} cores, {base.model.dtype}"
    rows = []
    for s in systems:
        print(f"system {s} ...", file=sys.stderr)
        trace = out / f"trace-{s}.jsonl"
        trace.unlink(missing_ok=True)
        env = {"AGENTSERVE_STEP_TRACE": str(trace.resolve())} if TIER_SYSTEMS[_base_system(s)][0] != "plain" else {}
        with ServerProcess(profiles[s], log_path=out / f"bench-tiers-{s}.log", extra_env=env) as srv:
            one_request(srv.url, "warmup", tiers[-1].name, prompts[0], 8)
            for c in concs:
                before = scrape(srv.url)
                level = prompts[starts[c]: starts[c] + c * a.requests]
                res, wall = run_level(srv.url, c, mix, level, a.requests, a.max_new_tokens, tag=f"{s}-",
                                      duration=a.duration or None)
                add_stalls(res, read_trace(trace))
                rows.append(summarize(s, c, res, wall, spec_delta(before, scrape(srv.url)), tiers, window))
                short = rows[-1]["ran_out"] = out_of_prompts(res, c, a.requests, window)
                if short:
                    print(f"  warning: clients {short} sent all {a.requests} requests before the window ended "
                          "(the load was not steady): raise --requests", file=sys.stderr)
                print(f"  {s:19s} c={c:<2d} total tok/s {rows[-1]['total_tps']:6.2f} "
                      + " ".join(f"{k}:{v['attainment'] if v['attainment'] is None else round(v['attainment'], 2)}"
                                 for k, v in rows[-1]["tiers"].items()), file=sys.stderr)
    print_table(rows, tiers, machine)
    (out / "tiers.json").write_text(json.dumps({"machine": machine, "settings": vars(a), "rows": rows}, indent=1))
    for p in plot(rows, tiers, out, machine):
        print(f"wrote {p}", file=sys.stderr)
    return 0


def out_of_prompts(res: list[dict], conc: int, per_client: int, window: tuple[float, float] | None) -> list[int]:
    """Steady load: the clients that ran out of prompts before the window's end."""
    if not window:
        return []
    sent = [[r for r in res if r.get("client") == k] for k in range(conc)]
    return [k for k, rs in enumerate(sent) if len(rs) >= per_client and max(r["end"] for r in rs) < window[1]]


def _order(system: str) -> tuple[int, str]:
    return list(TIER_SYSTEMS).index(_base_system(system)), system


def print_table(rows: list[dict], tiers: list[Tier], machine: str) -> None:
    print(f"\nmachine: {machine}; targets " + ", ".join(f"{t.name} {t.target_tokens_per_s or 'best effort'}" for t in tiers))
    win = next((r["window"] for r in rows if r.get("window")), None)
    if win:
        print(f"steady load: clients send until {win[1]:.0f} s; total tok/s = tokens generated in [{win[0]:.0f}, "
              f"{win[1]:.0f}] s, per tier = requests finished in it (last column: tok/s over the whole level, warm-up and drain included)")
    w = max([19] + [len(r["system"]) for r in rows])
    head = f"{'conc':>4} {'system':{w}} {'total tok/s':>11} {'x plain':>7} {'budget/req':>10}"
    for t in tiers:
        head += f" | {t.name[:11]:>11} att  tok/s done ref"
    print(head + "   (x plain: against the fastest plain system of the run at that concurrency)")
    plain: dict[int, float] = {}  # the ratio's base: the fastest plain configuration in the run
    for r in rows:
        if _base_system(r["system"]) == "plain":
            plain[r["concurrency"]] = max(plain.get(r["concurrency"], 0.0), r["total_tps"])
    for r in sorted(rows, key=lambda r: (r["concurrency"], _order(r["system"]))):
        ratio = r["total_tps"] / plain[r["concurrency"]] if plain.get(r["concurrency"]) else None
        line = (f"{r['concurrency']:>4} {r['system']:{w}} {r['total_tps']:>11.2f} {ratio or 0:>7.2f} "
                f"{(r['budget_per_request'] or 0):>10.2f}")
        for t in tiers:
            v = r["tiers"][t.name]
            att = "  - " if v["attainment"] is None else f"{v['attainment']:4.0%}"
            tps = "    -" if v["user_tps"] is None else f"{v['user_tps']:5.1f}"
            line += f" | {'':>11} {att} {tps} {v['completed']:>4} {v['refused']:>3}"
        if r.get("window"):
            line += f" | level {r.get('span_tps') or 0:6.2f}"
        print(line)
        if r.get("ran_out"):
            print(f"     not steady: clients {r['ran_out']} sent all their requests before the window ended")
    if any(v.get("ttft_mean") is not None for r in rows for v in r["tiers"].values()):
        print("\ntime to first token, s (admission queue + prefill; mean / p95)")
        for r in sorted(rows, key=lambda r: (r["concurrency"], _order(r["system"]))):
            line = f"{r['concurrency']:>4} {r['system']:{w}}"
            for t in tiers:
                v = r["tiers"][t.name]
                cell = ("-" if v.get("ttft_mean") is None else f"{v['ttft_mean']:.1f} / {v['ttft_p95']:.1f}")
                line += f" | {t.name[:11]:>11} {cell:>11}"
            print(line)
    print("\nlast request of each tier done at, s into the level (a tier held back finishes in a tail "
          "at a small batch, which total tok/s pays for); refusals: tier, status after s, the gate's reason")
    for r in sorted(rows, key=lambda r: (r["concurrency"], _order(r["system"]))):
        span = max((v.get("done_at") or 0.0) for v in r["tiers"].values())
        print(f"{r['concurrency']:>4} {r['system']:{w}}"
              + "".join(f" | {t.name[:11]:>11} {r['tiers'][t.name].get('done_at') or 0:6.0f}" for t in tiers)
              + f" | of {span:.0f}")
        for q in r.get("requests", []):
            if q["status"] != 200:
                print(f"     {q['tier']} {q['status']} after {q['wall']:.0f} s: {q.get('reason', '?')}")
    traced = [r for r in rows if any(v.get("stall_share") is not None for v in r["tiers"].values())]
    if traced:
        print("\nprefill stalls: share of a request's decode time its stream stood still while others were "
              "prefilled (all / met target / missed target)")
        for r in sorted(traced, key=lambda r: (r["concurrency"], _order(r["system"]))):
            line = f"{r['concurrency']:>4} {r['system']:{w}}"
            for t in tiers:
                v = r["tiers"][t.name]
                cells = [v.get(k) for k in ("stall_share", "stall_share_met", "stall_share_missed")]
                line += f" | {t.name[:11]:>11} " + " / ".join("  -" if x is None else f"{x:3.0%}" for x in cells)
            print(line)


def plot(rows: list[dict], tiers: list[Tier], out: Path, machine: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r["system"] for r in rows))
    top = tiers[0].name
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for s in systems:
        rs = sorted((r for r in rows if r["system"] == s), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in rs]
        axes[0].plot([r["tiers"][top]["user_tps"] or 0 for r in rs], [r["total_tps"] for r in rs], marker="o", label=s)
        axes[1].plot(cs, [r["tiers"][top]["attainment"] or 0 for r in rs], marker="o", label=s)
        axes[2].plot(cs, [r["budget_per_request"] or 0 for r in rs], marker="o", label=s)
    axes[0].set(xlabel=f"per-user tok/s of '{top}'", ylabel="total tok/s", title="throughput vs per-user speed")
    axes[1].set(xlabel="concurrency", ylabel=f"'{top}' attainment", ylim=(0, 1.05), title="top-tier attainment")
    axes[2].set(xlabel="concurrency", ylabel="draft tokens verified per request per step", title="verify budget")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"interactivity tiers under load — {machine}", fontsize=9)
    paths.append(save_figure(fig, out / "tiers.png"))
    return paths


if __name__ == "__main__":
    sys.exit(main())
