"""API keys: who is calling (an agent, the admin, or nobody) and what they may reach.

Keys come from the profile's `auth` section and per-agent `key_env` (agentserve/profile.py):
a keys file `{admin: <key>, agents: {<agent id>: <key>}}` and/or environment variables, read
once when the server starts; never from the profile itself. Clients send
`Authorization: Bearer <key>` (what the openai client sends as its api_key).

With keys configured:
- /health and /health_generate are open (load balancers probe them);
- an agent's key reaches the generation routes, /v1/models and its own sessions;
- the admin key reaches everything: /metrics, /agentserve/v1/agents, session listing, SGLang's
  other endpoints (cache flush, weight updates, ...), and generation as any agent;
- anything else is 401 (no or unknown key) or 403 (an agent's key on an admin route).
With no keys configured the server is open, as without this module, and says so at start-up.
Keys are compared in constant time (hmac.compare_digest), every key each time.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import yaml

from agentserve.profile import Profile
from sglang_ext.http.errors import HttpError

log = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/generate")
PUBLIC_PATHS = ("/health", "/health_generate")
AGENT_PATHS = GENERATION_PATHS + ("/v1/models",)
SESSIONS = "/agentserve/v1/sessions"

# The server's own warmup requests (SGLang sends them to itself before it reports ready) carry
# this key; it is made fresh in each process and never leaves it.
INTERNAL_KEY = secrets.token_urlsafe(32)


class AuthConfigError(RuntimeError):
    """The profile names keys the server cannot read: it refuses to start rather than run open."""


@dataclass(frozen=True)
class Principal:
    agent: Optional[str]  # None for the admin
    admin: bool = False


ADMIN = Principal(agent=None, admin=True)


class Keys:
    def __init__(self, entries: list[tuple[bytes, Principal]]) -> None:
        self._entries = entries

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    @classmethod
    def from_profile(cls, prof: Profile, environ: Mapping[str, str] = os.environ) -> Keys:
        entries: list[tuple[str, Principal]] = []
        auth = prof.auth
        if auth.keys_file is not None:
            entries += _read_keys_file(Path(auth.keys_file))
        if auth.admin_key_env is not None:
            entries.append((_env_key(environ, auth.admin_key_env, "auth.admin_key_env"), ADMIN))
        for agent, spec in prof.agents.items():
            if spec.key_env is not None:
                entries.append((_env_key(environ, spec.key_env, f"agents.{agent}.key_env"), Principal(agent)))
        seen: dict[str, Principal] = {}
        for key, who in entries:
            if key in seen and seen[key] != who:
                raise AuthConfigError("auth: one key is given to two callers; every agent needs its own key")
            seen[key] = who
        if not entries:
            if auth.configured:
                raise AuthConfigError("auth: keys are configured but none was found")
            log.warning("agentserve: no API keys configured: the server is OPEN (any caller may claim any agent "
                        "and tier). Set auth.keys_file or agents.<id>.key_env in the profile to require keys.")
        else:
            log.info("agentserve: API keys required (%d agent key(s), admin key %s)",
                     sum(1 for _, w in entries if not w.admin), "set" if any(w.admin for _, w in entries) else "not set")
        return cls([(k.encode(), w) for k, w in entries] + ([(INTERNAL_KEY.encode(), ADMIN)] if entries else []))

    def lookup(self, presented: Optional[str]) -> Optional[Principal]:
        """The caller a key belongs to; every stored key is compared, in constant time each."""
        if presented is None:
            return None
        got = presented.encode(errors="replace")
        found: Optional[Principal] = None
        for key, who in self._entries:
            if hmac.compare_digest(key, got):
                found = who
        return found


def _env_key(environ: Mapping[str, str], name: str, field: str) -> str:
    key = environ.get(name, "").strip()
    if not key:
        raise AuthConfigError(f"{field}: environment variable {name} is not set (or empty)")
    return key


def _read_keys_file(path: Path) -> list[tuple[str, Principal]]:
    # errors name the profile field, not the file's path or contents (both are secrets' neighbours)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise AuthConfigError(f"auth.keys_file: cannot read it ({type(e).__name__})") from None
    if not isinstance(data, dict) or set(data) - {"admin", "agents"}:
        raise AuthConfigError("auth.keys_file: expected a mapping with `admin: <key>` and/or `agents: {<id>: <key>}`")
    out: list[tuple[str, Principal]] = []
    if data.get("admin") is not None:
        if not isinstance(data["admin"], str) or not data["admin"].strip():
            raise AuthConfigError("auth.keys_file: admin: must be a non-empty string")
        out.append((data["admin"].strip(), ADMIN))
    agents = data.get("agents") or {}
    if not isinstance(agents, dict):
        raise AuthConfigError("auth.keys_file: agents: must map agent ids to keys")
    for agent, key in agents.items():
        if not isinstance(agent, str) or not isinstance(key, str) or not key.strip():
            raise AuthConfigError(f"auth.keys_file: agents.{agent}: must be a non-empty string key")
        out.append((key.strip(), Principal(agent)))
    return out


def bearer(headers: Mapping[str, str]) -> Optional[str]:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def authorize(keys: Keys, path: str, method: Optional[str], headers: Mapping[str, str]) -> Optional[Principal]:
    """Who the caller is (None: no keys are configured, or an open path); HttpError 401/403 when
    the caller may not reach `path`."""
    if not keys.enabled or path in PUBLIC_PATHS:
        return None
    who = keys.lookup(bearer(headers))
    if who is None:
        missing = bearer(headers) is None
        raise HttpError(401, "authorization", "authorization: " + ("an API key is required (Authorization: Bearer <key>)"
                                                                   if missing else "invalid API key"))
    if who.admin:
        return who
    listing = path.rstrip("/") == SESSIONS and method == "GET"
    if path in AGENT_PATHS or (path.startswith(SESSIONS) and not listing):
        return who
    raise HttpError(403, "authorization", f"authorization: {method} {path} needs the admin key")
