"""The profile this server was launched with, as every SGLang process sees it.

The launcher passes the resolved profile to SGLang's processes in the environment
(AGENTSERVE_PROFILE_JSON); a missing or unreadable one means defaults."""

from __future__ import annotations

import json
import os
from typing import Any


def served_profile() -> dict[str, Any]:
    try:
        prof = json.loads(os.environ.get("AGENTSERVE_PROFILE_JSON") or "{}")
    except ValueError:
        return {}
    return prof if isinstance(prof, dict) else {}


def server_setting(key: str, default: str) -> str:
    """One `server.*` field of the served profile, as a string."""
    server = served_profile().get("server") or {}
    return str(server.get(key, default)) if isinstance(server, dict) else default
