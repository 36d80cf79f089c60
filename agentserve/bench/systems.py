"""The serving systems every bench compares: drafter settings layered on a base profile."""

from __future__ import annotations

from pathlib import Path

from agentserve.profile import DrafterSpec, Profile

REPO = Path(__file__).resolve().parents[2]
DRAFTER = str(REPO / "drafters" / "smollm2-135m-dspark-corpus")
# full-vocabulary checkpoint for SGLang's own DSPARK worker (it has no truncated-draft-vocab map)
FULL_VOCAB_DRAFTER = str(REPO / "drafters" / "smollm2-135m-dspark")

SYSTEMS: dict[str, DrafterSpec] = {
    "plain": DrafterSpec(algorithm="none"),
    "ngram": DrafterSpec(algorithm="ngram", num_draft_tokens=8),
    # our worker, model drafts only
    "dspark": DrafterSpec(algorithm="agentspark", path=DRAFTER, num_draft_tokens=8, radix_drafting=False),
    # our worker, model drafts + copied continuations from the session index
    # (copies verify up to 15 tokens a step, the model its block of 7: docs/bench-cpu/copy-width)
    "hybrid": DrafterSpec(algorithm="agentspark", path=DRAFTER, num_draft_tokens=16, radix_drafting=True),
    # ablation: hybrid with every row padded to the step's widest (SGLang's uniform verify layout)
    "hybrid_padded": DrafterSpec(algorithm="agentspark", path=DRAFTER, num_draft_tokens=16, radix_drafting=True,
                                 ragged_verify=False),
    # SGLang's own DSPARK worker (CUDA/NPU/XPU only: a GPU baseline)
    "upstream": DrafterSpec(algorithm="dspark", path=FULL_VOCAB_DRAFTER, num_draft_tokens=8),
}


def split_system(system: str) -> tuple[str, dict[str, object]]:
    """'name[@field=value...]' -> ('name', {field: value}); values are read as YAML."""
    import yaml

    name, *sets = system.split("@")
    name = name.partition("#")[0]  # 'plain#2': the same system run again (bench serve --bracket)
    fields: dict[str, object] = {}
    for item in sets:
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--systems: '{item}' in '{system}' is not FIELD=VALUE")
        fields[key] = yaml.safe_load(val)
    return name, fields


def with_overrides(prof: Profile, system: str) -> Profile:
    """The profile with the system's '@field=value' overrides, validated like a profile file (a bad
    field or value names itself); a dotted key sets a nested field: drafter.path=drafters/new, and
    an item of a list by its name or index: interactivity_tiers.interactive.admit_at=plain_speed."""
    fields = split_system(system)[1]
    if not fields:
        return prof
    data = prof.model_dump()
    for key, val in fields.items():
        *path, leaf = key.split(".")
        node = data
        for part in path:
            if isinstance(node, list):  # a list item by its name, else by its index
                named = [x for x in node if isinstance(x, dict) and x.get("name") == part]
                if named:
                    node = named[0]
                    continue
                if part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                    continue
                raise ValueError(f"--systems: '{key}' in '{system}': no item '{part}' in that list")
            if not isinstance(node.get(part), (dict, list)):
                raise ValueError(f"--systems: '{key}' in '{system}': '{part}' is not a profile section")
            node = node[part]
        node[leaf] = val
    return Profile.model_validate(data)


def system_profile(base: Profile, system: str) -> Profile:
    """The profile a bench system serves: the base profile with the system's drafter and overrides.
    Admission and prefill pacing are off: every system runs the same load in the same order (the
    tier gate would hold a speculative server's requests back, and the pacer, which lives in our
    worker, would hold prefills for its tier promises, trading new requests' time to first token
    for running ones' speed, a policy plain decoding cannot run; bench tiers measures both)."""
    return with_overrides(base.model_copy(update={"drafter": SYSTEMS[split_system(system)[0]], "admission_control": False,
                                                  "prefill_max_defer_s": 0.0}),
                          system)


def log_name(system: str) -> str:
    """A file-name-safe form of a system name (overrides may hold paths)."""
    return "".join(c if c.isalnum() or c in "-_.=@" else "_" for c in system)
