"""The fp32 GEMM path (sglang_ext/cpu/matmul.py) inside a real bf16 SGLang server: the same
prompt scored by a server forced onto it (`server.cpu_matmul: fp32`) and by one on the
native bf16 kernels gives the same log-probabilities up to bf16 rounding (teacher forcing: the
prompt's own tokens, scored by prefill, never two free-running greedy answers), and the forced
server's log shows the fp32 kernels were chosen and passed their float64 check."""

from __future__ import annotations

from typing import Iterator

import pytest
import requests

from tests.conftest import bf16_pair

PROMPT = ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
          "    return fibonacci(n - 1) + fibonacci(n - 2)\n\nThe function above computes Fibonacci numbers by "
          "recursion. A faster version keeps the last two values in a loop:")


@pytest.fixture(scope="module")
def matmul_pair() -> Iterator[tuple]:
    yield from bf16_pair("test-bf16", "cpu_matmul", ("native", "fp32"))


def _score(url: str) -> tuple[list[float], list[int]]:
    r = requests.post(url + "/generate", timeout=300, json={
        "text": PROMPT, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"temperature": 0, "max_new_tokens": 12}})
    r.raise_for_status()
    m = r.json()["meta_info"]
    lps = [x[0] for x in m["input_token_logprobs"] if x[0] is not None]
    return lps, [x[1] for x in m["output_token_logprobs"]]


@pytest.mark.server
def test_fp32_gemm_scores_like_native_bf16(matmul_pair: tuple) -> None:
    native, forced = matmul_pair
    lp_n, out_n = _score(native.url)
    lp_f, out_f = _score(forced.url)
    assert len(lp_n) == len(lp_f) > 40
    diffs = sorted(abs(a - b) for a, b in zip(lp_n, lp_f))
    # bf16 activations: the two kernels differ by rounding only; a wrong product (transposed,
    # stale or mis-shaped weights) moves prompt log-probabilities by whole nats
    assert diffs[len(diffs) // 2] < 0.05, diffs
    assert sum(diffs) / len(diffs) < 0.1, diffs
    assert len(out_f) == 12
    log = forced.log_path.read_text()
    assert "cpu_matmul" in log and "fp32_t from 2 rows" in log
    assert "fp32_t" not in native.log_path.read_text()
    assert "off the float64 reference" not in log  # every kernel passed its check on this CPU (selfcheck.py)
