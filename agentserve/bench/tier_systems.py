"""The tier bench's systems: a name -> (drafter, scheduler, admission) and the profile it
serves; a name may end in "+mixed" and carry "@FIELD=VALUE" overrides (see bench tiers --help)."""

from __future__ import annotations

from agentserve.bench.systems import SYSTEMS, split_system, with_overrides
from agentserve.profile import Profile, Tier

TIER_SYSTEMS = {  # system -> (drafter system in bench.SYSTEMS, scheduler, admission control)
    "plain": ("plain", "tier_aware", False),
    "verify_all": ("hybrid", "verify_all", False),
    "throughput": ("hybrid", "throughput", False),
    "tier_aware": ("hybrid", "tier_aware", True),
}
DEFAULT_SYSTEMS = "plain,verify_all,throughput,tier_aware"


MIXED = "+mixed"


def base_system(system: str) -> str:
    name = split_system(system)[0]
    return name[: -len(MIXED)] if name.endswith(MIXED) else name


def tier_profile(base: Profile, system: str, tiers: list[Tier]) -> Profile:
    name = base_system(system)
    drafter_sys, sched, admission = TIER_SYSTEMS[name]
    drafter = SYSTEMS[drafter_sys].model_copy(update={"scheduler": sched})
    update: dict = {"drafter": drafter, "interactivity_tiers": tiers, "default_tier": tiers[-1].name,
                    "admission_control": admission, "agents": {}}
    if split_system(system)[0].endswith(MIXED):
        update["server"] = base.server.model_copy(update={"extra_args": [*base.server.extra_args, "--enable-mixed-chunk"]})
    return with_overrides(base.model_copy(update=update), system)


def order(system: str) -> tuple[int, str]:
    """Table order: the systems' listed order, then the name."""
    return list(TIER_SYSTEMS).index(base_system(system)), system
