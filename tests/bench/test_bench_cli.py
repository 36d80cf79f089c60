"""`agentserve bench serve|replay|tiers` and the old spellings, and that no bench module needs
another to be imported first (no import cycles)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import agentserve.bench
from agentserve.bench.cli import SUBCOMMANDS, main, resolve

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, expect", [
    (["serve", "--quick"], ("serve", ["--quick"])),
    (["replay", "--turns", "2"], ("replay", ["--turns", "2"])),
    (["tiers", "--quick"], ("tiers", ["--quick"])),
    (["--tiers", "--quick"], ("tiers", ["--quick"])),  # the old spellings
    (["--quick", "--replay"], ("replay", ["--quick"])),
    (["--quick", "--systems", "plain"], ("serve", ["--quick", "--systems", "plain"])),
    ([], ("serve", [])),
])
def test_subcommands_and_aliases(argv: list[str], expect: tuple[str, list[str]]) -> None:
    assert resolve(argv) == expect


def test_each_subcommand_has_its_own_help(capsys) -> None:
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"agentserve bench {name}" in out
        # the closed-loop agent replay has no warm-up phase (its agents' first turns are cold by design)
        assert ("--warmup-s" in out) == (name != "agents")
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


def test_the_agentserve_cli_routes_bench_here() -> None:
    from agentserve.cli import _PLUGGABLE

    assert dict((n, m) for n, m, _ in _PLUGGABLE)["bench"] == "agentserve.bench.cli"


def test_every_bench_module_imports_alone() -> None:
    """A cycle shows as an ImportError when a module of the cycle is the first one imported."""
    mods = [m.name for m in pkgutil.iter_modules(agentserve.bench.__path__)]
    assert {"client", "metrics", "report", "serve", "replay", "tiers", "cli"} <= set(mods)
    code = ("import importlib, sys\n"
            "for m in sys.argv[1:]:\n"
            "    for k in [k for k in sys.modules if k.startswith('agentserve.bench')]:\n"
            "        del sys.modules[k]\n"
            "    importlib.import_module('agentserve.bench.' + m)\n")
    r = subprocess.run([sys.executable, "-c", code, *mods], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_no_bench_module_imports_a_bench_entry_point() -> None:
    """Shared helpers live in their own modules: serve, replay and tiers import none of each other."""
    import ast

    entry = {"serve", "replay", "tiers", "cli"}
    for name in entry | {"client", "metrics", "report", "workload", "prom", "systems", "args", "tier_systems", "tiers_report"}:
        tree = ast.parse((REPO / "agentserve" / "bench" / f"{name}.py").read_text())
        imported = {n.module.rsplit(".", 1)[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                    and n.module.startswith("agentserve.bench.")}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "agentserve.bench"
                     for a in n.names}
        assert not imported & (entry - {name}), (name, imported & entry)


def test_a_bench_system_takes_profile_overrides_and_names_a_bad_field() -> None:
    from agentserve.bench.systems import log_name, system_profile
    from agentserve.profile import load_profile

    base = load_profile(Path(__file__).resolve().parents[2] / "profiles" / "cpu-demo.yaml")
    prof = system_profile(base, "dspark@drafter.path=drafters/other@drafter.num_draft_tokens=5")
    assert (prof.drafter.path, prof.drafter.num_draft_tokens, prof.drafter.radix_drafting) == ("drafters/other", 5, False)
    assert prof.admission_control is False and prof.model == base.model
    assert base.prefill_max_defer_s > 0 and prof.prefill_max_defer_s == 0  # same order of work as plain
    assert system_profile(base, "hybrid@prefill_max_defer_s=5").prefill_max_defer_s == 5  # unless asked
    assert "/" not in log_name("dspark@drafter.path=drafters/other")
    with pytest.raises(Exception, match="drafter.nope"):
        system_profile(base, "dspark@drafter.nope=1")
    with pytest.raises(ValueError, match="not FIELD=VALUE"):
        system_profile(base, "dspark@drafter.path")
    # a list item by its name or index (tiers)
    name = base.interactivity_tiers[0].name
    assert system_profile(base, f"plain@interactivity_tiers.{name}.admit_at=plain_speed").interactivity_tiers[0].admit_at == "plain_speed"
    assert system_profile(base, "plain@interactivity_tiers.0.queue_timeout_s=7").interactivity_tiers[0].queue_timeout_s == 7
    with pytest.raises(ValueError, match="no item 'nope'"):
        system_profile(base, "plain@interactivity_tiers.nope.admit_at=plain_speed")
    with pytest.raises(Exception, match="admit_at"):
        system_profile(base, f"plain@interactivity_tiers.{name}.admit_at=always")


def test_bracket_runs_plain_again_as_the_same_system() -> None:
    from agentserve.bench.serve import build_parser
    from agentserve.bench.systems import SYSTEMS, split_system, system_profile
    from agentserve.bench.args import parse_systems
    from agentserve.profile import load_profile

    base = load_profile(Path(__file__).resolve().parents[2] / "profiles" / "cpu-demo.yaml")
    assert split_system("plain#2") == ("plain", {})
    assert system_profile(base, "plain#2") == system_profile(base, "plain")
    ap = build_parser()
    assert parse_systems(ap, "plain,hybrid,plain#2", SYSTEMS) == ["plain", "hybrid", "plain#2"]
    assert ap.parse_args(["--bracket"]).bracket is True
    with pytest.raises(SystemExit):
        parse_systems(ap, "nope#2", SYSTEMS)


def test_bracket_needs_plain_among_the_systems(capsys) -> None:
    from agentserve.bench.serve import main

    with pytest.raises(SystemExit):
        main(["--bracket", "--systems", "hybrid", "--out", "/nonexistent/never-written"])
    assert "--bracket" in capsys.readouterr().err


def test_rounds_interleave_the_systems_in_new_processes(capsys) -> None:
    from agentserve.bench.serve import expand_rounds, main

    assert expand_rounds(["plain", "dspark@drafter.path=x"], 2) == ["plain", "dspark@drafter.path=x", "plain#2",
                                                                     "dspark#2@drafter.path=x"]
    from agentserve.bench.systems import split_system

    assert split_system("dspark#2@drafter.path=x") == ("dspark", {"drafter.path": "x"})
    assert expand_rounds(["plain"], 1) == ["plain"]
    for argv in (["--rounds", "2", "--bracket"], ["--rounds", "2", "--systems", "plain,hybrid#2"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            main([*argv, "--out", "/nonexistent/never-written"])
        assert "--" in capsys.readouterr().err
