"""fp32 decode attention for half-precision models on a CPU (server.cpu_attention, cpu/attention.py)
inside a real bf16 SGLang server, compared with the native bf16 attention by log-probabilities of
the same tokens, never by free-running greedy paths (issue 26: on another CPU the two greedy
answers parted at a near-tie on the second token, and the old test failed by chance).

Teacher forcing through decode: while both servers' answers agree, every decode step of both was
fed the same tokens, so the top-5 log-probabilities at those positions are compared (a wrong
attention, mis-gathered slots, dropped heads or a missing scale, moves them by whole nats; the
dtype by bf16 rounding: the logits are bf16, whose step at a logit of 16-32 is 0.125, so a few
steps apart for the lower-ranked tokens (0.55 nats seen on an AVX-512 EPYC): < 1 nat each,
< 0.08 on average). Where the answers part, the native server scores both tokens by prefill of
the common prefix: they must be a near-tie (< 0.5 nats), as rounding cannot flip anything wider. Holds on any x86-64 CPU and whichever GEMM
kernels the chooser measures (cpu_matmul: auto)."""

from __future__ import annotations

from typing import Iterator

import pytest
import requests

from tests.conftest import bf16_pair

PROMPTS = [
    ("Here is a list of the planets of the solar system, in order from the sun, with one fact about "
     "each of them:\n1. Mercury:"),
    "def is_prime(n):\n    \"\"\"Return True if n is a prime number.\"\"\"\n",
    "The three primary colours of light are red, green and blue. When they are mixed",
]
N_NEW = 24
TOL_EACH, TOL_MEAN, NEAR_TIE = 1.0, 0.08, 0.5  # nats


@pytest.fixture(scope="module")
def attn_pair() -> Iterator[tuple]:
    yield from bf16_pair("test-attn", "cpu_attention", ("native", "fp32"))


def _decode(url: str, ids: list[int]) -> tuple[list[int], list[dict[int, float]]]:
    r = requests.post(url + "/generate", timeout=600, json={
        "input_ids": ids, "return_logprob": True, "top_logprobs_num": 5,
        "sampling_params": {"temperature": 0, "max_new_tokens": N_NEW, "ignore_eos": True}})
    r.raise_for_status()
    m = r.json()["meta_info"]
    return [x[1] for x in m["output_token_logprobs"]], [{x[1]: x[0] for x in top} for top in m["output_top_logprobs"]]


def _forced(url: str, ids: list[int], tokens: list[int]) -> dict[int, float]:
    """Log-probabilities of `tokens` after `ids`, by one prefill (teacher forcing)."""
    r = requests.post(url + "/generate", timeout=600, json={
        "input_ids": ids, "return_logprob": True, "token_ids_logprob": tokens,
        "sampling_params": {"temperature": 0, "max_new_tokens": 1}})
    r.raise_for_status()
    return {x[1]: x[0] for x in r.json()["meta_info"]["output_token_ids_logprobs"][0]}


@pytest.mark.server
def test_fp32_decode_attention_scores_like_bf16(attn_pair: tuple, model_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    native, fp32 = attn_pair
    diffs: list[float] = []
    for text in PROMPTS:
        ids = tok(text).input_ids
        tok_n, top_n = _decode(native.url, ids)
        tok_f, top_f = _decode(fp32.url, ids)
        assert len(tok_n) == len(tok_f) == N_NEW
        same = next((i for i, (a, b) in enumerate(zip(tok_n, tok_f)) if a != b), N_NEW)
        for i in range(1, same):  # position 0 is the prefill's (same attention on both): decode steps only
            common = top_n[i].keys() & top_f[i].keys()
            assert tok_n[i] in common, (text, i, top_n[i], top_f[i])
            diffs += [abs(top_n[i][t] - top_f[i][t]) for t in common]
        if same < N_NEW:
            a, b = tok_n[same], tok_f[same]
            lp = _forced(native.url, ids + tok_n[:same], [a, b])
            assert abs(lp[a] - lp[b]) < NEAR_TIE, ("the answers parted where the tokens are no near-tie",
                                                   text, same, a, b, lp)
    assert len(diffs) >= 5 * 12, f"too few decode positions compared: {len(diffs)} log-probabilities"
    assert max(diffs) < TOL_EACH and sum(diffs) / len(diffs) < TOL_MEAN, sorted(diffs)[-10:]
    assert "decode attention runs in fp32" in fp32.log_path.read_text()
    assert "decode attention runs in fp32" not in native.log_path.read_text()
    assert "fp32 SDPA is off the float64 reference" not in fp32.log_path.read_text()
