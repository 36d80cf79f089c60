"""agentserve bench's workload and flags: every phase gets prompts no earlier phase used, warm-up
prompts are none of them, none of them is a prompt the shipped drafter trained on, and bad flags
are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentserve.bench import replay as bench_replay
from agentserve.bench import serve as bench
from agentserve.bench import tiers as bench_tiers
from agentserve.bench.workload import load_prompts, phase_slices, prompts_needed, warmup_prompts

REPO = Path(__file__).resolve().parents[2]


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


def test_a_short_domain_shrinks_its_phases_never_below_one_prompt_per_client() -> None:
    sl = phase_slices([0.0], [1, 4, 8], per_domain=6, available=18)
    assert [s.stop - s.start for s in sl.values()] == [5, 5, 8]
    assert max(s.stop for s in sl.values()) <= 18
    with pytest.raises(ValueError, match="13 distinct prompts needed, 12 held out"):
        phase_slices([0.0], [1, 4, 8], per_domain=6, available=12)


def test_measured_prompts_are_outside_the_drafters_training_split() -> None:
    from transformers import AutoTokenizer

    from sglang_ext.dspark.corpus import load_corpus

    tok = AutoTokenizer.from_pretrained(REPO / "models" / "smollm2-135m-instruct")
    measured = load_prompts(20, tok)
    assert {d: len(v) >= 18 for d, v in measured.items()} == {"code": True, "math": True, "chat": True, "agent": True}
    # every prompt the corpus trained on, as the bench would send it (first turns: the bench's
    # chat_ids; second turns: the corpus' own messages), must be none of the measured ones
    trained = set()
    for r in load_corpus(REPO / "corpus", split="train"):
        if r["domain"] in ("code", "math", "chat"):
            trained.add(tuple(r["ids"][: r["prompt_len"]]))
    sent = {tuple(p) for d in ("code", "math", "chat") for p in measured[d]}
    assert len(sent) == sum(len(measured[d]) for d in ("code", "math", "chat"))
    texts = {tok.decode(p, skip_special_tokens=True).split("user\n")[-1].split("\nassistant")[0].strip() for p in sent}
    trained_texts = {tok.decode(p, skip_special_tokens=True).split("user\n")[-1].split("\nassistant")[0].strip()
                     for p in trained}
    assert len(texts) == len(sent) and not texts & trained_texts


def test_warmup_prompts_are_none_of_the_measured_ones() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "models" / "smollm2-135m-instruct")
    measured = load_prompts(6, tok, max_agent_prompt=512)
    warm = warmup_prompts(4, tok, ["chat", "agent"], held_out=6, max_agent_prompt=512)
    assert len(warm) == 8
    seen = {tuple(p) for d in ("chat", "agent") for p in measured[d]}
    assert not seen & {tuple(p) for p in warm}


def test_bench_flags_reject_non_positive_token_limits(capsys) -> None:
    for main in (bench.main, bench_tiers.main):
        with pytest.raises(SystemExit) as e:
            main(["--max-agent-prompt", "0"])
        assert e.value.code == 2
        assert "--max-agent-prompt" in capsys.readouterr().err


@pytest.mark.parametrize("main", [bench.main, bench_replay.main, bench_tiers.main])
def test_warmup_seconds_must_not_be_negative(main, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--warmup-s", "-1"])
    assert e.value.code == 2 and "--warmup-s" in capsys.readouterr().err


def test_unknown_system_and_domain_are_named(capsys) -> None:
    for argv, flag in ((["--systems", "plain,fast"], "--systems"), (["--domains", "chat,poetry"], "--domains")):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert flag in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_replay.main(["--source", "nowhere"])
    assert "--source" in capsys.readouterr().err
