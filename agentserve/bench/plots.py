"""Plots of the worker's counters (agentserve/bench/prom.py) around each workload."""

from __future__ import annotations

from pathlib import Path

from agentserve.bench.report import save_figure


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
