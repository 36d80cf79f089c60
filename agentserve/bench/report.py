"""The headline table and plots every bench prints: end-to-end latency, time to first token
and total throughput with their ratios to plain first; decode-only per-user tok/s and τ after."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Sequence

# (column key, header, width, format); ratios: system ÷ plain of the same invocation
COLUMNS: list[tuple[str, str, int, str]] = [
    ("e2e_mean", "e2e s", 7, ".2f"), ("e2e_p95", "p95", 6, ".2f"), ("e2e_ratio", "x plain", 7, ".2f"),
    ("ttft_mean", "ttft s", 7, ".2f"), ("ttft_p95", "p95", 6, ".2f"), ("ttft_ratio", "x plain", 7, ".2f"),
    ("total_tps", "total tok/s", 11, ".2f"), ("total_ratio", "x plain", 7, ".2f"),
    ("user_tps", "| decode tok/s/user", 18, ".2f"), ("user_ratio", "x plain", 7, ".2f"), ("tau", "tau", 5, ".2f"),
    ("n", "n", 3, "d"),
]


def machine(dtype: str) -> str:
    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, {dtype}".replace("  ", " ")


def mode(warmup_s: float) -> str:
    return f"warm ({warmup_s:g} s of warm-up traffic per server)" if warmup_s > 0 else "cold (one warm-up request per server)"


def _cell(value: Any, width: int, fmt: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def table(rows: Sequence[dict[str, Any]], keys: Sequence[str], extra: Sequence[tuple[str, str, int, str]] = ()) -> list[str]:
    """The table's lines: label columns, then the headline, then the secondary ones."""
    widths = {k: max([len(k)] + [len(f"{r[k]:g}" if isinstance(r[k], float) else str(r[k])) for r in rows]) for k in keys}
    sw = max([6] + [len(r["system"]) for r in rows])
    cols = [*COLUMNS, *extra]
    head = " ".join(f"{k:>{widths[k]}}" for k in keys) + f" {'system':{sw}} " + " ".join(f"{h:>{w}}" for _, h, w, _ in cols)
    out = [head]
    for r in rows:
        labels = " ".join(f"{(f'{r[k]:g}' if isinstance(r[k], float) else str(r[k])):>{widths[k]}}" for k in keys)
        out.append(f"{labels} {r['system']:{sw}} " + " ".join(_cell(r.get(k), w, f) for k, _, w, f in cols))
    return out


def print_report(rows: Sequence[dict[str, Any]], keys: Sequence[str], machine_desc: str, warmup_s: float,
                 extra: Sequence[tuple[str, str, int, str]] = ()) -> None:
    print(f"\nmachine: {machine_desc}; {mode(warmup_s)}")
    print("headline per request: end-to-end latency and time to first token (mean, p95, mean ÷ plain's: < 1 is "
          "faster), total tok/s = tokens ÷ makespan of the level (÷ plain's: > 1 is more); after '|': decode-only "
          "per-user tok/s = (tokens-1) ÷ (end - first token), which leaves out queueing and prefill")
    for line in table(rows, keys, extra):
        print(line)


def print_drift(drift: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """plain#2 ÷ plain per cell: how much faster or slower the machine ran at the end of the run."""
    print("\ndrift: plain run again at the end ÷ plain at the start (total tok/s, mean end-to-end latency); "
          "the other systems' ratios are against the faster of the two")
    for d in drift:
        labels = " ".join(f"{k}={d[k]:g}" if isinstance(d[k], float) else f"{k}={d[k]}" for k in keys)
        print(f"  {labels}: total tok/s x{_cell(d['total_ratio'], 5, '.2f').strip()}, "
              f"e2e x{_cell(d['e2e_ratio'], 5, '.2f').strip()}")


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_headline(rows: Sequence[dict[str, Any]], group: Sequence[str], path: Path, title: str) -> Path:
    """Two panels of bars per group: end-to-end latency ÷ plain and total throughput ÷ plain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(tuple(r[k] for k in group) for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(groups) * max(1, len(systems)) / 2), 4))
    w = 0.8 / max(1, len(systems))
    for ax, metric, label in ((axes[0], "e2e_ratio", "end-to-end latency ÷ plain (lower is better)"),
                              (axes[1], "total_ratio", "total tok/s ÷ plain (higher is better)")):
        for i, s in enumerate(systems):
            vals = [next((r[metric] or 0 for r in rows if r["system"] == s and tuple(r[k] for k in group) == g), 0) for g in groups]
            ax.bar([j + i * w for j in range(len(groups))], vals, w, label=s)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks([j + w * (len(systems) - 1) / 2 for j in range(len(groups))],
                      [" ".join(f"{k[:4]}={v:g}" if isinstance(v, float) else f"{k[:4]}={v}" for k, v in zip(group, g))
                       for g in groups], fontsize=7, rotation=20)
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
