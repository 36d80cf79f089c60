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

A prompt the radix cache already holds is not run through the target again: its prefill starts
at the cached length, so the target's features of the cached positions never reach this
request's context, and the drafter drafts an agent's second turn with only its newest tokens in
view. Those features were computed once, by the request that put the prefix in the cache, and a
position's features depend only on the tokens up to it. So an ended request's context is kept
(`keep`, bounded by `keep_tokens` positions, oldest first out), and a new request whose prefill
starts past 0 is seeded (`seed`) with the positions it shares with the ended or running request
whose tokens match it longest (a session's previous turn; another agent's system prompt and tool
schemas). A draft only proposes; verification decides, so a stale or mismatched context can cost
acceptance, never correctness.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, Sequence

import torch

from sglang_ext.dspark.drafter import DraftContext


class LazyContexts:
    MIN_SHARED = 16  # a shorter common prefix is not worth a copy

    def __init__(self, drafter: Any, device: torch.device | str, max_pending: int = 64, keep_tokens: int = 0) -> None:
        self.drafter = drafter
        self.device = device
        self.max_pending = int(max_pending)
        self.keep_tokens = int(keep_tokens)
        self.contexts: dict[str, DraftContext] = {}
        self._pending: dict[str, list[tuple[torch.Tensor, int]]] = {}
        # ended requests' contexts with their token ids, oldest first (keep / seed)
        self._kept: OrderedDict[str, tuple[torch.Tensor, DraftContext]] = OrderedDict()
        self.kept_positions = 0

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
        self._kept.clear()
        self.kept_positions = 0

    # ---- contexts across requests (module docstring)
    def keep(self, rid: str, tokens: Sequence[int]) -> None:
        """rid ended with these token ids (prompt and output): keep its context for later
        prompts that share a prefix with it, then forget rid."""
        if self.keep_tokens <= 0 or rid not in self:
            self.forget(rid)
            return
        ctx = self.get(rid)
        self.forget(rid)
        if ctx.length == 0 or ctx.length > self.keep_tokens:
            return
        if rid in self._kept:  # kept before (a retracted request that ran again)
            self.kept_positions -= self._kept.pop(rid)[1].length
        self._kept[rid] = (torch.as_tensor(list(tokens), dtype=torch.long), ctx)
        self.kept_positions += ctx.length
        while self.kept_positions > self.keep_tokens:
            _, (_, old) = self._kept.popitem(last=False)
            self.kept_positions -= old.length

    def seed(self, rid: str, tokens: Sequence[int], prefix_len: int,
             running: Iterable[tuple[str, Sequence[int]]] = ()) -> int:
        """Before rid's first prefill appends positions >= prefix_len: give it the positions
        < prefix_len that a kept or running request computed for the same tokens (the one
        sharing the longest prefix). Returns the positions copied."""
        if prefix_len < self.MIN_SHARED or rid in self or (not self._kept and not running):
            return 0
        want = torch.as_tensor(list(tokens[:prefix_len]), dtype=torch.long)
        best, best_m = None, self.MIN_SHARED - 1
        cands: list[tuple[str, Any, Any]] = [(r, t, None) for r, t in running if r != rid and r in self]
        cands += [(r, t, c) for r, (t, c) in reversed(self._kept.items())]
        for r, toks, ctx in cands:
            m = _common_prefix(want, torch.as_tensor(toks, dtype=torch.long) if not torch.is_tensor(toks) else toks)
            if m > best_m:
                best, best_m = (r, ctx), m
        if best is None:
            return 0
        r, ctx = best
        if ctx is None:
            ctx = self.get(r)  # a running request: project its pending rows first
        else:
            self._kept.move_to_end(r)  # used: the last to go
        n = int((ctx.pos() < best_m).sum()) if ctx.length else 0
        if n == 0:
            return 0
        self.contexts[rid] = ctx.head(n)
        return n

    def pending_rows(self, rid: str) -> int:
        return sum(h.shape[0] for h, _ in self._pending.get(rid, []))


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading tokens a and b share."""
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if diff.numel() else n
