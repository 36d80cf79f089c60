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
        ({"agents": {"bot1": "gold"}}, "agents.bot1: tier 'gold'"),
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
