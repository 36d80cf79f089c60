"""The HTTP process's agent state, built once from the served profile: API keys, sessions, the
tier gate and the per-agent table. The middleware and the agentserve routes share one."""

from __future__ import annotations

import os
from typing import Any, Optional

from agentserve.profile import Profile
from sglang_ext import config
from sglang_ext.http.auth import Keys
from sglang_ext.http.metrics import AgentTable
from sglang_ext.http.sessions import SessionStore
from sglang_ext.tiers.admission import TierGate
from sglang_ext.tiers.load_report import CapacityModel

MAX_AGENT_LABELS = 32


class AgentRegistry:
    def __init__(self, max_labels: Optional[int] = None, prof: Optional[Profile] = None) -> None:
        self.prof = prof if prof is not None else config.served()
        p = self.prof
        self.keys = Keys.from_profile(p)
        self.table = AgentTable(max_labels if max_labels is not None
                                else int(os.environ.get("AGENTSERVE_MAX_AGENT_LABELS", MAX_AGENT_LABELS)))
        self.sessions = SessionStore(ttl_s=p.sessions.ttl_s, max_sessions=p.sessions.max_sessions)
        # the scheduler's load report: the one channel from the worker (tiers/load_report.py)
        self.report = CapacityModel.for_port(p.server.port)
        self.gate = TierGate(p.interactivity_tiers, enabled=p.admission_control,
                             capacity=self.report if p.admission_predict else None, margin=p.admission_margin)

    def snapshot(self) -> dict[str, Any]:
        """The console's table: agents (with the worker's τ and copy share), tiers, sessions."""
        rows = self.table.rows()
        spec = self.report.agent_spec()
        for r in rows:
            sp = spec.get(self.table.label_of(r["agent_id"]))
            if sp:
                r.update(sp)
        tiers = self.gate.snapshot()
        for t in tiers:  # the console's name for the gate's refusals
            t["refused"] = t["rejected"] + t["timed_out"]
        return {"agents": rows, "tiers": tiers, "sessions": {"open": len(self.sessions), "ttl_s": self.sessions.ttl_s,
                                                              "max_sessions": self.sessions.max_sessions,
                                                              "expired": self.sessions.expired_total}}


_REGISTRY: Optional[AgentRegistry] = None


def registry() -> AgentRegistry:
    """The process's registry, built on first use (after the served profile is known)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = AgentRegistry()
    return _REGISTRY
