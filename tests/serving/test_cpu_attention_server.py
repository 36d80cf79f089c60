"""fp32 decode attention for half-precision models on a CPU (server.cpu_attention, verify_attention.py)
inside a real bf16 SGLang server: the same greedy request decoded with the attention in fp32 and
in bf16 gives the same tokens' log-probabilities up to bf16 rounding, and the server's log
shows that the fp32 path ran (and that the native server never took it)."""

from __future__ import annotations

from typing import Iterator

import pytest
import requests

from tests.conftest import bf16_pair

PROMPT = ("Here is a list of the planets of the solar system, in order from the sun, with one fact about "
          "each of them:\n1. Mercury:")


@pytest.fixture(scope="module")
def attn_pair() -> Iterator[tuple]:
    yield from bf16_pair("test-attn", "cpu_attention", ("native", "fp32"))


def _decode(url: str) -> tuple[list[float], list[int]]:
    r = requests.post(url + "/generate", timeout=300, json={
        "text": PROMPT, "return_logprob": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}})
    r.raise_for_status()
    m = r.json()["meta_info"]
    return [x[0] for x in m["output_token_logprobs"]], [x[1] for x in m["output_token_logprobs"]]


@pytest.mark.server
def test_fp32_decode_attention_decodes_like_bf16(attn_pair: tuple) -> None:
    native, fp32 = attn_pair
    lp_n, tok_n = _decode(native.url)
    lp_f, tok_f = _decode(fp32.url)
    assert len(tok_n) == len(tok_f) == 24
    # rounding may flip a near tie late in the answer; compare the prefix both decoded alike
    same = next((i for i, (a, b) in enumerate(zip(tok_n, tok_f)) if a != b), 24)
    assert same >= 8, (tok_n, tok_f)
    diffs = [abs(a - b) for a, b in zip(lp_n[:same], lp_f[:same])]
    # a wrong attention (mis-gathered slots, dropped heads, a missing scale) moves the chosen
    # tokens' log-probabilities by whole nats; the dtype changes them by rounding only
    assert max(diffs) < 0.25 and sum(diffs) / len(diffs) < 0.05, diffs
    assert "decode attention runs in fp32" in fp32.log_path.read_text()
    assert "decode attention runs in fp32" not in native.log_path.read_text()
