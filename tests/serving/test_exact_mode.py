"""Exact mode (server.deterministic, sglang_ext/cpu/exact.py) in real servers, bf16: greedy
answers do not depend on the batch, and the speculative server's equal plain's byte for byte,
alone and with several requests at once (the shipped dtype; the other server tests use fp32)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import PROFILES

pytestmark = pytest.mark.server

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome, with a docstring and two examples.",
    "Give me three tips for sleeping better.",
    "Explain what a hash map is in two sentences.",
    "List the planets of the solar system as a JSON array of objects with name and order.",
    "Write a SQL query that returns the ten most recent orders with their customer names.",
    "Describe the water cycle for a ten-year-old.",
]


def _exact(name: str) -> dict:
    from agentserve.profile import load_profile

    base = load_profile(PROFILES / name)
    return {"model": base.model.model_copy(update={"dtype": "bfloat16"}),
            "server": base.server.model_copy(update={"deterministic": True})}


@pytest.fixture(scope="module")
def exact_pair(start_server) -> tuple:
    plain = start_server("plain-fp32.yaml", name="exact-plain", **_exact("plain-fp32.yaml"))
    spec = start_server("agentspark-fp32.yaml", name="exact-agentspark", **_exact("agentspark-fp32.yaml"))
    return plain, spec


def _gen(url: str, prompt: str) -> dict:
    body = {"text": f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
            "sampling_params": {"temperature": 0, "max_new_tokens": 64}}
    r = requests.post(url + "/generate", json=body, timeout=900)
    r.raise_for_status()
    return r.json()


def _answers(url: str, concurrent: int) -> list[dict]:
    with ThreadPoolExecutor(concurrent) as pool:
        return list(pool.map(lambda p: _gen(url, p), PROMPTS))


def test_greedy_output_is_the_same_alone_in_a_batch_and_speculative(exact_pair) -> None:
    plain, spec = exact_pair
    runs = {"plain alone": _answers(plain.url, 1), "plain x4": _answers(plain.url, 4),
            "agentspark alone": _answers(spec.url, 1), "agentspark x4": _answers(spec.url, 4)}
    ref = [a["output_ids"] for a in runs["plain alone"]]
    for name, outs in runs.items():
        for p, r, o in zip(PROMPTS, ref, outs):
            assert o["output_ids"] == r, (name, p)
    verified = sum(o["meta_info"].get("spec_verify_ct", 0) for k in ("agentspark alone", "agentspark x4") for o in runs[k])
    accepted = sum(o["meta_info"].get("spec_accept_token_num", 0) or 0 for o in runs["agentspark x4"])
    assert verified > 0, "the speculative path never ran"
    print("verify steps", verified, "accepted drafts at x4", accepted)


def test_exact_mode_is_announced_in_the_log(exact_pair) -> None:
    for srv in exact_pair:
        text = open(srv.log_path).read()
        assert "exact mode (server.deterministic)" in text
        # each weight shape says which kernel passed its row-invariance check on this CPU
        assert "exact: 576x576 products in" in text
