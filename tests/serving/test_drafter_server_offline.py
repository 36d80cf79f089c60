"""The server drafts as well as the offline evaluation says.

The shipped drafter drafts model-only (no copies) and every draft is verified (`verify_all`), one
request at a time, greedy. Offline, the same drafter and the target (HF transformers, fp32) replay
the server's own answers block by block: the first block is anchored at the first answer token,
each next one at `anchor + accepted + 1`, as the server's decode steps do. Per position, the
server's Prometheus counters (drafts reached with all earlier ones accepted, drafts accepted) must
match the offline count: a server that fed the drafter other features (wrong layers, positions
shifted by one, the prompt dropped) accepts far less than offline, and that is what this catches.
Two fp32 implementations may round a near-tie apart, and the server's last block may be cut by
max_new_tokens, so counts may differ by a few drafts, not more.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import requests
import torch

pytestmark = pytest.mark.server

DRAFTER = Path(__file__).resolve().parents[2] / "drafters" / "smollm2-135m-dspark"
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Explain in three sentences why the sky is blue.",
    "A shop sells pens at 3 dollars each. How much do 14 pens cost? Show your steps.",
    "List the planets of the solar system in order from the sun, one per line.",
    "Write a short email asking a colleague to review a pull request.",
    "What is the difference between a list and a tuple in Python?",
]
N_NEW = 48


def _per_position(url: str) -> tuple[dict[int, float], dict[int, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    reached: dict[int, float] = collections.defaultdict(float)
    accepted: dict[int, float] = collections.defaultdict(float)
    for fam in text_string_to_metric_families(requests.get(url + "/metrics", timeout=60).text):
        for s in fam.samples:
            if s.name == "agentserve:spec_reached_drafts_total":
                reached[int(s.labels["position"])] += s.value
            elif s.name == "agentserve:spec_accepted_drafts_total":
                accepted[int(s.labels["position"])] += s.value
    return reached, accepted


def test_server_acceptance_per_position_matches_offline(start_server, model_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agentserve.profile import DrafterSpec
    from sglang_ext.dspark.drafter import DSparkDrafter
    from sglang_ext.dspark.offline_eval import evaluate_sequence

    srv = start_server("agentspark-fp32.yaml", name="test-drafter-offline", admission_control=False,
                       drafter=DrafterSpec(algorithm="agentspark", path=str(DRAFTER), num_draft_tokens=8,
                                           radix_drafting=False, scheduler="verify_all"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    r0, a0 = _per_position(srv.url)
    answers = []
    for p in PROMPTS:  # one at a time: batch 1, as offline
        ids = list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           return_dict=True)["input_ids"])
        out = requests.post(srv.url + "/generate", timeout=600, json={
            "input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": N_NEW}}).json()
        answers.append((ids, out["output_ids"]))
    r1, a1 = _per_position(srv.url)
    server_reached = {k: r1[k] - r0.get(k, 0.0) for k in r1}
    server_accepted = {k: a1[k] - a0.get(k, 0.0) for k in a1}

    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    drafter = DSparkDrafter.from_pretrained(str(DRAFTER), dtype=torch.float32, target=target).eval()
    g = drafter.config.block_size
    gen = torch.Generator().manual_seed(0)
    off_reached: dict[int, int] = collections.defaultdict(int)
    off_accepted: dict[int, int] = collections.defaultdict(int)
    for ids, out in answers:
        seq = ids + out
        a = len(ids)  # the first answer token: the prefill sampled it, the first decode step drafts after it
        while a < len(seq) - 1:
            acc = evaluate_sequence(drafter, target, seq, [a], 0.0, gen).accept_lens[0]
            for k in range(1, min(acc + 1, g) + 1):
                off_reached[k] += 1
            for k in range(1, acc + 1):
                off_accepted[k] += 1
            a += acc + 1

    blocks = off_reached[1]
    assert blocks >= len(PROMPTS) * N_NEW // 8, off_reached  # enough blocks for the comparison to mean something
    for k in (1, 2):
        tol = max(4.0, 0.1 * off_reached[k])
        assert abs(server_reached.get(k, 0.0) - off_reached[k]) <= tol, (k, dict(server_reached), dict(off_reached))
        assert abs(server_accepted.get(k, 0.0) - off_accepted[k]) <= tol, (k, dict(server_accepted), dict(off_accepted))
