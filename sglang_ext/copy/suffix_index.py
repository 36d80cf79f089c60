"""Per-session suffix index for copy drafting ("agents repeat themselves").

A ``SessionSuffixIndex`` holds one session's token stream (prompts, tool outputs, generated
turns) in an online suffix automaton (SAM): appending a token is amortised O(1) and the
automaton has at most 2n states.  ``propose(context, max_len)`` finds the longest suffix of the
context (its last ``max_context`` tokens) that occurs in the stream *with at least one token
after it*, and copies what followed its most recent such occurrence.  Statistics come from the
SAM's endpos counts: the number of occurrences of the matched suffix and, per proposed position
k, the fraction of occurrences of (suffix + proposal[:k]) that continue with proposal[k] -- an
empirical conditional survival the copy-survival estimator can use (it is known before
verification).

Per-state statistics (occurrence count, two most recent end positions) are kept exact for the
states that queries can reach: those whose shortest string has length <= window =
max_context + max_propose (a matched suffix is <= max_context long, and agreement walks at most
max_propose further).  Each append updates the suffix-link chain from the state of the stream's
last `window` tokens (tracked in O(1)); lengths strictly decrease along it, so the walk is at
most `window` states even inside periodic runs ("0, 0, 0, ..."), where the full chain from the
newest state would be O(n) long.  Longer states' statistics are not maintained (never read).

Memory: ``max_tokens`` caps the indexed stream; when exceeded, the oldest part is dropped and
the automaton rebuilt from the newest ``retain_fraction * max_tokens`` tokens (amortised
O(1/(1-retain_fraction)) inserts per token).  ``SessionIndexRegistry`` maps session ids to
indices under a global token cap with LRU eviction of whole sessions.  Measured on agent
traces (SmolLM2 tokenizer): ~1.6 states/token, ~570 bytes/token in CPython, ~10 us/token to
extend, ~40 us per propose with a 64-token context (2-core CPU, under load).

No sglang import: the SGLang worker drives this through ``SessionIndexRegistry``.
Not thread-safe (SGLang's scheduler loop is single-threaded).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Hashable, Iterator, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Proposal:
    """A copied draft.  ``agreement[k]``: among earlier occurrences of suffix+tokens[:k] that
    have a following token, the fraction followed by tokens[k] (1.0 = unanimous)."""

    tokens: list[int]
    match_len: int  # length of the matched context suffix
    occurrences: int  # occurrences of the matched suffix that have a continuation
    agreement: list[float] = field(default_factory=list)
    source_pos: int = -1  # absolute stream position of tokens[0]
    extrapolated: int = 0  # trailing tokens continued past the stream end (periodic run)
    source: str = "session"  # "session" (this session's index) or "shared" (shared_index.py)
    # other candidates for the same step (the shared index's proposal next to the session's):
    # HybridChoice scores each with its own survival estimate and keeps the best
    alternatives: tuple["Proposal", ...] = ()


class SessionSuffixIndex:
    """Incremental suffix automaton over one session's token stream."""

    def __init__(self, max_tokens: int = 32768, retain_fraction: float = 0.75,
                 max_context: int = 64, max_propose: int = 32) -> None:
        if max_tokens < 2:
            raise ValueError("max_tokens must be >= 2")
        if not 0.0 < retain_fraction < 1.0:  # 1.0 would rebuild on every append
            raise ValueError("retain_fraction must be in (0, 1)")
        self.max_tokens = int(max_tokens)
        self.retain = max(1, min(self.max_tokens, int(self.max_tokens * retain_fraction)))
        if max_context < 1 or max_propose < 1:
            raise ValueError("max_context and max_propose must be >= 1")
        self.max_context = int(max_context)
        self.max_propose = int(max_propose)
        self._window = self.max_context + self.max_propose  # longest string whose stats we keep
        self._view: list[int] = []  # last synced conversation (see sync), minus _view_off tokens
        self._view_off = 0  # leading view tokens dropped to bound memory (assumed unchanged)
        self._base = 0  # absolute position of _tokens[0]
        self._reset()

    # ------------------------------------------------------------------ construction
    def _reset(self) -> None:
        self._tokens: list[int] = []
        self._len: list[int] = [0]
        self._link: list[int] = [-1]
        self._nx: list[dict[int, int]] = [{}]
        self._cnt: list[int] = [0]
        self._last: list[int] = [-1]  # most recent end position (relative to _tokens)
        self._prev: list[int] = [-1]  # second most recent end position
        self._tail = 0  # state of the whole stream
        self._wv, self._wl = 0, 0  # state/length of the stream's last min(window, n) tokens

    def _append(self, c: int) -> None:
        lens, link, nx, cnt, last, prev = self._len, self._link, self._nx, self._cnt, self._last, self._prev
        pos = len(self._tokens)
        self._tokens.append(c)
        cur = len(lens)
        lens.append(lens[self._tail] + 1)
        link.append(0)
        nx.append({})
        cnt.append(0)
        last.append(-1)
        prev.append(-1)
        p = self._tail
        while p != -1 and c not in nx[p]:
            nx[p][c] = cur
            p = link[p]
        if p != -1:
            q = nx[p][c]
            if lens[p] + 1 == lens[q]:
                link[cur] = q
            else:
                # Clone q: same transitions and (pre-append) endpos statistics.  q's minimum
                # length only grows, so a clone is in the stats window iff q was.
                clone = len(lens)
                lens.append(lens[p] + 1)
                link.append(link[q])
                nx.append(dict(nx[q]))
                cnt.append(cnt[q])
                last.append(last[q])
                prev.append(prev[q])
                while p != -1 and nx[p].get(c) == q:
                    nx[p][c] = clone
                    p = link[p]
                link[q] = clone
                link[cur] = clone
                if self._wv == q and self._wl <= lens[clone]:
                    self._wv = clone
        self._tail = cur
        # Track the state of the stream's last min(window, n) tokens: O(1) per append.
        w = nx[self._wv][c]
        wl = self._wl + 1
        if wl > self._window:
            wl = self._window
            if lens[link[w]] >= wl:
                w = link[w]
        self._wv, self._wl = w, wl
        # The new end position belongs to every state on the suffix-link chain; only states
        # whose shortest string fits the window are ever queried, and below the window state
        # lengths strictly decrease from <= window, so this walk is at most `window` long.
        v = w
        while v > 0:
            cnt[v] += 1
            prev[v] = last[v]
            last[v] = pos
            v = link[v]

    def extend(self, tokens: Sequence[int], view: bool = True) -> None:
        """Append tokens to the stream.  ``view`` also appends them to the synced conversation
        view (generated tokens do; out-of-band material need not)."""
        toks = [int(t) for t in tokens]
        if not toks:
            return
        if min(toks) < 0:
            raise ValueError("token ids must be >= 0")
        if view:
            self._view.extend(toks)
            self._trim_view()
        if len(self._tokens) + len(toks) > self.max_tokens:
            keep = (self._tokens + toks)[-self.retain:]
            self._base += len(self._tokens) + len(toks) - len(keep)
            self._reset()
            toks = keep
        for t in toks:
            self._append(t)

    def sync(self, sequence: Sequence[int]) -> int:
        """Make ``sequence`` (a request's full token list, e.g. the prompt at admission) the
        session's conversation view and index only what it adds after the longest common
        prefix with the previous view: multi-turn prompts repeat the whole history, which
        must not be indexed again.  Returns the number of tokens appended."""
        full = np.asarray(sequence, dtype=np.int64).ravel()
        off = min(self._view_off, len(full))
        seq = full[off:]
        old = np.asarray(self._view, dtype=np.int64)
        k = min(len(seq), len(old))
        diff = np.flatnonzero(seq[:k] != old[:k])
        m = int(diff[0]) if len(diff) else k
        new = seq[m:].tolist()
        self._view, self._view_off = seq.tolist(), off
        self._trim_view()
        self.extend(new, view=False)
        return len(new)

    def _trim_view(self) -> None:
        # Keep at most 2*max_tokens view tokens; a prefix that long is compared only by length.
        if len(self._view) > 2 * self.max_tokens:
            drop = len(self._view) - self.max_tokens
            del self._view[:drop]
            self._view_off += drop

    # ------------------------------------------------------------------ queries
    def _usable_end(self, v: int) -> int:
        """Most recent end position of state v that has a following token, or -1."""
        n = len(self._tokens)
        e = self._last[v]
        if e >= n - 1:
            e = self._prev[v]
        return e if 0 <= e < n - 1 else -1

    def match(self, context: Sequence[int]) -> tuple[int, int]:
        """(state, length) of the longest suffix of context[-max_context:] occurring in the
        stream with a continuation; (0, 0) if none."""
        nx, link, lens = self._nx, self._link, self._len
        ctx = list(context)[-self.max_context:]
        v, l = 0, 0
        for t in ctx:
            while v and t not in nx[v]:
                v = link[v]
                l = lens[v]
            w = nx[v].get(t)
            if w is None:
                v, l = 0, 0
            else:
                v, l = w, l + 1
        # All strings of a state share endpos: if v only ends at the stream end, so do they.
        while v > 0 and self._usable_end(v) < 0:
            v = link[v]
            l = lens[v]
        return (v, l) if v > 0 else (0, 0)

    def matching_lengths(self, seq: Sequence[int]) -> list[int]:
        """Per position i of ``seq``: the length of the longest suffix of seq[:i+1] occurring
        anywhere in the stream (matching statistics; what shared_index.py calls covered)."""
        nx, link, lens = self._nx, self._link, self._len
        out: list[int] = []
        v, l = 0, 0
        for t in seq:
            t = int(t)
            while v and t not in nx[v]:
                v = link[v]
                l = lens[v]
            w = nx[v].get(t)
            if w is None:
                v, l = 0, 0
            else:
                v, l = w, l + 1
            out.append(l)
        return out

    def view_tail(self, n: int) -> list[int]:
        """The last n tokens of the synced conversation view."""
        return self._view[-n:] if n > 0 else []

    def view_length(self) -> int:
        """Length of the synced conversation view (absolute: dropped leading tokens count)."""
        return self._view_off + len(self._view)

    def view(self) -> tuple[int, list[int]]:
        """(offset, retained view tokens): view() [1] is the conversation from position offset."""
        return self._view_off, self._view

    def propose(self, context: Optional[Sequence[int]], max_len: int, min_match: int = 1) -> Optional[Proposal]:
        """Copy up to min(max_len, max_propose) tokens that followed the most recent earlier
        occurrence of the longest matching suffix of ``context`` (None: the synced view's tail).
        ``min_match``: shortest matched suffix worth proposing from."""
        if context is None:
            context = self._view[-self.max_context:]
        max_len = min(int(max_len), self.max_propose)
        if max_len <= 0 or len(self._tokens) < 2:
            return None
        v, l = self.match(context)
        if v == 0 or l < max(1, min_match):
            return None
        n = len(self._tokens)
        e = self._usable_end(v)
        toks = self._tokens[e + 1:e + 1 + max_len]
        nx, cnt, last = self._nx, self._cnt, self._last
        occ = cnt[v] - (1 if last[v] == n - 1 else 0)
        agreement: list[float] = []
        denom, u = occ, v
        for t in toks:
            w = nx[u][t]  # exists: suffix+toks[:k+1] is a substring of the stream
            agreement.append(min(1.0, cnt[w] / denom) if denom > 0 else 0.0)
            denom = cnt[w] - (1 if last[w] == n - 1 else 0)
            u = w
        extra = 0
        if len(toks) < max_len and last[v] == n - 1:
            # The matched suffix is also the stream's tail, so the occurrence at e overlaps a
            # run with period d = n-1-e: continue it past the stream end (LZ77-style copy).
            d = n - 1 - e
            ext = self._tokens[e + 1:]
            while len(toks) < max_len:
                ext.append(ext[len(ext) - d])
                toks.append(ext[-1])
                extra += 1
            floor = min(agreement) if agreement else 0.0
            agreement.extend([floor] * extra)
        return Proposal(tokens=toks, match_len=l, occurrences=max(occ, 1), agreement=agreement,
                        source_pos=self._base + e + 1, extrapolated=extra)

    # ------------------------------------------------------------------ introspection
    def memory_tokens(self) -> int:
        """Indexed tokens (the cap applies to this)."""
        return len(self._tokens)

    def num_states(self) -> int:
        return len(self._len)

    def total_seen(self) -> int:
        """Tokens ever appended (absolute position of the next token)."""
        return self._base + len(self._tokens)

    def tokens(self) -> list[int]:
        """The retained stream (a copy)."""
        return list(self._tokens)

    def occurrences(self, pattern: Sequence[int]) -> int:
        """Occurrence count of a pattern in the retained stream (exact for
        len(pattern) <= max_context + max_propose; longer patterns: not maintained)."""
        v = 0
        for t in pattern:
            v = self._nx[v].get(int(t), -1)
            if v < 0:
                return 0
        return self._cnt[v] if v > 0 else len(self._tokens)


