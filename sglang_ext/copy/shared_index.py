"""Cross-session suffix index: what one session of an agent produced and read helps the next.

An agent's sessions repeat each other: the same system prompt and tool schemas, the same call
shapes (``{"name": "Search_Hotels", "arguments": {...``), tool outputs with the same keys.
The per-session index (suffix_index.py) starts empty for every new conversation; a
``ScopeIndex`` keeps what earlier sessions of the same *scope* (agent, tier or everything)
contained, so a new session's drafts can copy from them.

What is learned, and when: a session's conversation view (prompt + generated tokens) is handed
over at turn boundaries (the registry calls ``learn`` at sync, at drop and every
``flush_every`` tokens).  Only material the scope cannot already continue is stored: walking
the view through the scope's automaton gives, per position, the longest suffix ending there
that occurs in the stream; positions whose last ``cover`` tokens are already present are
skipped, each new run is stored with ``overlap`` tokens of left context (so its start can be
matched), as its own segment behind a separator token that never occurs in a context (so no
match crosses two segments and no proposal copies across one).  Repeated system prompts are
therefore stored once.

Memory: a token budget per scope (``max_tokens``, stream tokens including separators) and one
over all scopes (``SharedIndexStore.max_total_tokens``).  Over a scope's budget, whole
sessions are dropped least recently learned first until the scope is under
``retain_fraction * max_tokens`` and its automaton is rebuilt from the remaining segments
(amortised like SessionSuffixIndex's own trimming); over the total, least recently used scopes
are dropped whole (the one being written last).

Correctness never depends on this index: it only proposes drafts, which verification accepts
or rejects like any other copied draft (chooser.py's losslessness argument: a copy is a
deterministic function of fixed tokens).  After a restart it is empty and relearns; nothing is
persisted.  No sglang import; not thread-safe (the scheduler loop is single-threaded).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import Hashable, Literal, Optional, Sequence

from .suffix_index import Proposal, SessionSuffixIndex

SharedScope = Literal["agent", "tier", "global", "off"]
SEP = (1 << 31) - 1  # separator token: larger than any vocabulary, never in a context


def scope_key(mode: SharedScope, agent: str, tier: str) -> Optional[str]:
    """The shared index a request reads and feeds, or None (no sharing).  A request without an
    agent label (no agent API in front) shares only under ``global``; likewise for tiers."""
    if mode == "global":
        return "*"
    if mode == "agent":
        return f"agent:{agent}" if agent else None
    if mode == "tier":
        return f"tier:{tier}" if tier else None
    if mode == "off":
        return None
    raise ValueError(f"shared_index: unknown scope '{mode}' (agent, tier, global or off)")


class ScopeIndex:
    """One scope's shared stream: segments of many sessions, one suffix automaton over them."""

    def __init__(self, max_tokens: int = 65536, retain_fraction: float = 0.75, max_context: int = 64,
                 max_propose: int = 32, cover: int = 16, overlap: int = 32) -> None:
        if max_tokens < 64:
            raise ValueError("max_tokens must be >= 64")
        if not 0.0 < retain_fraction < 1.0:
            raise ValueError("retain_fraction must be in (0, 1)")
        if cover < 1 or overlap < 0:
            raise ValueError("cover must be >= 1 and overlap >= 0")
        self.max_tokens = int(max_tokens)
        self.retain = int(self.max_tokens * retain_fraction)
        self.cover, self.overlap = int(cover), int(overlap)
        self._kw = {"max_context": int(max_context), "max_propose": int(max_propose)}
        self._segments: list[tuple[Hashable, list[int]]] = []  # stream order; SEP-joined
        self._recent: "OrderedDict[Hashable, None]" = OrderedDict()  # sessions, least recently learned first
        self._ends: dict[Hashable, int] = {}  # session -> view position just after its last stored segment
        self.rebuilds = 0
        self.evicted_sessions = 0
        self._idx = self._new_index()

    def _new_index(self) -> SessionSuffixIndex:
        # never trims by itself (its cap is above ours): eviction is by session, below
        return SessionSuffixIndex(max_tokens=2 * self.max_tokens + 2, **self._kw)

    # ------------------------------------------------------------------ learning
    def learn(self, session: Hashable, view: Sequence[int], start: int = 0) -> int:
        """Store what ``view[start:]`` adds to the scope (``view[:start]`` was learned before
        and is only walked for context).  Returns the tokens stored (separators included)."""
        n = len(view)
        start = max(0, min(int(start), n))
        if start >= n:
            return 0
        walk = max(0, start - 2 * self.cover)
        ml = self._idx.matching_lengths(view[walk:])
        runs: list[list[int]] = []  # [a, b) of new positions, merged when closer than `overlap`
        for i in range(start, n):
            if ml[i - walk] < min(self.cover, i + 1):
                if runs and i - runs[-1][1] <= self.overlap:
                    runs[-1][1] = i + 1
                else:
                    runs.append([i, i + 1])
        added = 0
        for a, b in runs:
            a0 = max(0, a - self.overlap)
            toks = [int(t) for t in view[a0:b]]
            contiguous = bool(self._segments) and self._segments[-1][0] == session and self._ends.get(session) == a0
            if contiguous:
                self._segments[-1][1].extend(toks)
            else:
                if self._idx.memory_tokens():
                    self._idx.extend([SEP], view=False)
                    added += 1
                self._segments.append((session, toks))
            self._idx.extend(toks, view=False)
            self._ends[session] = b
            added += len(toks)
        self._recent[session] = None
        self._recent.move_to_end(session)
        if self.memory_tokens() > self.max_tokens:
            self._evict(keep=session)
        return added

    def _evict(self, keep: Hashable) -> None:
        """Drop least recently learned sessions until under the retain target; rebuild."""
        sizes: dict[Hashable, int] = {}
        for s, toks in self._segments:
            sizes[s] = sizes.get(s, 0) + len(toks) + 1
        total = sum(sizes.values())
        gone: set[Hashable] = set()
        for s in list(self._recent):
            if total <= self.retain or s == keep:
                continue
            total -= sizes.get(s, 0)
            gone.add(s)
            del self._recent[s]
            self._ends.pop(s, None)
            self.evicted_sessions += 1
        segs = [(s, t) for s, t in self._segments if s not in gone]
        if total > self.retain:  # the writing session alone is too long: keep its newest tokens
            excess = total - self.retain
            while segs and excess > 0:
                s, t = segs[0]
                if len(t) + 1 <= excess:
                    segs.pop(0)
                    excess -= len(t) + 1
                else:
                    segs[0] = (s, t[excess:])
                    excess = 0
        self._segments = segs
        self._idx = self._new_index()
        for i, (_, toks) in enumerate(segs):
            self._idx.extend(([SEP] if i else []) + toks, view=False)
        self.rebuilds += 1

    # ------------------------------------------------------------------ queries
    def propose(self, context: Sequence[int], max_len: int, min_match: int = 1) -> Optional[Proposal]:
        p = self._idx.propose(list(context), max_len, min_match=min_match)
        if p is None:
            return None
        cut = p.tokens.index(SEP) if SEP in p.tokens else len(p.tokens)
        if cut == 0:
            return None
        return replace(p, tokens=p.tokens[:cut], agreement=p.agreement[:cut],
                       extrapolated=max(0, p.extrapolated - (len(p.tokens) - cut)), source="shared")

    def memory_tokens(self) -> int:
        return self._idx.memory_tokens()

    def sessions(self) -> list[Hashable]:
        """Sessions with stored segments, least recently learned first."""
        return list(self._recent)

    def forget_cursor(self, session: Hashable) -> None:
        """The session's view ended (its key may be reused by an unrelated conversation)."""
        self._ends.pop(session, None)


