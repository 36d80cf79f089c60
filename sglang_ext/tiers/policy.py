"""Tier-aware inputs to the prefix scheduler (scheduler process).

The HTTP middleware tags each request with its agent label, tier and session through SGLang's
`custom_params` (keys `__agentserve_*`). Per decode step this module turns the tags and each
request's speed so far into the scheduler's per-request `weight` and `max_len`:

- weight_r = 2^(P - priority_r) * lag_r, where P is the largest priority number among the
  profile's tiers (the most important tier counts most) and lag_r = clamp(target_r /
  achieved_r, 1, 4) for a request of a tier with a target that is behind it (else 1).
  Algorithm 1 then spends the verify budget on the requests whose promise is at risk first.
- If any request of a tier with a target is behind it, requests of less important tiers get
  max_len 0 this step: they decode one token without drafts, which keeps the verified batch
  B — and so the step time SPS(B)^-1 the promised requests wait for — small.

Lossless: weights and caps are computed from tokens already emitted and wall-clock time of
earlier steps, never from the current step's drafts, so they are constant within a block
(the causality condition of scheduler.py); they only change how many drafts are verified.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from agentserve.profile import Profile, Tier


MIN_TOKENS = 4  # measure a request's speed only after this many decode tokens
MAX_LAG = 4.0


def request_tags(req: Any) -> tuple[str, str, str]:
    """(agent label, tier, session) from a Req's custom_params; "" when absent."""
    cp = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    if not isinstance(cp, dict):
        return "", "", ""
    return (str(cp.get("__agentserve_agent") or ""), str(cp.get("__agentserve_tier") or ""),
            str(cp.get("__agentserve_session") or ""))


def ended_sessions(req: Any) -> list[str]:
    """Session ids the HTTP layer saw closed or expired, carried on this request's custom_params."""
    cp = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    raw = cp.get("__agentserve_ended") if isinstance(cp, dict) else None
    return [s for s in str(raw).split(",") if s] if raw else []


class TierPolicy:
    def __init__(self, tiers: Mapping[str, Tier], clock: Callable[[], float] = time.monotonic) -> None:
        self.tiers = dict(tiers)  # name -> the profile's Tier (the one tier type)
        self.top = max((t.priority for t in tiers.values()), default=0)
        self.clock = clock
        self._start: dict[str, tuple[float, int]] = {}  # rid -> (time of first decode step, tokens then)
        self.behind: dict[str, int] = {}  # tier -> running requests below target at the last step

    @classmethod
    def from_profile(cls, prof: Profile) -> TierPolicy:
        return cls({t.name: t for t in prof.interactivity_tiers})

    def forget(self, rid: str) -> None:
        self._start.pop(rid, None)

    def achieved(self, rid: str, tokens: int, now: float) -> Optional[float]:
        """Decode tok/s of a request so far (None until MIN_TOKENS tokens since its first step)."""
        st = self._start.get(rid)
        if st is None:
            self._start[rid] = (now, tokens)
            return None
        t0, n0 = st
        if tokens - n0 < MIN_TOKENS or now <= t0:
            return None
        return (tokens - n0) / (now - t0)

    def inputs(self, rids: Sequence[str], tiers: Sequence[str], tokens: Sequence[int]
               ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(weight [R], max_len cap [R] or None), from past information only."""
        if not self.tiers:
            return None, None
        now = self.clock()
        r = len(rids)
        w = torch.ones(r, dtype=torch.float64)
        behind_prio: Optional[int] = None  # most important priority with a request behind target
        self.behind = {}
        prio = []
        for i, (rid, tier, n) in enumerate(zip(rids, tiers, tokens)):
            info = self.tiers.get(tier)
            p = info.priority if info is not None else self.top
            prio.append(p)
            w[i] = 2.0 ** (self.top - p)
            target = info.target_tokens_per_s if info is not None else None
            if target:
                got = self.achieved(rid, n, now)
                if got is not None and got < target:
                    self.behind[tier] = self.behind.get(tier, 0) + 1
                    w[i] *= min(MAX_LAG, target / max(got, 1e-6))
                    behind_prio = p if behind_prio is None else min(behind_prio, p)
        if behind_prio is None:
            return w, None
        cap = torch.tensor([0 if p > behind_prio else 1 << 30 for p in prio], dtype=torch.long)
        return w, cap
