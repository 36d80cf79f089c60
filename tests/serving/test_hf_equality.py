"""Greedy output through our SGLang server equals HF transformers' greedy output (fp32)."""

from __future__ import annotations

import pytest
import requests
import torch

pytestmark = pytest.mark.server

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Q: What is 12 times 7?\nA:", "Once upon a time, in a small village,"]


def test_greedy_matches_transformers(plain_server, model_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            hf = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        r = requests.post(plain_server.url + "/generate", timeout=300, json={
            "input_ids": ids[0].tolist(), "sampling_params": {"temperature": 0, "max_new_tokens": 32}}).json()
        ours = r["output_ids"]
        if hf and hf[-1] == tok.eos_token_id and ours == hf[:-1]:
            ours = ours + [tok.eos_token_id]  # SGLang does not return the stop token
        assert ours == hf, (prompt, tok.decode(ours), tok.decode(hf))
