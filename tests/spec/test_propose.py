"""propose(): which rows draft what, decided before the step (spec/propose.py). The worker's
phases around it are exercised in the server tests; here the choice itself, with the copy
decisions, the draft gate and the cost check standing in for the worker's parts."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from sglang_ext.copy.chooser import HybridDecision
from sglang_ext.spec import propose as P
from sglang_ext.spec.stats import StepStats


class _Gate:
    cuts_verify = False

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def decide(self, rid: str, t_token: float, t_extra: float) -> str:
        return self.answer

    def begin_step(self, bs: int) -> None:
        pass


def _setup(monkeypatch: pytest.MonkeyPatch, decisions: list[Any], gate: str, drafter: bool = True) -> tuple[Any, Any]:
    monkeypatch.setattr(P, "copy_decisions", lambda w, batch, greedy: decisions)
    monkeypatch.setattr(P.planning, "draft_costs", lambda w, bs, kv=0.0: (0.01, 0.001))
    seen: dict[str, Any] = {}

    def best_width(w: Any, decs: Any, copy_rows: list[int], model_rows: list[int], rids: Any, bs: int, kv: float = 0.0):
        seen["copy_rows"], seen["model_rows"] = list(copy_rows), list(model_rows)
        return 4, {i: 2 for i in copy_rows}

    monkeypatch.setattr(P.planning, "best_width", best_width)

    def model_drafts(w: Any, inp: Any, prop: Any) -> None:
        for i in prop.model_rows:
            prop.max_len[i] = w.copy_block

    monkeypatch.setattr(P, "_model_drafts", model_drafts)
    w = SimpleNamespace(drafter=object() if drafter else None, block=4, copy_block=4, scheduler_mode="confidence",
                        gate=_Gate(gate), device="cpu")
    n = len(decisions)
    inp = SimpleNamespace(bs=n, rids=[f"r{i}" for i in range(n)], batch=None, kv=0.0, sampler_rows=[],
                          sampling=SimpleNamespace(is_greedy=torch.ones(n, dtype=torch.bool)))
    return w, inp, seen


def _model_pick(tokens: list[int]) -> HybridDecision:
    """The chooser preferred the model over this copy (expected model > expected copy)."""
    return HybridDecision("model", 0.5, 2.0, tokens=tokens, confidences=[0.6] * len(tokens))


@pytest.mark.parametrize("drafter", [True, False])
def test_a_row_the_model_will_not_draft_takes_the_copy_it_passed_over(monkeypatch: pytest.MonkeyPatch, drafter: bool) -> None:
    decisions = [_model_pick([5, 6]), HybridDecision("model", 0.0, 2.0), None,
                 HybridDecision("copy", 3.0, 1.0, tokens=[7, 8, 9], confidences=[0.9] * 3)]
    w, inp, seen = _setup(monkeypatch, decisions, gate="skip", drafter=drafter)
    prop = P.propose(w, inp, StepStats(batch_size=4))  # type: ignore[arg-type]
    assert seen == {"copy_rows": [3, 0], "model_rows": []}
    assert prop.copy_rows == [3, 0] and decisions[0].use_copy and not decisions[1].use_copy
    assert prop.drafts is not None and prop.drafts[0, :2].tolist() == [5, 6] and prop.max_len.tolist() == [2, 0, 0, 3]


def test_a_row_the_model_drafts_keeps_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    decisions = [_model_pick([5, 6]), None]
    w, inp, seen = _setup(monkeypatch, decisions, gate="draft")
    prop = P.propose(w, inp, StepStats(batch_size=2))  # type: ignore[arg-type]
    assert seen == {"copy_rows": [], "model_rows": [0, 1]} and not decisions[0].use_copy
    assert prop.model_rows == [0, 1] and prop.max_len.tolist() == [4, 4]


@pytest.mark.parametrize("cuts", [False, True])
def test_a_drafted_row_whose_verify_the_plan_cuts_is_not_vetoed_by_the_width_check(
        monkeypatch: pytest.MonkeyPatch, cuts: bool) -> None:
    decisions = [None, None]
    w, inp, seen = _setup(monkeypatch, decisions, gate="draft")
    w.gate.cuts_verify = cuts
    monkeypatch.setattr(P.planning, "best_width", lambda *a, **k: (1, {}))  # the check prices the block out
    prop = P.propose(w, inp, StepStats(batch_size=2))  # type: ignore[arg-type]
    assert prop.model_rows == ([0, 1] if cuts else []) and prop.drafting == cuts


def test_sessions_the_http_layer_ended_lose_their_draft_index() -> None:
    from types import SimpleNamespace

    from sglang_ext.copy.suffix_index import SessionIndexRegistry
    from sglang_ext.spec.worker import AgentSparkWorker
    from sglang_ext.tiers.policy import ended_sessions

    reg = SessionIndexRegistry()
    for k in ("session:a", "session:b", "session:c"):
        reg.extend(k, [1, 2, 3, 4])
    w = SimpleNamespace(index=reg, keys={"r1": "session:c"}, _session_seen={"session:a": 0.0, "session:b": 0.0})
    req = SimpleNamespace(sampling_params=SimpleNamespace(custom_params={"__agentserve_ended": "a,c"}))
    assert ended_sessions(req) == ["a", "c"]
    AgentSparkWorker.end_sessions(w, ended_sessions(req))  # type: ignore[arg-type]
    assert reg.get("session:a", create=False) is None and "session:a" not in w._session_seen
    assert reg.get("session:b", create=False) is not None  # not ended
    assert reg.get("session:c", create=False) is not None  # a request of it still runs
    assert ended_sessions(SimpleNamespace(sampling_params=SimpleNamespace(custom_params={}))) == []


def test_model_rows_draft_their_trained_block_inside_a_wider_copy_width() -> None:
    # num_draft_tokens 16 with a drafter trained on blocks of 3: copy rows may verify 15, the
    # model's rows carry its 3 drafts (their q, their confidences) and verify at most those
    b, g, vocab = 3, 6, 11
    blk = SimpleNamespace(tokens=torch.tensor([[1, 2, 3]]), confidences=torch.tensor([[0.9, 0.8, 0.7]]),
                          q_probs=torch.softmax(torch.randn(1, b, vocab), -1))
    w = SimpleNamespace(block=b, copy_block=g, device="cpu", vocab=vocab, generator=None,
                        drafter=SimpleNamespace(draft_block=lambda *a, **k: blk),
                        contexts=SimpleNamespace(trim=lambda rid, a: None, get=lambda rid: None))
    inp = SimpleNamespace(rids=["c", "m"], seq_lens=torch.tensor([10, 12]), anchors=torch.tensor([4, 5]),
                          sampling=SimpleNamespace(index=lambda idx: None),
                          noise=SimpleNamespace(seeds=[None, None]))
    prop = P.Proposal([None, None], copy_rows=[0], model_rows=[1],
                      drafts=torch.zeros(2, g, dtype=torch.long), conf=torch.zeros(2, g),
                      max_len=torch.tensor([g, 0]))
    prop.drafts[0] = torch.tensor([7, 7, 7, 7, 7, 7])
    P._model_drafts(w, inp, prop)  # type: ignore[arg-type]
    assert prop.drafts[1].tolist() == [1, 2, 3, 0, 0, 0] and prop.max_len.tolist() == [g, b]
    assert prop.conf[1, :b].tolist() == pytest.approx([0.9, 0.8, 0.7]) and prop.conf[1, b:].sum() == 0
    assert prop.q_probs is not None and prop.q_probs.shape == (2, g, vocab)
    assert torch.equal(prop.q_probs[1, :b], blk.q_probs[0]) and prop.q_probs[0, :, 7].sum() == g  # copy rows one-hot
