"""Who a generation request is for (agent id) and at which tier.

- agent: the API key's agent when keys are configured (a different `x-agent-id` is refused);
  otherwise header `x-agent-id`, else the OpenAI `user` field, else "anonymous";
- tier: `Profile.tier_for` (the one resolver: header `x-agent-tier`, else the agent's tier,
  else the default tier); with keys, a tier outside the agent's `allowed_tiers` is 403.
Bad values are an HttpError naming the header or field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from agentserve.profile import Profile, Tier, UnknownTier
from sglang_ext.http.auth import Principal
from sglang_ext.http.errors import HttpError

AGENT_ID_RE = re.compile(r"^[A-Za-z0-9_.:@/-]{1,128}$")
ID_RULE = "must be 1-128 characters of letters, digits and _.:@/-"


@dataclass(frozen=True)
class Caller:
    agent: str
    tier: Optional[Tier]


def agent_of(prof: Profile, who: Optional[Principal], headers: Mapping[str, str], doc: Optional[dict[str, Any]]) -> str:
    claimed = headers.get("x-agent-id")
    if who is not None and who.agent is not None:  # an agent's key: the key says who it is
        if claimed is not None and claimed.strip() != who.agent:
            raise HttpError(403, "x-agent-id", f"x-agent-id: this API key belongs to agent '{who.agent}', "
                            f"not '{_show(claimed)}'")
        return who.agent
    user = doc.get("user") if doc is not None else None
    agent = (claimed if claimed is not None else user if isinstance(user, str) and user else "anonymous").strip()
    if not AGENT_ID_RE.match(agent):
        param = "x-agent-id" if claimed is not None else "user"
        raise HttpError(400, param, f"{param}: an agent id {ID_RULE}")
    if prof.require_known_agents and agent not in prof.agents and who is None:
        raise HttpError(403, "x-agent-id", f"x-agent-id: unknown agent '{agent}' (this server only serves the "
                        "agents listed in its profile)")
    return agent


def tier_of(prof: Profile, who: Optional[Principal], agent: str, requested: Optional[str]) -> Optional[Tier]:
    try:
        tier = prof.tier_for(agent, requested.strip() if requested is not None else None)
    except UnknownTier as e:
        raise HttpError(400, "x-agent-tier", f"x-agent-tier: unknown tier '{_show(e.name)}' (known: {e.known})") from None
    if tier is not None and who is not None and not who.admin:
        allowed = prof.allowed_tiers(agent)
        if tier.name not in allowed:
            raise HttpError(403, "x-agent-tier", f"x-agent-tier: agent '{agent}' may not use tier '{tier.name}' "
                            f"(allowed: {sorted(allowed)})")
    return tier


def identify(prof: Profile, who: Optional[Principal], headers: Mapping[str, str],
             doc: Optional[dict[str, Any]]) -> Caller:
    agent = agent_of(prof, who, headers, doc)
    return Caller(agent, tier_of(prof, who, agent, headers.get("x-agent-tier")))


def _show(value: str, limit: int = 64) -> str:
    """A client's value echoed in an error, cut short."""
    return value if len(value) <= limit else value[:limit] + "..."