class SharedIndexStore:
    """scope key -> ScopeIndex under a total token budget, least recently used scopes dropped."""

    def __init__(self, max_total_tokens: int = 262144, max_tokens_per_scope: int = 65536, **scope_kwargs: object) -> None:
        self.max_total_tokens = int(max_total_tokens)
        self.max_tokens_per_scope = int(min(max_tokens_per_scope, max_total_tokens))
        self._kw = scope_kwargs
        self._scopes: "OrderedDict[str, ScopeIndex]" = OrderedDict()
        self.evicted_scopes = 0

    def scope(self, key: str, create: bool = True) -> Optional[ScopeIndex]:
        s = self._scopes.get(key)
        if s is None and create:
            s = self._scopes[key] = ScopeIndex(max_tokens=self.max_tokens_per_scope, **self._kw)  # type: ignore[arg-type]
        if s is not None:
            self._scopes.move_to_end(key)
        return s

    def learn(self, key: str, session: Hashable, view: Sequence[int], start: int = 0) -> int:
        s = self.scope(key)
        assert s is not None
        added = s.learn(session, view, start)
        while self.total_tokens() > self.max_total_tokens and len(self._scopes) > 1:
            victim = next(iter(self._scopes))
            if victim == key:
                break
            del self._scopes[victim]
            self.evicted_scopes += 1
        return added

    def propose(self, key: str, context: Sequence[int], max_len: int, min_match: int = 1) -> Optional[Proposal]:
        s = self._scopes.get(key)
        return None if s is None else s.propose(context, max_len, min_match)

    def total_tokens(self) -> int:
        return sum(s.memory_tokens() for s in self._scopes.values())

    def scopes(self) -> list[str]:
        return list(self._scopes)

    def __contains__(self, key: object) -> bool:
        return key in self._scopes
