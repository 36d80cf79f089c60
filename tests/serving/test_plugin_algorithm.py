"""A speculative algorithm registered by our plugin (AGENT_NGRAM) runs inside the real SGLang
scheduler on this CPU — through our sgl_kernel stand-in and target-verify attention hook —
and its greedy output is identical to plain decoding."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import requests

pytestmark = pytest.mark.server

PROMPTS = [
    # code: repeats identifiers, where n-gram drafts land
    "Write a Python class Stack with methods push, pop, peek and is_empty, each with a docstring.",
    # chat
    "Give me three tips for sleeping better.",
    # agent/tool turn: JSON echoed back
    'The tool returned {"city": "Paris", "temperature_c": 18, "conditions": "light rain"}. '
    "Repeat the tool result as JSON, then summarise it in one sentence.",
    "Repeat this list exactly three times: apple, banana, cherry, date, elderberry, fig, grape.",
]


def generate(url: str, prompt: str, n: int = 48) -> dict:
    r = requests.post(url + "/generate", timeout=600, json={"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": n}})
    r.raise_for_status()
    return r.json()


def test_agent_ngram_greedy_identical_to_plain(plain_server, agent_ngram_server) -> None:
    verify_steps = accepted = 0
    for prompt in PROMPTS:
        plain = generate(plain_server.url, prompt)
        spec = generate(agent_ngram_server.url, prompt)
        assert spec["output_ids"] == plain["output_ids"], prompt
        meta = spec["meta_info"]
        verify_steps += meta.get("spec_verify_ct", 0)
        accepted += meta.get("spec_num_correct_drafts", 0)
    # Speculation really ran (verify forwards happened) and some drafts were accepted, so
    # tokens per verify step exceeded one.
    assert verify_steps > 0
    assert accepted > 0


def test_agent_ngram_concurrent_batch_identical(plain_server, agent_ngram_server) -> None:
    # Several requests in one batch exercise the per-request masks and cache-location ops.
    with cf.ThreadPoolExecutor(4) as ex:
        plain = list(ex.map(lambda p: generate(plain_server.url, p, 32)["output_ids"], PROMPTS))
        spec = list(ex.map(lambda p: generate(agent_ngram_server.url, p, 32)["output_ids"], PROMPTS))
    assert spec == plain
