"""End-to-end on a tiny random HF Llama target: training CLI (generate data, train, resume,
held-out tau, STS), and speculative decoding with the trained drafter."""
from __future__ import annotations

import json
import os

import pytest
import torch

from sglang_ext.dspark.drafter import DSparkDrafter
from sglang_ext.dspark.generate import speculative_generate
from sglang_ext.dspark.sps import SPSTable
from sglang_ext.dspark.train import dspark_loss, main

from toy import toy_config

TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Write a python function to find the maximum of three numbers.",
    "Compose an engaging travel blog post about a recent trip to Hawaii.",
    "def add(a, b): return a + b  # add two numbers and return the sum",
    "How many bolts in total does it take? Please reason step by step.",
]


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<eos>", "<pad>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    tdir = str(root / "target")
    tok.save_pretrained(tdir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaky, learnable target
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(tdir)
    pdir = root / "prompts"
    pdir.mkdir()
    for fn, lines in (("gsm8k.jsonl", TEXTS[:3]), ("mt-bench.jsonl", TEXTS[2:])):
        with open(pdir / fn, "w") as f:
            for i in range(40):
                f.write(json.dumps({"turns": [lines[i % len(lines)] + f" ({i})"]}) + "\n")
    return tdir, str(pdir)


def test_train_cli_end_to_end(tiny_target, tmp_path) -> None:
    tdir, pdir = tiny_target
    out = str(tmp_path / "draft")
    common = ["--target", tdir, "--out", out, "--block-size", "4", "--layers", "1",
              "--markov-rank", "8", "--target-layers", "3", "--device", "cpu", "--domains", "math,chat",
              "--prompts-dir", pdir, "--num-prompts", "10", "--gen-tokens", "20", "--gen-batch", "10",
              "--eval-prompts", "3", "--anchors", "4", "--prompt-seq-frac", "0.3", "--no-progress", "--save-every", "10", "--warmup", "5"]
    assert main(common + ["--steps", "20", "--calibrate"]) == 0
    for fn in ("config.json", "model.safetensors", ".train/train_state.pt", "train_report.json",
               "sts_calibration.json", ".train/data/generated.jsonl"):
        assert os.path.exists(os.path.join(out, fn)), fn
    rep = json.load(open(os.path.join(out, "train_report.json")))
    assert rep["steps"] == 20
    assert 1.0 <= rep["T=1.0"]["all"]["tau"] <= 5.0
    assert len(rep["T=0.0"]["all"]["cond_accept"]) == 4
    assert main(common + ["--steps", "25", "--resume", "--eval-prompts", "0"]) == 0
    assert json.load(open(os.path.join(out, "train_report.json")))["steps"] == 25
    d = DSparkDrafter.from_pretrained(out)
    assert d.calibration is not None and "embed_tokens" not in d._modules


def test_loss_decreases_on_fixed_batch() -> None:
    cfg = toy_config(num_hidden_layers=1)
    torch.manual_seed(0)
    d = DSparkDrafter(cfg)
    d.attach_shared(torch.randn(48, 32), torch.randn(48, 32))
    feats = torch.randn(1, 30, 96)
    ids = torch.randint(0, 40, (1, 30))
    tlogits = torch.randn(1, 30, 48) * 3
    anchors = torch.tensor([[2, 9, 15, 20]])
    opt = torch.optim.AdamW(d.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, logs = dspark_loss(d, feats, ids, tlogits, anchors)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.7 * first


def test_speculative_greedy_equals_plain_greedy(tiny_target, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    tdir, _ = tiny_target
    target = AutoModelForCausalLM.from_pretrained(tdir).eval()
    from sglang_ext.dspark.config import DSparkConfig
    cfg = DSparkConfig.for_target(target.config, num_draft_layers=1, block_size=4, markov_rank=8,
                                  target_layer_ids=[0, 2])
    torch.manual_seed(1)
    d = DSparkDrafter(cfg)
    d.attach_target(target)
    prompt = [5, 17, 33, 8, 2]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(target(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    ref = ids[len(prompt):]
    sps = SPSTable.from_cost_model(1.0, 0.3, range(1, 16))
    for s in (None, sps):
        stats: dict[str, list[int]] = {}
        got = speculative_generate(d, target, prompt, 24, temperature=0.0, sps=s, stats=stats)
        assert got == ref
    # Drafter that copies the target's own greedy continuation is accepted every time
    # (exercises context truncation with long accepts): check via sampled run length sanity.
    got = speculative_generate(d, target, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len(got) == 10
