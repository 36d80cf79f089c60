"""Panels of the operator console. Each panel has an ``update_from`` taking the console's state;
they render plain Rich text so that a missing metric is simply shown as "n/a"."""

from __future__ import annotations

from collections import deque
from typing import Iterable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from console.metrics import AgentsSnapshot, MetricsSnapshot, Window

NA = "n/a"


# ---------------------------------------------------------------------------------------------
# formatting


def fmt_s(v: float | None) -> str:
    if v is None:
        return NA
    if v < 1.0:
        return f"{v * 1000:.0f} ms" if v >= 0.01 else f"{v * 1000:.1f} ms"
    return f"{v:.2f} s"


def fmt_f(v: float | None, digits: int = 2, suffix: str = "") -> str:
    return NA if v is None else f"{v:.{digits}f}{suffix}"


def fmt_i(v: float | None) -> str:
    return NA if v is None else f"{int(round(v))}"


def fmt_pct(v: float | None) -> str:
    return NA if v is None else f"{v * 100:.0f}%"


def bar(frac: float | None, width: int = 20) -> str:
    if frac is None:
        return "·" * width
    frac = max(0.0, min(1.0, frac))
    full = int(round(frac * width))
    return "█" * full + "░" * (width - full)


def scatter_text(points: Iterable[tuple[float, float]], width: int, height: int) -> str:
    """A character scatter plot (x right, y up) with the axis ranges in the corners."""
    pts = [(x, y) for x, y in points if x is not None and y is not None]
    width, height = max(8, width), max(3, height)
    if not pts:
        return "\n".join(["(no speculative steps yet)"] + [""] * (height - 1))
    x_hi = max(max(x for x, _ in pts), 1.0)
    y_hi = max(max(y for _, y in pts), 1.0)
    left = len(f"{y_hi:.0f}") + 1
    cols = max(4, width - left)
    grid = [[" "] * cols for _ in range(height - 1)]
    for x, y in pts:
        c = min(cols - 1, int(round(x / x_hi * (cols - 1))))
        r = (height - 2) - min(height - 2, int(round(y / y_hi * (height - 2))))
        grid[r][c] = "●" if grid[r][c] == "•" else "•"
    lines = []
    for i, row in enumerate(grid):
        lab = f"{y_hi:.0f}" if i == 0 else ("0" if i == height - 2 else "")
        lines.append(f"{lab:>{left - 1}}│" + "".join(row))
    xlab = f"0 batch size → {x_hi:.0f}"
    lines.append(" " * left + xlab[:cols])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# panels


class Panel(Vertical):
    DEFAULT_CSS = """
    Panel { border: round $primary; padding: 0 1; height: 1fr; }
    Panel.stale { border: round $error; }
    """

    def __init__(self, title: str, **kw):
        super().__init__(**kw)
        self.border_title = title

    def set_stale(self, stale: bool) -> None:
        self.set_class(stale, "stale")


class AcceptancePanel(Panel):
    """tau over time (sparkline of sglang:spec_accept_length) and acceptance per draft position."""

    DEFAULT_CSS = """
    AcceptancePanel Sparkline { height: 3; margin: 0 0 1 0; }
    """
    HISTORY = 120

    def __init__(self, **kw):
        super().__init__("acceptance τ", **kw)
        self.tau_history: deque[float] = deque(maxlen=self.HISTORY)

    def compose(self) -> ComposeResult:
        yield Static(NA, id="tau-label")
        yield Sparkline([], id="tau-spark", summary_function=max)
        yield Static("", id="positions")

    def update_from(self, snap: MetricsSnapshot, win: Window) -> None:
        if snap.accept_length is not None:
            self.tau_history.append(snap.accept_length)
        self.query_one("#tau-spark", Sparkline).data = list(self.tau_history)
        lo = f"{min(self.tau_history):.2f}" if self.tau_history else NA
        hi = f"{max(self.tau_history):.2f}" if self.tau_history else NA
        self.query_one("#tau-label", Static).update(
            f"τ (accept length) {fmt_f(snap.accept_length)}   accept rate {fmt_pct(snap.accept_rate)}"
            f"   range [{lo}, {hi}]")
        t = Text()
        if not win.acceptance_by_pos:
            t.append("per-position acceptance: n/a (no agentserve speculative worker metrics)", "dim")
        else:
            t.append("per-position acceptance\n", "bold")
            for pos, frac in win.acceptance_by_pos.items():
                ver = snap.verified_by_pos.get(pos, 0.0)
                t.append(f"pos {pos:>2} ")
                t.append(bar(frac, 20), "green" if frac >= 0.5 else "yellow")
                t.append(f" {frac * 100:5.1f}%  ({ver:.0f} verified)\n")
        if snap.fallbacks:
            t.append("drafter fallbacks: " + ", ".join(f"{k}={v:.0f}" for k, v in sorted(snap.fallbacks.items())),
                     "yellow")
        self.query_one("#positions", Static).update(t)


