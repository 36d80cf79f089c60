"""`agentserve console`: a Textual operator console for a running agentserve/SGLang server.

It polls ``/metrics`` and ``/agentserve/v1/agents`` in an async worker (the HTTP calls run in a
thread, so the UI never blocks), shows acceptance, load, tiers and a per-agent table, and keeps
running through server restarts and malformed metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Sparkline, Static

from console.metrics import (AgentRow, AgentsSnapshot, MetricsSnapshot, TierRow, Window,
                             fetch_agents, fetch_snapshot, window)
from console.widgets import (NA, AcceptancePanel, LoadPanel, StatusBar, TiersPanel, fmt_f, fmt_i,
                             fmt_pct, fmt_s)

DEFAULT_URL = "http://127.0.0.1:30000"


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    value: Callable[[AgentRow], Any]      # raw value, for sorting
    text: Callable[[AgentRow], str]       # shown


COLUMNS: list[Column] = [
    Column("agent", "agent", lambda a: a.agent_id, lambda a: a.agent_id),
    Column("tier", "tier", lambda a: a.tier, lambda a: a.tier or NA),
    Column("requests", "reqs", lambda a: a.requests, lambda a: fmt_i(a.requests)),
    Column("running", "run", lambda a: a.running, lambda a: fmt_i(a.running)),
    Column("ttft_p50", "TTFT p50", lambda a: a.ttft_p50_s, lambda a: fmt_s(a.ttft_p50_s)),
    Column("ttft_p95", "TTFT p95", lambda a: a.ttft_p95_s, lambda a: fmt_s(a.ttft_p95_s)),
    Column("itl_p50", "ITL p50", lambda a: a.itl_p50_s, lambda a: fmt_s(a.itl_p50_s)),
    Column("itl_p95", "ITL p95", lambda a: a.itl_p95_s, lambda a: fmt_s(a.itl_p95_s)),
    Column("tok_s", "tok/s", lambda a: a.tokens_per_s, lambda a: fmt_f(a.tokens_per_s, 1)),
    Column("tau", "τ", lambda a: a.accept_length, lambda a: fmt_f(a.accept_length)),
    Column("copy", "copy", lambda a: a.copy_share, lambda a: fmt_pct(a.copy_share)),
]


def sort_agents(agents: list[AgentRow], col: Column, reverse: bool) -> list[AgentRow]:
    """Sorted by ``col``; agents without a value always come last."""
    have = [a for a in agents if col.value(a) is not None]
    missing = [a for a in agents if col.value(a) is None]
    have.sort(key=lambda a: (col.value(a), a.agent_id), reverse=reverse)
    return have + sorted(missing, key=lambda a: a.agent_id)


HELP = """\
[b]agentserve console[/b] — live view of one server

[b]Keys[/b]
  q            quit
  ?            this help (esc closes)
  s / S        sort the agent table by the next / previous column
  r            reverse the sort order
  enter        details of the selected agent (esc goes back)
  ↑ ↓          move in the agent table
  click header sort by that column

[b]Panels[/b]
  acceptance   τ = sglang:spec_accept_length over time; per-position acceptance is
               agentserve:spec_accepted_drafts_total / spec_verified_drafts_total
               over the window (--window, default 10 s; lifetime if nothing was
               verified in it)
  load         running / queued requests, KV token usage, generated tok/s,
               TTFT and ITL percentiles over the window, verify budget per step
               and mean verify width (agentserve:verify_*), and a scatter of the
               verify budget against the speculative batch size, one dot per poll
               (window means)
  tiers        attainment per interactivity tier (from /agentserve/v1/agents), and
               how many of the tier's running streams stood still for other
               requests' prefills, on average over the window
               (agentserve:tier_prefill_stall_seconds_total), and how many of its
               waiting requests prefill pacing holds back for a promise now
               (agentserve:tier_prefill_held_requests)
  agents       per-agent latency percentiles, tok/s, τ, copy share, tier

