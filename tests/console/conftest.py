"""Fixtures and helpers of the console tests: a fake agentserve (stdlib HTTP) and a way to wait,
inside Textual's pilot, until the console shows something."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from console_fakes import FakeServer  # noqa: E402


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    srv = FakeServer().start()
    try:
        yield srv
    finally:
        srv.stop()


async def wait_for(pilot, cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{screen_text(pilot.app)}")
        await pilot.pause(0.05)


def screen_text(app) -> str:
    """The current screen as plain text (what a terminal would show)."""
    from rich.console import Console

    w, h = app.size
    c = Console(width=w, height=h, file=io.StringIO(), record=True, force_terminal=True, color_system=None)
    c.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return c.export_text()


def widget_text(app, selector: str) -> str:
    """The plain text a Static shows."""
    content = app.screen.query_one(selector).content
    return getattr(content, "plain", str(content))