class SessionIndexRegistry:
    """session_id -> SessionSuffixIndex, with a global cap on indexed tokens and LRU eviction
    of whole sessions (the session being written is evicted last).

    With ``shared`` (a scope: "agent", "tier", "global"; default "off"), sessions also feed and
    read a cross-session index (shared_index.py): ``bind`` names a session's agent and tier,
    each session's view is learned into its scope at turn boundaries (sync, drop) and every
    ``flush_every`` generated tokens, and ``propose`` returns the session's proposal with the
    scope's as an alternative (HybridChoice picks).  ``shared_tokens`` bounds that index."""

    def __init__(self, max_total_tokens: int = 262144, max_tokens_per_session: int = 32768,
                 shared: str = "off", shared_tokens: int = 262144, shared_tokens_per_scope: int = 32768,
                 flush_every: int = 512, **index_kwargs: object) -> None:
        from .shared_index import SharedIndexStore, scope_key

        self.max_total_tokens = int(max_total_tokens)
        self.max_tokens_per_session = int(min(max_tokens_per_session, max_total_tokens))
        self._kw = index_kwargs
        self._idx: "OrderedDict[Hashable, SessionSuffixIndex]" = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._total = 0
        self.evictions = 0
        scope_key(shared, "", "")  # type: ignore[arg-type]  # validates the mode
        self.shared_mode = shared
        self._scope_key = scope_key
        sam = {k: v for k, v in index_kwargs.items() if k in ("max_context", "max_propose")}
        self.shared = (SharedIndexStore(max_total_tokens=shared_tokens, max_tokens_per_scope=shared_tokens_per_scope, **sam)
                       if shared != "off" else None)
        self.flush_every = int(flush_every)
        self._scope: dict[Hashable, Optional[str]] = {}  # session -> shared scope key (bind)
        self._flushed: dict[Hashable, int] = {}  # session -> view length already learned into its scope

    def memory(self) -> tuple[int, int, int]:
        """(tokens in session indexes, tokens in the shared store, sessions held): what the
        bounds (max_total_tokens, shared_tokens) cap."""
        shared = self.shared.total_tokens() if self.shared is not None else 0
        return self._total, shared, len(self._idx)

    def bind(self, session_id: Hashable, agent: str = "", tier: str = "") -> None:
        """Name the agent and tier a session belongs to (its shared scope)."""
        if self.shared is not None:
            self._scope[session_id] = self._scope_key(self.shared_mode, agent, tier)  # type: ignore[arg-type]

    def scope_of(self, session_id: Hashable) -> Optional[str]:
        if self.shared is None:
            return None
        return self._scope.get(session_id, "*" if self.shared_mode == "global" else None)

    def _learn(self, session_id: Hashable, force: bool) -> None:
        sk = self.scope_of(session_id)
        idx = self._idx.get(session_id)
        if sk is None or idx is None or self.shared is None:
            return
        off, view = idx.view()
        done = self._flushed.get(session_id, 0)
        if off + len(view) - done < (1 if force else self.flush_every):
            return
        self.shared.learn(sk, session_id, view, max(0, done - off))
        self._flushed[session_id] = off + len(view)

    def get(self, session_id: Hashable, create: bool = True) -> Optional[SessionSuffixIndex]:
        idx = self._idx.get(session_id)
        if idx is None:
            if not create:
                return None
            idx = SessionSuffixIndex(max_tokens=self.max_tokens_per_session, **self._kw)  # type: ignore[arg-type]
            self._idx[session_id] = idx
            self._sizes[session_id] = 0
        self._idx.move_to_end(session_id)
        return idx

    def _account(self, session_id: Hashable) -> None:
        idx = self._idx[session_id]
        new = idx.memory_tokens()
        self._total += new - self._sizes[session_id]
        self._sizes[session_id] = new
        while self._total > self.max_total_tokens and len(self._idx) > 1:
            victim = next(iter(self._idx))
            if victim == session_id:  # cannot happen after move_to_end, kept for safety
                break
            self.drop(victim)
            self.evictions += 1

    def extend(self, session_id: Hashable, tokens: Sequence[int], view: bool = True) -> None:
        idx = self.get(session_id)
        assert idx is not None
        idx.extend(tokens, view=view)
        self._account(session_id)
        if view:
            self._learn(session_id, force=False)

    def sync(self, session_id: Hashable, sequence: Sequence[int]) -> int:
        idx = self.get(session_id)
        assert idx is not None
        self._learn(session_id, force=True)  # the previous turn, whole, before the view moves on
        n = idx.sync(sequence)
        self._account(session_id)
        if session_id in self._flushed:
            kept = idx.view_length() - n  # common prefix with the previous view
            if kept < self._flushed[session_id]:  # the conversation was rewritten: new cursor
                self._flushed[session_id] = kept
                sk = self.scope_of(session_id)
                scope = self.shared.scope(sk, create=False) if self.shared is not None and sk else None
                if scope is not None:
                    scope.forget_cursor(session_id)
        self._learn(session_id, force=True)  # the new prompt (tool outputs) at once
        return n

    def propose(self, session_id: Hashable, context: Optional[Sequence[int]], max_len: int,
                min_match: int = 1) -> Optional[Proposal]:
        idx = self.get(session_id, create=False)
        if idx is None:
            return None
        p = idx.propose(context, max_len, min_match=min_match)
        sk = self.scope_of(session_id)
        if sk is None or self.shared is None:
            return p
        ctx = list(context)[-idx.max_context:] if context is not None else idx.view_tail(idx.max_context)
        sp = self.shared.propose(sk, ctx, max_len, min_match)
        if sp is None or (p is not None and sp.tokens == p.tokens):
            return p
        return sp if p is None else replace(p, alternatives=(sp,))

    def drop(self, session_id: Hashable) -> bool:
        if session_id not in self._idx:
            return False
        self._learn(session_id, force=True)  # what the session taught outlives it
        sk = self.scope_of(session_id)
        scope = self.shared.scope(sk, create=False) if self.shared is not None and sk else None
        if scope is not None:
            scope.forget_cursor(session_id)
        self._scope.pop(session_id, None)
        self._flushed.pop(session_id, None)
        del self._idx[session_id]
        self._total -= self._sizes.pop(session_id)
        return True

    def total_tokens(self) -> int:
        return self._total

    def shared_tokens(self) -> int:
        """Tokens held by the cross-session index (0 when off)."""
        return 0 if self.shared is None else self.shared.total_tokens()

    def sessions(self) -> Iterator[Hashable]:
        """Session ids, least recently used first."""
        return iter(list(self._idx))

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._idx

    def __len__(self) -> int:
        return len(self._idx)