Values the server does not export are shown as "n/a". When the server goes away the
status bar turns red and the console keeps retrying at the poll interval.
"""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90; height: auto; max-height: 90%; border: thick $primary;
                                  background: $surface; padding: 1 2; }
    """
    BINDINGS = [Binding("escape,question_mark", "app.pop_screen", "close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(HELP, id="help-text")


class AgentScreen(Screen[None]):
    """One agent's numbers, its tier, and its tok/s over time; refreshed at every poll."""

    DEFAULT_CSS = """
    AgentScreen #agent-detail { border: round $primary; padding: 0 1; height: auto; }
    AgentScreen #agent-spark-box { border: round $primary; padding: 0 1; height: 7; }
    AgentScreen Sparkline { height: 4; }
    """
    BINDINGS = [Binding("escape,backspace", "app.pop_screen", "back")]

    def __init__(self, agent_id: str):
        super().__init__()
        self.agent_id = agent_id

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="agent-detail")
        with Vertical(id="agent-spark-box"):
            yield Static("tok/s over time", id="agent-spark-label")
            yield Sparkline([], id="agent-spark", summary_function=max)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"agent {self.agent_id}"
        app = self.app
        if isinstance(app, ConsoleApp):
            self.update_from(app.agents, app.agent_history.get(self.agent_id, []))

    def update_from(self, agents: AgentsSnapshot | None, history: Any) -> None:
        box = self.query_one("#agent-detail", Static)
        box.border_title = f"agent {self.agent_id}"
        row = next((a for a in (agents.agents if agents else []) if a.agent_id == self.agent_id), None)
        t = Text()
        if agents is None or not agents.available:
            t.append(f"per-agent data n/a: {agents.note if agents else 'not polled yet'}", "dim")
        elif row is None:
            t.append(f"agent {self.agent_id} is no longer reported by the server", "yellow")
        else:
            tier = next((x for x in agents.tiers if x.name == row.tier), None)
            for label, val in _agent_fields(row, tier):
                t.append(f"{label:<22}", "bold")
                t.append(f"{val}\n")
        box.update(t)
        self.query_one("#agent-spark", Sparkline).data = list(history)
        last = f"{list(history)[-1]:.1f}" if history else NA
        self.query_one("#agent-spark-label", Static).update(f"tok/s over time (now {last})")


SOURCE_ORDER = ("session", "shared", "radix", "model")


def _agent_fields(a: AgentRow, tier: TierRow | None) -> list[tuple[str, str]]:
    out = [
        ("agent", a.agent_id),
        ("tier", a.tier or NA),
        ("requests", fmt_i(a.requests)),
        ("running", fmt_i(a.running)),
        ("TTFT p50 / p95", f"{fmt_s(a.ttft_p50_s)} / {fmt_s(a.ttft_p95_s)}"),
        ("ITL p50 / p95", f"{fmt_s(a.itl_p50_s)} / {fmt_s(a.itl_p95_s)}"),
        ("tokens/s", fmt_f(a.tokens_per_s, 1)),
        ("τ (accept length)", fmt_f(a.accept_length)),
        ("copy share", fmt_pct(a.copy_share)),
        ("accepted by source", " · ".join(f"{k} {fmt_pct(a.source_share[k])}" for k in SOURCE_ORDER
                                          if k in a.source_share) or NA),
    ]
    if tier is not None:
        meets = NA
        if tier.target_tokens_per_s is not None and a.tokens_per_s is not None:
            meets = "yes" if a.tokens_per_s >= tier.target_tokens_per_s else "NO"
        out += [
            ("tier target tok/s", fmt_f(tier.target_tokens_per_s, 1)),
            ("meets tier target", meets),
            ("tier attainment", fmt_pct(tier.attainment)),
        ]
    return out


class AgentTable(DataTable):
    """The agent table; enter (select) opens the agent's screen and is shown in the footer."""

    BINDINGS = [Binding("enter", "select_cursor", "details", key_display="⏎")]


class ConsoleApp(App[None]):
    TITLE = "agentserve console"
    CSS = """
    #top { height: 16; }
    #tiers { height: auto; max-height: 8; min-height: 3; }
    #agents-box { border: round $primary; height: 1fr; padding: 0 1; }
    #agents-note { height: auto; color: $text-muted; }
    #agents { height: 1fr; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("s", "sort(1)", "sort"),
        Binding("S", "sort(-1)", "sort back", show=False),
        Binding("r", "reverse", "reverse"),
    ]

    def __init__(self, url: str = DEFAULT_URL, interval: float = 1.0, timeout: float | None = None,
                 window_s: float = 10.0):
        super().__init__()
        self.url = url.rstrip("/")
        self.interval = interval
        self.window_s = window_s                          # rates/percentiles over this many seconds
        self.history: deque[MetricsSnapshot] = deque(maxlen=max(2, int(window_s / interval) + 2))
        self.timeout = timeout if timeout is not None else max(1.0, min(5.0, 2 * interval))
        self.snapshot: MetricsSnapshot | None = None      # latest poll (maybe disconnected)
        self.last_ok: MetricsSnapshot | None = None       # latest connected poll
        self.win: Window | None = None
        self.agents: AgentsSnapshot | None = None
        self.agent_history: dict[str, deque[float]] = {}
        self.polls = 0
        self.sort_index = COLUMNS.index(next(c for c in COLUMNS if c.key == "tok_s"))
        self.sort_reverse = True
        self.row_order: list[str] = []
        self.main_screen: Screen | None = None

    # -- layout -------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusBar("", id="status")
        with Horizontal(id="top"):
            yield AcceptancePanel(id="acceptance")
            yield LoadPanel(id="load")
        yield TiersPanel(id="tiers")
        with Vertical(id="agents-box"):
            yield Static(NA, id="agents-note")
            yield AgentTable(id="agents", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def main_widget(self, selector: Any, expect_type: type | None = None) -> Any:
        """A widget of the main screen, whichever screen is on top (App.query_one would search
        the active one: the agent or help screen while they are shown)."""
        screen = self.main_screen or self.screen
        return screen.query_one(selector, expect_type) if expect_type else screen.query_one(selector)

    def on_mount(self) -> None:
        self.main_screen = self.screen
        self.sub_title = self.url
        self.main_widget("#agents-box").border_title = "agents"
        self.main_widget(StatusBar).show(self.url, None, self.interval, None)
        self._fill_table()
        self.main_widget("#agents", DataTable).focus()
        self.run_worker(self._poll_loop(), name="poll", group="poll", exclusive=True)

    # -- polling ------------------------------------------------------------------------------

    def _fetch(self) -> tuple[MetricsSnapshot, AgentsSnapshot | None]:
        snap = fetch_snapshot(self.url, timeout=self.timeout)
        agents = fetch_agents(self.url, timeout=self.timeout) if snap.connected else None
        return snap, agents

    async def _poll_loop(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                snap, agents = await asyncio.to_thread(self._fetch)
            except Exception as e:  # a bug in parsing must not kill the console
                snap, agents = MetricsSnapshot(t=time.monotonic(), connected=False,
                                               error=f"internal error: {type(e).__name__}: {e}"), None
            try:
                self.apply(snap, agents)
            except Exception as e:
                self.log.error(f"console: applying a poll failed: {e!r}")
            await asyncio.sleep(max(0.05, self.interval - (time.monotonic() - t0)))

    def apply(self, snap: MetricsSnapshot, agents: AgentsSnapshot | None) -> None:
        """Show one poll's result (public so that tests and other front-ends can feed it)."""
        self.polls += 1
        self.snapshot = snap
        stale = not snap.connected
        for panel in (self.main_widget(AcceptancePanel), self.main_widget(LoadPanel), self.main_widget(TiersPanel)):
            panel.set_stale(stale)
        if snap.connected:
            self.win = window(self._baseline(snap), snap)
            self.history.append(snap)
            self.last_ok = snap
            self.agents = agents
            self.main_widget(AcceptancePanel).update_from(snap, self.win)
            self.main_widget(LoadPanel).update_from(snap, self.win)
            self.main_widget(TiersPanel).update_from(agents or AgentsSnapshot(False, note="not polled"), self.win)
            if agents is not None and agents.available:
                for a in agents.agents:
                    if a.tokens_per_s is not None:
                        self.agent_history.setdefault(a.agent_id, deque(maxlen=120)).append(a.tokens_per_s)
            self._fill_table()
        else:
            self.history.clear()  # a restarted server starts its counters afresh
        age = time.monotonic() - self.last_ok.t if self.last_ok else None
        self.main_widget(StatusBar).show(self.url, snap, self.interval, age)
        for screen in self.screen_stack:
            if isinstance(screen, AgentScreen):
                screen.update_from(self.agents, self.agent_history.get(screen.agent_id, []))

    def _baseline(self, cur: MetricsSnapshot) -> MetricsSnapshot | None:
        """The newest kept snapshot at least ``window_s`` older than ``cur`` (else the oldest)."""
        base = self.history[0] if self.history else None
        for old in self.history:
            if cur.t - old.t >= self.window_s:
                base = old
        return base

    # -- agent table --------------------------------------------------------------------------

    def _fill_table(self) -> None:
        table = self.main_widget("#agents", DataTable)
        note = self.main_widget("#agents-note", Static)
        selected = self.selected_agent()
        table.clear(columns=True)
        for i, col in enumerate(COLUMNS):
            arrow = (" ▼" if self.sort_reverse else " ▲") if i == self.sort_index else ""
            table.add_column(col.label + arrow, key=col.key)
        agents = self.agents
        if agents is None or not agents.available:
            note.update(f"per-agent data n/a: {agents.note if agents else 'waiting for the server'}")
            self.row_order = []
            return
        rows = sort_agents(agents.agents, COLUMNS[self.sort_index], self.sort_reverse)
        note.update(f"{len(rows)} agents · sorted by {COLUMNS[self.sort_index].label}"
                    f" ({'descending' if self.sort_reverse else 'ascending'})")
        for a in rows:
            table.add_row(*(c.text(a) for c in COLUMNS), key=a.agent_id)
        self.row_order = [a.agent_id for a in rows]
        if selected in self.row_order:
            table.move_cursor(row=self.row_order.index(selected), animate=False)

    def selected_agent(self) -> str | None:
        table = self.main_widget("#agents", DataTable)
        if not self.row_order or table.row_count == 0:
            return None
        i = table.cursor_row
        return self.row_order[i] if 0 <= i < len(self.row_order) else None

    def action_sort(self, step: int) -> None:
        self.sort_index = (self.sort_index + step) % len(COLUMNS)
        self._fill_table()

    def action_reverse(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self._fill_table()

    @on(DataTable.HeaderSelected, "#agents")
    def _header_clicked(self, event: DataTable.HeaderSelected) -> None:
        keys = [c.key for c in COLUMNS]
        idx = keys.index(str(event.column_key.value)) if str(event.column_key.value) in keys else None
        if idx is None:
            return
        if idx == self.sort_index:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_index = idx
        self._fill_table()

    @on(DataTable.RowSelected, "#agents")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_drill()

    def action_drill(self) -> None:
        agent = self.selected_agent()
        if agent is not None:
            self.push_screen(AgentScreen(agent))

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentserve console", description="live operator console for an agentserve server")
    p.add_argument("--url", default=DEFAULT_URL, help=f"server base URL (default {DEFAULT_URL})")
    p.add_argument("--interval", type=float, default=1.0, help="poll interval in seconds (default 1)")
    p.add_argument("--window", type=float, default=10.0,
                   help="seconds over which rates, latency percentiles and acceptance are computed (default 10)")
    p.add_argument("--timeout", type=float, default=None, help="HTTP timeout per request (default 2x interval, 1-5 s)")
    p.add_argument("--screenshot", metavar="SVG", default=None,
                   help="run headless, save an SVG screenshot after --after seconds, and exit")
    p.add_argument("--after", type=float, default=10.0, help="seconds to poll before --screenshot (default 10)")
    p.add_argument("--size", default="140x48", help="terminal size for --screenshot, COLSxROWS (default 140x48)")
    return p


def screenshot(app: ConsoleApp, path: str, after: float, size: tuple[int, int]) -> bool:
    """Run ``app`` headless for ``after`` seconds and save an SVG of it; True when saved."""
    from pathlib import Path

    out = Path(path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    saved: list[str] = []

    def shoot() -> None:
        saved.append(app.save_screenshot(out.name, str(out.parent)))
        app.exit()

    app.call_after_refresh(lambda: app.set_timer(after, shoot))
    app.run(headless=True, size=size)
    return bool(saved)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.interval > 0 or not args.window > 0:
        print("agentserve console: --interval and --window must be > 0", flush=True)
        return 2
    app = ConsoleApp(args.url, args.interval, args.timeout, args.window)
    if args.screenshot:
        try:
            cols, rows = (int(x) for x in args.size.lower().split("x"))
        except ValueError:
            print(f"agentserve console: --size must be COLSxROWS, not {args.size!r}", flush=True)
            return 2
        if not screenshot(app, args.screenshot, args.after, (cols, rows)):
            print("agentserve console: no screenshot was taken", flush=True)
            return 1
        print(f"saved {args.screenshot}")
        return 0
    app.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
