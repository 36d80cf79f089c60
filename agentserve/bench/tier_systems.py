"""The tier bench's systems: a name -> (drafter, scheduler, admission) and the profile it
serves; a name may end in "+mixed" and carry "@FIELD=VALUE" overrides (see bench tiers --help)."""

from __future__ import annotations

from agentserve.bench.systems import SYSTEMS
from agentserve.profile import Profile, Tier

TIER_SYSTEMS = {  # system -> (drafter system in bench.SYSTEMS, scheduler, admission control)
    "plain": ("plain", "tier_aware", False),
    "verify_all": ("hybrid", "verify_all", False),
    "throughput": ("hybrid", "throughput", False),
    "tier_aware": ("hybrid", "tier_aware", True),
}
DEFAULT_SYSTEMS = "plain,verify_all,throughput,tier_aware"


MIXED = "+mixed"


def _split(system: str) -> tuple[str, dict[str, object]]:
    """'name[+mixed][@field=value...]' -> ('name[+mixed]', {field: value})."""
    import yaml

    name, *sets = system.split("@")
    fields: dict[str, object] = {}
    for item in sets:
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--systems: '{item}' in '{system}' is not FIELD=VALUE")
        fields[key] = yaml.safe_load(val)
    return name, fields


def base_system(system: str) -> str:
    name = _split(system)[0]
    return name[: -len(MIXED)] if name.endswith(MIXED) else name


def tier_profile(base: Profile, system: str, tiers: list[Tier]) -> Profile:
    name = base_system(system)
    drafter_sys, sched, admission = TIER_SYSTEMS[name]
    drafter = SYSTEMS[drafter_sys].model_copy(update={"scheduler": sched})
    update: dict = {"drafter": drafter, "interactivity_tiers": tiers, "default_tier": tiers[-1].name,
                    "admission_control": admission, "agents": {}}
    if _split(system)[0].endswith(MIXED):
        update["server"] = base.server.model_copy(update={"extra_args": [*base.server.extra_args, "--enable-mixed-chunk"]})
    prof = base.model_copy(update=update)
    fields = _split(system)[1]
    if fields:  # validated like a profile file: a bad field or value names itself
        data = prof.model_dump()
        for key, val in fields.items():  # a dotted key sets a nested field: server.chunked_prefill_size=256
            *path, leaf = key.split(".")
            node = data
            for part in path:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"--systems: '{key}' in '{system}': '{part}' is not a profile section")
                node = node[part]
            node[leaf] = val
        prof = Profile.model_validate(data)
    return prof


def order(system: str) -> tuple[int, str]:
    """Table order: the systems' listed order, then the name."""
    return list(TIER_SYSTEMS).index(base_system(system)), system
