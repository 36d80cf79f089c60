"""agentserve bench's workload: every phase gets prompts no earlier phase used."""

from __future__ import annotations

import pytest

from agentserve.bench import serve as bench
from agentserve.bench import tiers as bench_tiers
from agentserve.bench.serve import phase_slices, prompts_needed


def test_phases_get_disjoint_prompts() -> None:
    temps, concs = [0.0, 1.0], [1, 4, 8]
    sl = phase_slices(temps, concs, per_domain=2)
    assert list(sl) == [(t, c) for t in temps for c in concs]
    used: list[int] = []
    for (_, conc), s in sl.items():
        idx = list(range(s.start, s.stop))
        assert len(idx) == max(conc, 2)  # no prompt repeated within a phase either
        assert not set(idx) & set(used)
        used += idx
    assert prompts_needed(temps, concs, 2) == len(used) == 2 * (2 + 4 + 8)


def test_bench_flags_reject_non_positive_token_limits(capsys) -> None:
    for main in (bench.main, bench_tiers.main):
        with pytest.raises(SystemExit) as e:
            main(["--max-agent-prompt", "0"])
        assert e.value.code == 2
        assert "--max-agent-prompt" in capsys.readouterr().err
