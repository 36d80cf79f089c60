"""Sampling features beyond temperature/top-p/top-k (penalties, logit_bias, min_new_tokens,
min_p) on AGENTSPARK: every output must equal the plain server's for the
same request, also for a request without those features decoded in the same batch.

Each featured request is checked to really change plain SGLang's output (against its
feature-free twin in the batch), so a worker that ignored the feature would fail here.
The servers are the suite's shared plain/AGENTSPARK pair.
Seeded sampled requests (seeded_sampling.py): SGLang alone ignores sampling_seed on CPU (its
deterministic mode is GPU-only); with our plugin a seed fixes the output, and AGENTSPARK must
emit the plain server's output for that seed, token for token, also in a mixed batch."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import requests

pytestmark = pytest.mark.server

PROMPT = "Count from 1 to 20: 1, 2, 3,"
CHAT = "Give me three tips for sleeping better."


def chat(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def plain_srv(plain_server):  # the shared pair: a second pair would hold 4 servers' memory at once
    return plain_server


@pytest.fixture(scope="module")
def spark_srv(agentspark_server):
    return agentspark_server


def gen(url: str, texts: list[str], params: list[dict]) -> list[list[int]]:
    """The requests at once (one client each), so the scheduler decodes them in one batch."""
    def one(i: int) -> list[int]:
        r = requests.post(url + "/generate", json={"text": texts[i], "sampling_params": params[i]}, timeout=900)
        r.raise_for_status()
        return r.json()["output_ids"]

    with cf.ThreadPoolExecutor(len(texts)) as ex:
        return list(ex.map(one, range(len(texts))))


def both(plain_srv, spark_srv, texts: list[str], params: list[dict]) -> list[list[int]]:
    """The batch on both servers; AGENTSPARK must reproduce plain row for row."""
    ref = gen(plain_srv.url, texts, params)
    got = gen(spark_srv.url, texts, params)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert b == a, (i, params[i], a, b)
    return ref


@pytest.mark.parametrize("penalty", [{"frequency_penalty": 1.0}, {"presence_penalty": 1.0},
                                     {"repetition_penalty": 1.5}])
def test_greedy_penalties_match_plain(plain_srv, spark_srv, penalty: dict) -> None:
    # Each penalty changes this answer from its 13th token on (the twin, same prompt without
    # it, shows that); the counting request drafts freely once the penalised one is done.
    base = {"temperature": 0, "max_new_tokens": 24}
    ref = both(plain_srv, spark_srv, [chat(CHAT), chat(CHAT), PROMPT], [{**base, **penalty}, base, base])
    assert ref[0] != ref[1], "the penalty does not change plain output: this test could not fail"


def test_logit_bias_bans_a_token_like_plain(plain_srv, spark_srv) -> None:
    base = {"temperature": 0, "max_new_tokens": 24}
    free = gen(plain_srv.url, [chat(CHAT)], [base])[0]
    banned = max(set(free[1:]), key=free[1:].count)  # a token a decode step emits
    params = [{**base, "logit_bias": {str(banned): -100.0}}, base]
    ref = both(plain_srv, spark_srv, [chat(CHAT), chat(CHAT)], params)
    assert banned not in ref[0] and banned in ref[1]


def test_min_new_tokens_matches_plain(plain_srv, spark_srv) -> None:
    # The answer ends (EOS) after a few tokens; min_new_tokens masks EOS/stop tokens until
    # reached, so plain goes on past where the twin stops.
    text = chat("What is 2+2?")
    base = {"temperature": 0, "max_new_tokens": 16}
    ref = both(plain_srv, spark_srv, [text, text, chat(CHAT)],
               [{**base, "min_new_tokens": 12}, base, base])
    assert len(ref[1]) < 12 <= len(ref[0]), ref


def test_min_p_sampled_matches_plain(plain_srv, spark_srv) -> None:
    # min_p = 1 keeps only the most likely token: a sampled request (temperature 1) that is
    # deterministic, so it compares exactly. A worker ignoring min_p samples at temperature 1.
    sampled = {"temperature": 1.0, "min_p": 1.0, "max_new_tokens": 24}
    greedy = {"temperature": 0, "max_new_tokens": 24}
    ref = both(plain_srv, spark_srv, [chat(CHAT), chat(CHAT), PROMPT], [sampled, greedy, greedy])
    assert ref[0] == ref[1]  # plain: min_p = 1 at temperature 1 is the argmax


SEEDED_TEXTS = [chat(CHAT), chat("Write a Python function that reverses a linked list."),
                chat("Call the weather tool for Paris and answer in JSON."), PROMPT]


def test_seed_fixes_the_output_and_matters(plain_srv) -> None:
    sp = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 24}
    a = gen(plain_srv.url, [chat(CHAT)] * 3, [{**sp, "sampling_seed": 11}, {**sp, "sampling_seed": 11},
                                              {**sp, "sampling_seed": 12}])
    assert a[0] == a[1], "same seed, same prompt, same batch: different outputs"
    again = gen(plain_srv.url, [chat(CHAT)], [{**sp, "sampling_seed": 11}])[0]
    assert again == a[0], "the seed's output changed with the batch it ran in"
    assert a[2] != a[0], "another seed gave the same 24 sampled tokens: the seed is not used"


@pytest.mark.parametrize("extra", [{"temperature": 0.8, "top_p": 0.95}, {"temperature": 1.0, "top_k": 20},
                                   {"temperature": 1.2, "min_p": 0.05}])
def test_seeded_sampled_matches_plain(plain_srv, spark_srv, extra: dict) -> None:
    # Four prompts (chat, code, a tool-call turn, a counting prompt that drafts well) with a
    # seed each, plus an unseeded greedy row in the same batch.
    base = {"max_new_tokens": 40, **extra}
    params = [{**base, "sampling_seed": 100 + i} for i in range(len(SEEDED_TEXTS))]
    texts = SEEDED_TEXTS + [PROMPT]
    params.append({"temperature": 0, "max_new_tokens": 40})
    before = _accepted(spark_srv.url)
    ref = both(plain_srv, spark_srv, texts, params)
    assert len({tuple(r) for r in ref[:4]}) == 4
    # the worker really verified drafts of seeded rows (not only width-1 steps); min_p rows
    # take SGLang's sampler at width 1 (module docstring of dspark_worker), so only the others
    if "min_p" not in extra:
        assert _accepted(spark_srv.url) > before


def test_seeded_chat_completions_match_plain(plain_srv, spark_srv) -> None:
    from openai import OpenAI

    out = []
    for srv in (plain_srv, spark_srv):
        client = OpenAI(base_url=srv.url + "/v1", api_key="none")
        r = client.chat.completions.create(model="default", seed=2026, temperature=0.8, max_tokens=40,
                                           messages=[{"role": "user", "content": "Write a haiku about servers."}])
        out.append(r.choices[0].message.content)
    assert out[0] == out[1]


def _accepted(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(requests.get(url + "/metrics", timeout=60).text)
               for s in fam.samples if s.name == "agentserve:spec_accepted_drafts_total")