class LoadPanel(Panel):
    """Requests running/queued, KV usage, throughput, latency and the verify budget."""

    DEFAULT_CSS = """
    LoadPanel #scatter { height: 1fr; min-height: 5; }
    """
    POINTS = 60

    def __init__(self, **kw):
        super().__init__("load", **kw)
        self.points: deque[tuple[float, float]] = deque(maxlen=self.POINTS)

    def compose(self) -> ComposeResult:
        yield Static(NA, id="load-text")
        yield Static("", id="scatter")

    def update_from(self, snap: MetricsSnapshot, win: Window) -> None:
        t = Text()
        t.append("running ", "bold")
        t.append(f"{fmt_i(snap.running):>4}", "cyan")
        t.append("   queued ", "bold")
        t.append(f"{fmt_i(snap.queued):>4}", "cyan")
        t.append("   requests done ", "bold")
        t.append(fmt_i(snap.requests_total), "cyan")
        t.append("\nKV usage ", "bold")
        t.append(bar(snap.token_usage, 24), "magenta")
        t.append(f" {fmt_pct(snap.token_usage)}")
        # sglang:generation_tokens_total grows when requests finish; gen_throughput is the
        # scheduler's decode rate (0 between its log intervals).
        t.append("\ngen tok/s ", "bold")
        t.append(fmt_f(win.gen_tokens_per_s, 1))
        t.append("   decode tok/s ", "bold")
        t.append(fmt_f(snap.gen_throughput, 1))
        t.append("   tokens generated ", "bold")
        t.append(fmt_i(snap.generation_tokens))
        t.append("\nTTFT p50/p95 ", "bold")
        t.append(f"{fmt_s(win.ttft_p50)} / {fmt_s(win.ttft_p95)}")
        t.append("   ITL p50/p95 ", "bold")
        t.append(f"{fmt_s(win.itl_p50)} / {fmt_s(win.itl_p95)}")
        t.append("\nverify budget/step ", "bold")
        t.append(fmt_f(win.verify_budget_mean, 1))
        t.append("   mean verify width ", "bold")
        t.append(fmt_f(win.verify_width_mean, 2))
        t.append("   batch ", "bold")
        t.append(fmt_f(win.batch_size_mean, 1))
        if snap.step_seconds:
            t.append("\nstep phases (mean) ", "bold")
            t.append("  ".join(f"{p} {fmt_s(h.mean)}" for p, h in snap.step_seconds.items()))
        self.query_one("#load-text", Static).update(t)
        if win.steps and win.batch_size_mean is not None and win.verify_budget_mean is not None:
            self.points.append((win.batch_size_mean, win.verify_budget_mean))
        sc = self.query_one("#scatter", Static)
        w = max(20, sc.size.width or 40)
        h = max(4, sc.size.height or 5)
        sc.update(Text("verify budget vs batch size\n", "bold") + Text(scatter_text(self.points, w, h - 1)))


class TiersPanel(Panel):
    """Attainment per interactivity tier, from the per-agent endpoint."""

    def __init__(self, **kw):
        super().__init__("tiers", **kw)

    def compose(self) -> ComposeResult:
        yield Static(NA, id="tiers-text")

    def update_from(self, agents: AgentsSnapshot, win: Window | None = None) -> None:
        t = Text()
        stalled = win.stalled_streams if win is not None else {}
        held = win.held if win is not None else {}
        if not agents.available:
            t.append(f"n/a — per-agent endpoint: {agents.note or 'unavailable'}", "dim")
        elif not agents.tiers:
            t.append("no tiers reported", "dim")
        else:
            for tier in agents.tiers:
                t.append(f"{tier.name:<12}", "bold")
                color = "green" if (tier.attainment or 0) >= 0.9 else ("yellow" if (tier.attainment or 0) >= 0.5 else "red")
                t.append(bar(tier.attainment, 16), color)
                t.append(f" {fmt_pct(tier.attainment):>4}")
                t.append(f"  target {fmt_f(tier.target_tokens_per_s, 0)} tok/s", "dim")
                t.append(f"  admitted {fmt_i(tier.admitted)} queued {fmt_i(tier.queued)} refused {fmt_i(tier.refused)}")
                if tier.name in stalled:  # streams of the tier standing still for others' prefills
                    t.append(f"  prefill-stalled {stalled[tier.name]:.1f}", "yellow" if stalled[tier.name] >= 0.5 else "dim")
                if tier.name in held:  # waiting requests prefill pacing holds back for a promise
                    t.append(f"  prefill-held {held[tier.name]:.0f}", "yellow")
                t.append("\n")
        self.query_one("#tiers-text", Static).update(t)


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar { height: 1; padding: 0 1; background: $success-darken-2; }
    StatusBar.down { background: $error; }
    """

    def show(self, url: str, snap: MetricsSnapshot | None, interval: float, last_ok_age: float | None) -> None:
        if snap is None:
            self.set_class(False, "down")
            self.update(f"connecting to {url} …")
        elif not snap.connected:
            self.set_class(True, "down")
            age = f", last data {last_ok_age:.0f}s ago" if last_ok_age is not None else ""
            self.update(f"DISCONNECTED from {url}: {snap.error}{age} — retrying every {interval:g}s")
        else:
            self.set_class(False, "down")
            extra = f"  ({snap.malformed_lines} malformed metric lines skipped)" if snap.malformed_lines else ""
            if not snap.has_metrics:
                extra += "  (no sglang metrics exported: is --enable-metrics on?)"
            self.update(f"connected to {url}  · polling every {interval:g}s{extra}")
