"""Per-request drafter contexts in the worker, projected lazily.

Every committed position's target features must reach the drafter's context K/V (fc + norm +
one K/V projection per draft layer), but most decode steps do not draft: the cost gate skips
the model where it does not pay, and copy steps need no model. Projecting one row per step
costs about what projecting 64 rows at once does (small matmuls are latency-bound), so rows
wait in a per-request buffer and are projected together when the drafter needs the context,
or when the buffer reaches `max_pending` rows (which bounds its memory: raw features are
wider than the K/V they become).

Positions only ever grow, except when SGLang re-prefills or retracts a request: `trim(rid, p)`
then drops everything at or after p, projected or pending.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_ext.dspark.drafter import DraftContext


class LazyContexts:
    def __init__(self, drafter: Any, device: torch.device | str, max_pending: int = 64) -> None:
        self.drafter = drafter
        self.device = device
        self.max_pending = int(max_pending)
        self.contexts: dict[str, DraftContext] = {}
        self._pending: dict[str, list[tuple[torch.Tensor, int]]] = {}

    def __contains__(self, rid: str) -> bool:
        return rid in self.contexts or rid in self._pending

    def append(self, rid: str, hidden: torch.Tensor, start: int) -> None:
        """Target features of positions start .. start + n - 1 (rows of `hidden`)."""
        if hidden.shape[0] == 0:
            return
        self.trim(rid, start)
        pend = self._pending.setdefault(rid, [])
        pend.append((hidden.clone(), int(start)))  # the engine may reuse its output buffers
        if sum(h.shape[0] for h, _ in pend) >= self.max_pending:
            self.get(rid)

    def trim(self, rid: str, position: int) -> None:
        """Forget positions >= position (a retraction or re-prefill redoes them)."""
        ctx = self.contexts.get(rid)
        if ctx is not None and ctx.length and int(ctx.pos()[-1]) >= position:
            ctx.truncate(int((ctx.pos() < position).sum()))
        pend = self._pending.get(rid)
        if pend:
            kept = []
            for h, s in pend:
                if s < position:
                    kept.append((h[: position - s], s))
            self._pending[rid] = kept

    def get(self, rid: str) -> DraftContext:
        """The request's context with every appended position projected."""
        ctx = self.contexts.get(rid)
        if ctx is None:
            ctx = self.contexts[rid] = self.drafter.new_context()
        pend = self._pending.pop(rid, None)
        if pend:
            hs = torch.cat([h for h, _ in pend])
            pos = torch.cat([torch.arange(s, s + h.shape[0], device=self.device) for h, s in pend])
            self.drafter.append_context(ctx, hs, pos)
        return ctx

    def forget(self, rid: str) -> None:
        self.contexts.pop(rid, None)
        self._pending.pop(rid, None)

    def clear(self) -> None:
        self.contexts.clear()
        self._pending.clear()

    def pending_rows(self, rid: str) -> int:
        return sum(h.shape[0] for h, _ in self._pending.get(rid, []))
