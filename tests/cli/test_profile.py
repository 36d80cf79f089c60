"""Profile validation: every bad field gets a message that names it; good profiles load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agentserve.cli import main as cli_main
from agentserve.profile import ProfileError, load_profile, parse_profile

REPO = Path(__file__).resolve().parents[2]
GOOD = {
    "name": "t",
    "model": {"path": "m"},
    "interactivity_tiers": [
        {"name": "interactive", "target_tokens_per_s": 20, "priority": 0},
        {"name": "batch", "priority": 2},
    ],
    "default_tier": "batch",
}


def problems(data: object) -> list[str]:
    with pytest.raises(ProfileError) as ei:
        parse_profile(data)
    return ei.value.problems


@pytest.mark.parametrize("path", sorted((REPO / "profiles").glob("*.yaml")) + sorted((REPO / "tests" / "profiles").glob("*.yaml")))
def test_shipped_profiles_load(path: Path) -> None:
    prof = load_profile(path)
    assert Path(prof.model.path).is_absolute()
    assert prof.model.path.endswith("smollm2-135m-instruct")


def test_good_profile_and_tier_lookup() -> None:
    prof = parse_profile(GOOD)
    assert prof.interactivity_tiers[0].target_tokens_per_s == 20.0
    assert prof.tier_for().name == "batch"
    assert prof.tier_for(requested="interactive").name == "interactive"
    with pytest.raises(ProfileError, match="tier: unknown tier 'gold'"):
        prof.tier_for(requested="gold")


def test_agents_tiers_keys_and_promises() -> None:
    prof = parse_profile({**GOOD, "interactivity_tiers": [*GOOD["interactivity_tiers"], {"name": "std", "priority": 1,
                                                                                        "target_ttft_s": 2}],
                          "agents": {"planner": "interactive", "coder": {"tier": "std", "key_env": "CODER_KEY"},
                                     "bulk": {"tier": "batch", "tiers": ["batch"]}},
                          "auth": {"keys_file": "keys.yaml"}}, base=Path("/srv/profiles"))
    assert prof.auth.keys_file == "/srv/profiles/keys.yaml" and prof.auth.configured
    assert prof.tier_for("planner").name == "interactive" and prof.tier_for("coder").name == "std"
    assert prof.tier_for("stranger").name == "batch"  # the default tier
    # an agent may ask for its own tier and every less important one, or exactly its `tiers`
    assert prof.allowed_tiers("coder") == {"std", "batch"} and prof.allowed_tiers("planner") == {"interactive", "std", "batch"}
    assert prof.allowed_tiers("bulk") == {"batch"} and prof.allowed_tiers("stranger") == {"batch"}
    std, inter, batch = (next(t for t in prof.interactivity_tiers if t.name == n) for n in ("std", "interactive", "batch"))
    # a promise is kept only if every part held; a promise nobody measured is not judged
    assert std.met(1.0, 1.5) is True and std.met(100.0, 2.5) is False and std.met(None, None) is None
    assert inter.met(20.0, None) is True and inter.met(19.9, 0.1) is False
    assert batch.met(1.0, 100.0) is None and batch.share_floor == 0.05 and std.share_floor == 0.0


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"modle": {"path": "m"}}, "modle: unknown key"),
        ({"model": {}}, "model.path: required field is missing"),
        ({"model": {"path": 3}}, "model.path: input should be a valid string"),
        ({"model": {"path": "m", "dtype": "fp8"}}, "model.dtype: input should be"),
        ({"server": {"port": 70000}}, "server.port: input should be less than or equal to 65535"),
        ({"server": {"max_running_requests": "8"}}, "server.max_running_requests: input should be a valid integer"),
        ({"server": {"cpu_matmul": "fast"}}, "server.cpu_matmul: input should be 'auto', 'native' or 'fp32'"),
        ({"interactivity_tiers": [{"name": "x", "target_tokens_per_s": -5}]}, "interactivity_tiers[0].target_tokens_per_s: input should be greater than 0"),
        ({"interactivity_tiers": [{"name": "x", "speed": 5}]}, "interactivity_tiers[0].speed: unknown key"),
        ({"interactivity_tiers": [{"name": "a"}, {"name": "a"}]}, "duplicate tier name"),
        ({"interactivity_tiers": [{"name": "x", "queue_timeout_s": 0}]}, "interactivity_tiers[0].queue_timeout_s: input should be greater than 0"),
        ({"interactivity_tiers": [{"name": "x", "on_overload": "drop"}]}, "interactivity_tiers[0].on_overload: input should be 'queue' or 'reject'"),
        ({"sessions": {"ttl_s": -1}}, "sessions.ttl_s: input should be greater than 0"),
        ({"sessions": {"max_sessions": 0}}, "sessions.max_sessions: input should be greater than 0"),
        ({"sessions": {"ttl": 5}}, "sessions.ttl: unknown key"),
        ({"default_tier": "gold"}, "default_tier: 'gold' is not one of the interactivity_tiers"),
        ({"agents": {"bot1": "gold"}}, "agents.bot1.tier: tier 'gold'"),
        ({"agents": {"bot1": {"tier": "batch", "tiers": ["interactive"]}}}, "agents.bot1.tiers: must include the agent's own tier 'batch'"),
        ({"agents": {"bot1": {"tiers": ["gold"]}}}, "agents.bot1.tiers[0]: tier 'gold'"),
        ({"agents": {"bot1": {"key": "abc"}}}, "agents.bot1.key: unknown key"),
        ({"agents": {"bot1": {"key_env": "not a name"}}}, "agents.bot1.key_env: string should match pattern"),
        ({"auth": {"keys": {"a": "b"}}}, "auth.keys: unknown key"),
        ({"interactivity_tiers": [{"name": "x", "target_ttft_s": 0}]}, "interactivity_tiers[0].target_ttft_s: input should be greater than 0"),
        ({"interactivity_tiers": [{"name": "x", "min_share": 1}]}, "interactivity_tiers[0].min_share: input should be less than 1"),
        ({"admission_live": True}, "admission_live: unknown key"),
        ({"admission_plan": "drain"}, "admission_plan: unknown key"),
        ({"drafter": {"algorithm": "eagle"}}, "drafter.algorithm: input should be"),
        ({"drafter": {"algorithm": "agentspark"}}, "path: required when algorithm is 'agentspark'"),
        ({"drafter": {"algorithm": "dspark", "path": "d"}}, "drafter.algorithm: 'dspark' is SGLang's own DSPARK worker"),
    ],
)
def test_bad_fields_are_named(patch: dict, expected: str) -> None:
    data = {**GOOD, **patch}
    found = problems(data)
    assert any(expected in p for p in found), found


def test_not_a_mapping() -> None:
    assert "top level: expected a mapping" in problems(["a"])[0]


def test_cli_check_reports_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**GOOD, "interactivity_tiers": [{"name": "x", "target_tokens_per_s": -1}]}))
    assert cli_main(["profile", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "interactivity_tiers[0].target_tokens_per_s" in err and "Traceback" not in err

    missing_model = tmp_path / "nomodel.yaml"
    missing_model.write_text(yaml.safe_dump(GOOD))
    assert cli_main(["profile", "check", str(missing_model)]) == 2
    assert "model.path:" in capsys.readouterr().err

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed")
    assert cli_main(["profile", "check", str(broken)]) == 2
    assert "yaml:" in capsys.readouterr().err


def test_cli_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["profile", "check", str(REPO / "profiles" / "cpu-demo.yaml")]) == 0
    assert "ok" in capsys.readouterr().out


def test_unquoted_off_means_off_in_a_profile_and_in_a_bench_override() -> None:
    from agentserve.bench.systems import system_profile

    data = yaml.safe_load("drafter: {algorithm: agent_ngram, shared_index: off}")  # YAML 1.1: off -> False
    assert data["drafter"]["shared_index"] is False
    assert parse_profile({**GOOD, **data}).drafter.shared_index == "off"
    assert system_profile(parse_profile(GOOD), "hybrid@drafter.shared_index=off").drafter.shared_index == "off"
    assert any("shared_index" in p for p in problems({**GOOD, "drafter": {"shared_index": True}}))
