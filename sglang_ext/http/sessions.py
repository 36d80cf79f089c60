"""Agent sessions: a named conversation an agent keeps across tool calls.

What a session gives (documented in the README):
- its requests carry the session id to the scheduler, where the speculative worker keeps ONE
  draft index (suffix automaton) for all of the session's turns, so a tool result or file
  read in turn 3 can be copied while generating turn 7;
- the conversation's KV stays in SGLang's radix cache between calls, so turn N+1 prefills only
  its new tokens (usage.prompt_tokens_details.cached_tokens shows it). The radix cache is LRU
  under memory pressure; a session does not pin KV, it only keeps the draft index;
- limits: `sessions.ttl_s` idle seconds (each request renews it), `sessions.max_sessions` open
  at once (more: 429). On expiry or DELETE the id becomes unknown (404 naming `x-session-id`),
  the scheduler drops the session's draft index when the next generation request reaches it
  (the ids ride on that request's tags) or, failing that, once it idles past the TTL; the KV
  becomes ordinary evictable cache; the agent opens a new session and resends its messages
  (nothing else is lost: chat completions are stateless, the session only accelerates them).
"""

from __future__ import annotations

import collections

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from sglang_ext.http.errors import HttpError


@dataclass
class Session:
    id: str
    agent_id: str
    created_at: float
    last_used: float
    ttl_s: float
    requests: int = 0

    def expires_at(self) -> float:
        return self.last_used + self.ttl_s

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "object": "agentserve.session", "agent_id": self.agent_id,
                "created_at": self.created_at, "expires_at": self.expires_at(), "ttl_s": self.ttl_s,
                "requests": self.requests}


class SessionError(HttpError):
    pass


class SessionStore:
    def __init__(self, ttl_s: float = 600.0, max_sessions: int = 1024,
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = float(ttl_s)
        self.max_sessions = int(max_sessions)
        self.clock = clock
        self._s: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.expired_total = 0
        # Sessions closed or expired since the last generation request: the scheduler's draft
        # index of each is dropped when the next request carries the list (middleware.py), so
        # copy-index memory follows open sessions, not every session ever opened.
        self._ended: collections.deque[str] = collections.deque(maxlen=4096)

    def _sweep(self, now: float) -> None:
        dead = [k for k, s in self._s.items() if s.expires_at() <= now]
        for k in dead:
            del self._s[k]
        self._ended.extend(dead)
        self.expired_total += len(dead)

    def give_back(self, ids: list[str]) -> None:
        """Ids taken for a request that then never reached the scheduler (refused): next time."""
        with self._lock:
            self._ended.extendleft(reversed(ids))

    def take_ended(self, limit: int = 64) -> list[str]:
        """Up to `limit` session ids closed or expired since the last call (oldest first)."""
        with self._lock:
            self._sweep(self.clock())
            return [self._ended.popleft() for _ in range(min(limit, len(self._ended)))]

    def open(self, agent_id: str, ttl_s: Optional[float] = None) -> Session:
        if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not 0 < ttl_s <= self.ttl_s):
            raise SessionError(400, "ttl_s", f"ttl_s: must be a number in (0, {self.ttl_s:g}] seconds (got {ttl_s!r})")
        now = self.clock()
        with self._lock:
            self._sweep(now)
            if len(self._s) >= self.max_sessions:
                raise SessionError(429, "sessions", f"sessions: {self.max_sessions} sessions are open (profile "
                                   "sessions.max_sessions); close one (DELETE) or wait for one to expire")
            sid = "sess_" + secrets.token_hex(8)
            s = self._s[sid] = Session(sid, agent_id, now, now, float(ttl_s or self.ttl_s))
            return s

    def get(self, sid: str) -> Session:
        with self._lock:
            self._sweep(self.clock())
            s = self._s.get(sid)
        if s is None:
            raise SessionError(404, "x-session-id", f"x-session-id: unknown or expired session '{sid}' (sessions expire "
                               f"after {self.ttl_s:g} s without a request; open a new one with POST /agentserve/v1/sessions)")
        return s

    def owned(self, sid: str, agent_id: Optional[str]) -> Session:
        """The session, if `agent_id` owns it (None: the admin, who may see any)."""
        s = self.get(sid)
        if agent_id is not None and s.agent_id != agent_id:
            # not who it belongs to: another agent's ids are not for this caller to learn
            raise SessionError(403, "x-session-id", f"x-session-id: session '{sid}' belongs to another agent, "
                               f"not '{agent_id}'")
        return s

    def use(self, sid: str, agent_id: str) -> Session:
        """A request through the session: it must belong to the same agent; renews the TTL."""
        s = self.owned(sid, agent_id)
        with self._lock:
            s.last_used = self.clock()
            s.requests += 1
        return s

    def close(self, sid: str, agent_id: Optional[str] = None) -> Session:
        s = self.owned(sid, agent_id)
        with self._lock:
            if self._s.pop(sid, None) is not None:
                self._ended.append(sid)
        return s

    def __len__(self) -> int:
        with self._lock:
            self._sweep(self.clock())
            return len(self._s)
