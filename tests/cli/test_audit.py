"""`agentserve audit`: its divergence finding and its usage errors (no server needed)."""

from __future__ import annotations

import pytest

from agentserve import audit
from agentserve.cli import main


def test_first_difference() -> None:
    assert audit.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert audit.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert audit.first_difference([1, 2], [1, 2, 3]) == 2  # one answer stopped: its stop token differs
    assert audit.first_difference([], [4]) == 0


def test_token_at_uses_the_stop_token_past_the_end() -> None:
    assert audit._token_at(([7, 8], 2), 1) == 8
    assert audit._token_at(([7, 8], 2), 2) == 2
    assert audit._token_at(([7, 8], None), 2) is None  # ended by max_new_tokens


def test_summary_and_flags() -> None:
    r = audit.AuditResult("bfloat16", 4, prompts=4, max_new_tokens=16, bound=0.25, identical=2)
    r.divergences += [audit.Divergence(0, 5, 11, 12, 0.05, 0.05, False), audit.Divergence(3, 1, 9, 10, 1.2, 1.4, True)]
    s = r.summary()
    assert s["rate"] == 0.5 and s["flagged"] == 1 and s["max_pair_gap"] == 1.4 and s["first_positions"] == [1, 5]


def test_prompts_come_round_robin_from_the_domains(model_dir) -> None:
    from transformers import AutoTokenizer

    ps = audit.load_prompts(5, AutoTokenizer.from_pretrained(model_dir), ("chat", "math"))
    assert len(ps) == 5 and len({tuple(p) for p in ps}) == 5
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        audit.load_prompts(2, None, ("poetry",))


def test_usage_errors_name_the_flag(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["audit", "--profile", "profiles/cpu-dspark.yaml", "--baseline", "profiles/cpu-demo.yaml",
              "--concurrency", "1,x"])
    assert e.value.code == 2 and "--concurrency" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["audit", "--profile", "profiles/cpu-dspark.yaml", "--baseline", "profiles/cpu-dspark.yaml"])
    assert e.value.code == 2 and "drafter.algorithm must be none" in capsys.readouterr().err
    assert main(["audit", "--profile", "no/such.yaml", "--baseline", "profiles/cpu-demo.yaml"]) == 2
