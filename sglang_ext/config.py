"""The profile this server was launched with, as every SGLang process sees it.

The launcher writes the served profile (paths resolved, the port actually used) to a file and
passes its path in ``AGENTSERVE_PROFILE``; each SGLang process loads and validates it once, the
first time anything asks. Consumers take typed fields of `Profile`: defaults live in
agentserve/profile.py and nowhere else.

Without ``AGENTSERVE_PROFILE`` (SGLang started by hand with our plugin installed) the defaults of
an empty profile apply. A path that is set but unreadable or invalid is an error, not a silent
fall back to defaults: the server would otherwise run without the tiers or drafter it was asked for.
"""

from __future__ import annotations

import functools
import os

from agentserve.profile import ModelSpec, Profile, load_profile

ENV = "AGENTSERVE_PROFILE"

# What a server started without a profile runs with (every field at its default).
UNCONFIGURED = Profile(name="unconfigured", model=ModelSpec(path=""))


@functools.cache
def served() -> Profile:
    path = os.environ.get(ENV)
    if not path:
        return UNCONFIGURED
    return load_profile(path)


def reset() -> None:
    """Forget the loaded profile (tests that change AGENTSERVE_PROFILE)."""
    served.cache_clear()
