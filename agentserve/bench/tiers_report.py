"""`agentserve bench tiers`' table and plot: the headline per level and system first (latency,
time to first token, total throughput, each against plain), then each tier's attainment, time
to first token, tail and prefill stalls."""

from __future__ import annotations

from pathlib import Path

from agentserve.bench import report
from agentserve.bench.tier_systems import order
from agentserve.profile import Tier


def _sorted(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["concurrency"], order(r["system"])))


def print_table(rows: list[dict], tiers: list[Tier], machine: str, warmup_s: float = 0.0) -> None:
    rows = _sorted(rows)
    print(f"\nmachine: {machine}; {report.mode(warmup_s)}; targets "
          + ", ".join(f"{t.name} {t.target_tokens_per_s or 'best effort'}" for t in tiers))
    win = next((r["window"] for r in rows if r.get("window")), None)
    if win:
        print(f"steady load: clients send until {win[1]:.0f} s; total tok/s = tokens generated in [{win[0]:.0f}, "
              f"{win[1]:.0f}] s, latencies and per tier = requests finished in it (level: tok/s over the whole level, "
              "warm-up and drain included)")
    print("headline per level (x plain: against the fastest plain system of the run at that concurrency)")
    extra = [("budget_per_request", "budget/req", 10, ".2f")] + ([("span_tps", "level", 7, ".2f")] if win else [])
    for line in report.table(rows, ("concurrency",), extra):
        print(line)
    for r in rows:
        if r.get("ran_out"):
            print(f"     not steady: c={r['concurrency']} {r['system']}: clients {r['ran_out']} sent all their requests "
                  "before the window ended")
    w = max([19] + [len(r["system"]) for r in rows])
    head = f"\n{'conc':>4} {'system':{w}}"
    for t in tiers:
        head += f" | {t.name[:11]:>11} att  tok/s done ref"
    print(head + "   (per tier: attainment of the target on decode-only tok/s, that tok/s, completed, refused)")
    for r in rows:
        line = f"{r['concurrency']:>4} {r['system']:{w}}"
        for t in tiers:
            v = r["tiers"][t.name]
            att = "  - " if v["attainment"] is None else f"{v['attainment']:4.0%}"
            tps = "    -" if v["user_tps"] is None else f"{v['user_tps']:5.1f}"
            line += f" | {'':>11} {att} {tps} {v['completed']:>4} {v['refused']:>3}"
        print(line)
    if any(v.get("ttft_mean") is not None for r in rows for v in r["tiers"].values()):
        print("\nper tier: time to first token (admission queue + prefill) and end-to-end latency, s (mean / p95)")
        for r in rows:
            line = f"{r['concurrency']:>4} {r['system']:{w}}"
            for t in tiers:
                v = r["tiers"][t.name]
                cells = ["-" if v.get(k) is None else f"{v[k]:.1f} / {v[k.replace('mean', 'p95')]:.1f}"
                         for k in ("ttft_mean", "e2e_mean")]
                line += f" | {t.name[:11]:>11} {cells[0]:>11} {cells[1]:>11}"
            print(line)
    print("\nlast request of each tier done at, s into the level (a tier held back finishes in a tail "
          "at a small batch, which total tok/s pays for); refusals: tier, status after s, the gate's reason")
    for r in rows:
        span = max((v.get("done_at") or 0.0) for v in r["tiers"].values())
        print(f"{r['concurrency']:>4} {r['system']:{w}}"
              + "".join(f" | {t.name[:11]:>11} {r['tiers'][t.name].get('done_at') or 0:6.0f}" for t in tiers)
              + f" | of {span:.0f}")
        for q in r.get("requests", []):
            if q["status"] != 200:
                print(f"     {q['tier']} {q['status']} after {q['e2e_s']:.0f} s: {q.get('reason') or '?'}")
    traced = [r for r in rows if any(v.get("stall_share") is not None for v in r["tiers"].values())]
    if traced:
        print("\nprefill stalls: share of a request's decode time its stream stood still while others were "
              "prefilled (all / met target / missed target)")
        for r in traced:
            line = f"{r['concurrency']:>4} {r['system']:{w}}"
            for t in tiers:
                v = r["tiers"][t.name]
                cells = [v.get(k) for k in ("stall_share", "stall_share_met", "stall_share_missed")]
                line += f" | {t.name[:11]:>11} " + " / ".join("  -" if x is None else f"{x:3.0%}" for x in cells)
            print(line)


def plot(rows: list[dict], tiers: list[Tier], out: Path, machine: str) -> list[Path]:
    """The headline ratios per level, and throughput vs the top tier's speed, its attainment
    and the verify budget per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _sorted(rows)
    paths = [report.plot_headline(rows, ("concurrency",), out / "tiers_headline.png",
                                  f"interactivity tiers: end-to-end latency and total throughput vs plain — {machine}")]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    top = tiers[0].name
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for s in systems:
        rs = [r for r in rows if r["system"] == s]
        cs = [r["concurrency"] for r in rs]
        axes[0].plot([r["tiers"][top]["user_tps"] or 0 for r in rs], [r["total_tps"] for r in rs], marker="o", label=s)
        axes[1].plot(cs, [r["tiers"][top]["attainment"] or 0 for r in rs], marker="o", label=s)
        axes[2].plot(cs, [r["budget_per_request"] or 0 for r in rs], marker="o", label=s)
    axes[0].set(xlabel=f"decode-only per-user tok/s of '{top}'", ylabel="total tok/s", title="throughput vs per-user speed")
    axes[1].set(xlabel="concurrency", ylabel=f"'{top}' attainment", ylim=(0, 1.05), title="top-tier attainment")
    axes[2].set(xlabel="concurrency", ylabel="draft tokens verified per request per step", title="verify budget")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"interactivity tiers under load — {machine}", fontsize=9)
    paths.append(report.save_figure(fig, out / "tiers.png"))
    return paths
