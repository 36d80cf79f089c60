"""Logprobs on AGENTSPARK's speculative path: a request asking for them must get, for every
emitted token, the values plain decoding returns (top-k and chosen token ids too), also when
several tokens come out of one verify step and when the step uses SGLang's own sampler.

Before this, such a request crashed the scheduler (SGLang's output processor read logprobs
the worker had not written), taking every other request down with it."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import requests
from openai import OpenAI
from transformers import AutoTokenizer

pytestmark = pytest.mark.server

TOL = 2e-3  # fp32 servers: the verify forward and the decode forward agree to ~1e-5


def chat(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def gen(url: str, body: dict) -> dict:
    r = requests.post(url + "/generate", json=body, timeout=900)
    r.raise_for_status()
    return r.json()


def close(a: list, b: list, what: str) -> None:
    assert len(a) == len(b), (what, len(a), len(b))
    for i, (x, y) in enumerate(zip(a, b)):
        assert x[1] == y[1], (what, i, x, y)  # same token id
        assert abs(x[0] - y[0]) < TOL, (what, i, x, y)


def test_greedy_logprobs_equal_plain_with_multi_token_steps(plain_server, agentspark_server) -> None:
    # The prompt is answered once first, so the repeat copies long drafts from the radix tree
    # and several tokens (each with its logprob) come out of one verify step; three other
    # requests (one without logprobs) decode beside it.
    repeat = chat("Name the days of the week, one per line.")
    others = [chat(p) for p in ("What is the capital of Spain?", "Give me a word that rhymes with cat.", "Say hi.")]
    sp = {"temperature": 0, "max_new_tokens": 32}
    gen(agentspark_server.url, {"text": repeat, "sampling_params": sp})
    bodies = [{"text": t, "sampling_params": sp, "return_logprob": True, "top_logprobs_num": 3,
               "token_ids_logprob": [28, 198]} for t in [repeat] + others[:2]]
    bodies.append({"text": others[2], "sampling_params": sp})
    ref = [gen(plain_server.url, b) for b in bodies]
    with cf.ThreadPoolExecutor(len(bodies)) as ex:
        got = list(ex.map(lambda b: gen(agentspark_server.url, b), bodies))
    for r, g in zip(ref[:3], got[:3]):
        assert g["output_ids"] == r["output_ids"]
        rm, gm = r["meta_info"], g["meta_info"]
        assert len(gm["output_token_logprobs"]) == len(g["output_ids"])
        close(rm["output_token_logprobs"], gm["output_token_logprobs"], "chosen")
        for i, (a, b) in enumerate(zip(rm["output_top_logprobs"], gm["output_top_logprobs"])):
            close(a, b, f"top-3 at {i}")
        for i, (a, b) in enumerate(zip(rm["output_token_ids_logprobs"], gm["output_token_ids_logprobs"])):
            close(a, b, f"token ids at {i}")
    assert got[3]["output_ids"] == ref[3]["output_ids"]
    assert got[0]["meta_info"]["spec_accept_length"] > 2.0, got[0]["meta_info"]  # multi-token steps ran


def test_sampled_logprobs_are_the_targets(plain_server, agentspark_server, model_dir) -> None:
    # Sampled tokens differ between servers, so the plain server scores the spec server's own
    # output (prefill logprobs of prompt + completion). At temperature 1 those are the values
    # decoding reports; a wrong position, row or temperature would not match.
    prompt = chat("Write a short poem about the sea.")
    g = gen(agentspark_server.url, {"text": prompt, "return_logprob": True,
                                    "sampling_params": {"temperature": 1.0, "max_new_tokens": 32}})
    n_prompt = g["meta_info"]["prompt_tokens"]
    prompt_ids = AutoTokenizer.from_pretrained(model_dir)(prompt, add_special_tokens=False).input_ids
    assert len(prompt_ids) == n_prompt
    assert g["meta_info"]["spec_verify_ct"] > 0
    score = gen(plain_server.url, {"input_ids": prompt_ids + g["output_ids"],
                                   "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                                   "return_logprob": True, "logprob_start_len": n_prompt - 1})
    scored = score["meta_info"]["input_token_logprobs"][1:]  # position n_prompt onwards
    close(scored, g["meta_info"]["output_token_logprobs"], "sampled")


def test_penalised_request_logprobs_equal_plain(plain_server, agentspark_server) -> None:
    # A penalty sends the step through SGLang's own sampler (width 1); its logprobs still arrive.
    body = {"text": chat("Count from 1 to 20."), "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"temperature": 0, "max_new_tokens": 24, "frequency_penalty": 1.0}}
    r, g = gen(plain_server.url, body), gen(agentspark_server.url, body)
    assert g["output_ids"] == r["output_ids"]
    close(r["meta_info"]["output_token_logprobs"], g["meta_info"]["output_token_logprobs"], "penalised")


def test_openai_chat_logprobs(plain_server, agentspark_server) -> None:
    kw = dict(model="default", messages=[{"role": "user", "content": "Name three fruits."}], temperature=0,
              max_tokens=24, logprobs=True, top_logprobs=2)
    outs = [OpenAI(base_url=s.url + "/v1", api_key="x").chat.completions.create(**kw) for s in (plain_server, agentspark_server)]
    a, b = (o.choices[0].logprobs.content for o in outs)
    assert outs[0].choices[0].message.content == outs[1].choices[0].message.content
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.token == y.token and abs(x.logprob - y.logprob) < TOL
        assert [t.token for t in x.top_logprobs] == [t.token for t in y.top_logprobs]


def test_sampled_logprobs_are_temperature_scaled(plain_server, agentspark_server, model_dir) -> None:
    # At temperature T the reported logprobs are log_softmax(logits / T): the gap between a
    # position's two best tokens is 1/T times the gap in the raw logprobs, which the plain
    # server's prefill scoring of the same text gives (its normaliser cancels in the gap).
    prompt = chat("Describe a forest in two sentences.")
    g = gen(agentspark_server.url, {"text": prompt, "return_logprob": True, "top_logprobs_num": 2,
                                    "sampling_params": {"temperature": 0.5, "max_new_tokens": 24}})
    assert g["meta_info"]["spec_verify_ct"] > 0
    prompt_ids = AutoTokenizer.from_pretrained(model_dir)(prompt, add_special_tokens=False).input_ids
    n = len(prompt_ids)
    score = gen(plain_server.url, {"input_ids": prompt_ids + g["output_ids"], "return_logprob": True,
                                   "logprob_start_len": n - 1, "top_logprobs_num": 2,
                                   "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    raw = score["meta_info"]["input_top_logprobs"][1:]
    got = g["meta_info"]["output_top_logprobs"]
    assert len(got) == len(g["output_ids"]) and len(raw) >= len(got)
    for i, (a, b) in enumerate(zip(raw, got)):
        assert [x[1] for x in a] == [x[1] for x in b], (i, a, b)  # same two best tokens
        assert (b[0][0] - b[1][0]) == pytest.approx((a[0][0] - a[1][0]) / 0.5, abs=5e-3), (i, a, b)
