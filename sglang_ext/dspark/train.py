"""DeepSpec-style DSpark training with the (frozen) HF target run online.

Per step: one target-generated sequence -> target forward (hidden states of the chosen layers,
logits) -> A random anchors in the response -> drafter blocks (context < anchor, bidirectional
block) -> teacher-forced sequential head (prev token = data token) and confidence head ->
L = 0.1*CE + 0.9*TV + 1.0*BCE(c, c*), position weights exp(-(k-1)/4).
AdamW, linear warm-up + cosine; resumable (train_state.pt); ships model.safetensors (bf16, no
embed/lm_head) + config.json (+ sts_calibration.json when --calibrate).

CLI: python -m sglang_ext.dspark.train --target DIR --out DIR [...]   (main(argv) -> int)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from .calibration import STSCalibration
from .config import DSparkConfig, default_target_layer_ids
from .data import DEFAULT_PROMPTS_DIR, encode_prompt, generate_sequences, load_prompts, read_cache
from .drafter import DSparkDrafter
from .offline_eval import evaluate_offline, target_features

LOSS_WEIGHTS = {"ce": 0.1, "tv": 0.9, "conf": 1.0}
POSITION_DECAY = 4.0


def position_weights(g: int, decay: float = POSITION_DECAY, device: Any = None) -> torch.Tensor:
    return torch.exp(-torch.arange(g, dtype=torch.float32, device=device) / decay)


def dspark_loss(
    drafter: DSparkDrafter,
    feats: torch.Tensor,
    ids: torch.Tensor,
    target_logits: torch.Tensor,
    anchors: torch.Tensor,
    use_sequential_head: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """feats [1, S, m*d], ids [1, S], target_logits [1, S, V], anchors [1, A] with a+g < S."""
    g = drafter.config.block_size
    dev = drafter.device
    h = drafter.forward_train(feats, ids, anchors)  # [1, A, g, d]
    pos = anchors.to(dev)[..., None] + torch.arange(g, device=dev)  # slot k sits at a+k
    ids_d = ids.to(dev)
    prev = torch.gather(ids_d, 1, pos.flatten(1)).view_as(pos)  # teacher forcing: t_{a+k}
    labels = torch.gather(ids_d, 1, (pos + 1).flatten(1)).view_as(pos)  # t_{a+k+1}
    logits = drafter.lm_logits(h).float()
    if use_sequential_head:
        logits = logits + drafter.markov_head.teacher_forced(prev, h).float()
    logp_d = torch.log_softmax(logits, -1)
    p_d = logp_d.exp()
    tl = torch.gather(target_logits.to(dev), 1, pos.flatten(1)[..., None].expand(-1, -1, target_logits.shape[-1]))
    p_t = torch.softmax(tl.float(), -1).view_as(p_d)
    w = position_weights(g, device=dev)
    wsum = w.sum()
    ce = -(logp_d.gather(-1, labels[..., None]).squeeze(-1))  # [1, A, g]
    l1 = (p_d - p_t).abs().sum(-1)  # ||p_d - p_t||_1
    loss_ce = (ce.mean(dim=(0, 1)) * w).sum() / wsum
    loss_tv = (l1.mean(dim=(0, 1)) * w).sum() / wsum
    total = LOSS_WEIGHTS["ce"] * loss_ce + LOSS_WEIGHTS["tv"] * loss_tv
    logs = {"ce": float(loss_ce.detach()), "tv": float(loss_tv.detach())}
    conf = drafter.confidence_logits(h, prev)
    if conf is not None:
        c_star = (1.0 - 0.5 * l1).clamp(0.0, 1.0).detach()
        bce = F.binary_cross_entropy_with_logits(conf.float(), c_star, reduction="none")
        loss_conf = (bce.mean(dim=(0, 1)) * w).sum() / wsum
        total = total + LOSS_WEIGHTS["conf"] * loss_conf
        logs["conf"] = float(loss_conf.detach())
    # acceptance proxy: mean c* at slot 0
    logs["acc1"] = float((1.0 - 0.5 * l1[..., 0]).mean().detach())
    return total, logs


def lr_at(step: int, total: int, warmup: int, base: float, min_ratio: float = 0.05) -> float:
    if step < warmup:
        return base * (step + 1) / max(1, warmup)
    prog = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


def sample_anchors(n_tokens: int, prompt_len: int, g: int, a: int, gen: random.Random) -> list[int]:
    lo = max(1, prompt_len - 1)  # anchor = last prompt token at the earliest (first response token is slot 0)
    hi = n_tokens - g - 1  # need labels t_{a+1..a+g}
    if hi < lo:
        return []
    cand = list(range(lo, hi + 1))
    gen.shuffle(cand)
    return sorted(cand[:a])


def load_target(path: str, device: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentserve train-draft", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="HF model directory of the target")
    p.add_argument("--out", required=True, help="output directory of the drafter")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--block-size", type=int, default=7)
    p.add_argument("--layers", type=int, default=1, help="draft decoder layers")
    p.add_argument("--markov-rank", type=int, default=32)
    p.add_argument("--markov-head", default="vanilla", choices=["vanilla", "gated", "rnn"])
    p.add_argument("--no-sequential", action="store_true", help="DFlash-style ablation: no Markov bias")
    p.add_argument("--target-layers", default="5",
                   help="comma list of target layer ids, or a count for evenly spaced layers")
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--mask-token-id", type=int, default=None,
                   help="token whose (frozen) embedding marks mask slots; default: pad if != eos, else V-1")
    p.add_argument("--state-dir", default=None,
                   help="where train_state.pt (optimizer, resumable), logs and the data cache go; "
                        "default OUT/.train")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", default=None,
                   help="(with --corpus) start from this drafter checkpoint's config, weights and token map "
                        "with a fresh optimizer and schedule, e.g. to train a shipped drafter further")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget for training")
    p.add_argument("--domains", default="math,code,chat")
    p.add_argument("--prompts-dir", default=DEFAULT_PROMPTS_DIR)
    p.add_argument("--data-cache", default=None, help="JSONL cache of generated sequences")
    p.add_argument("--num-prompts", type=int, default=200, help="training prompts per domain (max)")
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--gen-minutes", type=float, default=None, help="budget for data generation")
    p.add_argument("--gen-temperature", type=float, default=0.7)
    p.add_argument("--anchors", type=int, default=16, help="anchors per sequence per step")
    p.add_argument("--prompt-seq-frac", type=float, default=0.0,
                   help="fraction of steps that train on the (chat-formatted) prompts themselves, with "
                        "the target's distributions as labels; cheap extra data when generation is slow")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-prompts", type=int, default=12, help="held-out prompts per domain for tau")
    p.add_argument("--eval-temperatures", default="0,1")
    p.add_argument("--eval-anchors", type=int, default=8, help="anchors per held-out sequence")
    p.add_argument("--calibrate", action="store_true", help="fit STS on held-out rollouts")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-progress", action="store_true")
    c = p.add_argument_group("corpus training (train_cached.py): cached target features, no target per step")
    c.add_argument("--corpus", default=None, help="a corpus folder from `agentserve corpus build`; switches to cached training")
    c.add_argument("--draft-vocab", type=int, default=0, help="truncated draft vocabulary size K (0 = full)")
    c.add_argument("--topk", type=int, default=16, help="target logits kept per position in the feature cache")
    c.add_argument("--feature-cache", default=None, help="default ~/.cache/agentserve/features")
    c.add_argument("--eval-every", type=int, default=500, help="held-out tau every N steps; the best is kept")
    c.add_argument("--eval-seqs", type=int, default=60, help="held-out (eval split, greedy) sequences")
    return p


def _default_mask_token(tok: Any, vocab: int, override: Optional[int]) -> int:
    if override is not None:
        return override
    pad, eos = tok.pad_token_id, tok.eos_token_id
    if pad is not None and pad != eos and pad < vocab:
        return int(pad)
    return vocab - 1


def _resolve_device(d: str) -> str:
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return d


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.corpus:
        from .features import DEFAULT_CACHE
        from .train_cached import run

        args.feature_cache = args.feature_cache or str(DEFAULT_CACHE)
        return run(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    # Optimizer state (~10x the shipped drafter) and the data cache stay out of the shipped dir.
    state_dir = args.state_dir or os.path.join(args.out, ".train")
    os.makedirs(state_dir, exist_ok=True)
    log_path = os.path.join(state_dir, "train_log.jsonl")

    target, tok = load_target(args.target, device)
    tcfg = target.config
    n_tl = int(tcfg.num_hidden_layers)
    if "," in args.target_layers or not args.target_layers.isdigit():
        layer_ids = [int(x) for x in args.target_layers.split(",") if x.strip()]
    else:
        layer_ids = default_target_layer_ids(n_tl, int(args.target_layers))
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]

    state_path = os.path.join(state_dir, "train_state.pt")
    if args.resume and os.path.exists(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        cfg = DSparkConfig.from_dict(state["config"])
    else:
        state = None
        cfg = DSparkConfig.for_target(
            tcfg, num_draft_layers=args.layers, block_size=args.block_size,
            markov_rank=args.markov_rank, markov_head_type=args.markov_head,
            target_layer_ids=layer_ids,
            mask_token_id=_default_mask_token(tok, int(tcfg.vocab_size), args.mask_token_id),
        )
        if args.intermediate_size:
            cfg.intermediate_size = args.intermediate_size
        cfg.extra["dspark_training"] = {"no_sequential": bool(args.no_sequential)}
    drafter = DSparkDrafter(cfg).to(device)
    drafter.attach_target(target)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    step = 0
    if state is not None:
        drafter.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step = int(state["step"])
        rng.setstate(state["py_rng"])
        print(f"resumed from step {step}", file=sys.stderr)

    # ---- data
    cache = args.data_cache or os.path.join(state_dir, "data", "generated.jsonl")
    train_prompts = load_prompts(domains, "train", args.prompts_dir, args.num_prompts)
    seqs = generate_sequences(
        target, tok, train_prompts, cache, max_new_tokens=args.gen_tokens, batch_size=args.gen_batch,
        temperature=args.gen_temperature, max_minutes=args.gen_minutes, seed=args.seed,
        progress=not args.no_progress,
    )
    seqs = [s for s in seqs if len(s["ids"]) - s["prompt_len"] > cfg.block_size + 1]
    prompt_seqs: list[dict[str, Any]] = []
    if args.prompt_seq_frac > 0:
        for pr in train_prompts:
            enc = encode_prompt(tok, pr.text)
            if len(enc) > cfg.block_size + 2:
                prompt_seqs.append({"key": pr.key, "domain": pr.domain, "prompt_len": 1, "ids": enc})
    if not seqs and not prompt_seqs:
        print("no usable training sequences", file=sys.stderr)
        return 2
    print(f"{len(seqs)} generated + {len(prompt_seqs)} prompt training sequences, drafter params {drafter.num_parameters()/1e6:.2f}M "
          f"(+ shared embed/lm_head), target layers {cfg.target_layer_ids}", file=sys.stderr)

    # ---- train
    try:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=step, desc="train", disable=args.no_progress)
    except ImportError:  # pragma: no cover
        bar = None
    drafter.train()
    t_train = time.time()
    last_save = step

    def save(final: bool = False) -> None:
        torch.save({"model": drafter.state_dict(), "optim": opt.state_dict(), "step": step,
                    "config": cfg.to_dict(), "py_rng": rng.getstate()}, state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)
        drafter.save_pretrained(args.out, dtype=getattr(torch, args.save_dtype))

    ema: dict[str, float] = {}
    while step < args.steps:
        if args.max_minutes is not None and (time.time() - t_train) / 60 > args.max_minutes:
            print(f"time budget reached at step {step}", file=sys.stderr)
            break
        if prompt_seqs and (not seqs or rng.random() < args.prompt_seq_frac):
            rec = prompt_seqs[rng.randrange(len(prompt_seqs))]
        else:
            rec = seqs[rng.randrange(len(seqs))]
        ids = torch.tensor(rec["ids"], device=device)[None]
        anchors = sample_anchors(ids.shape[1], rec["prompt_len"], cfg.block_size, args.anchors, rng)
        if not anchors:
            continue
        with torch.no_grad():
            feats, tlogits = target_features(target, ids, cfg.target_layer_ids)
        for gp in opt.param_groups:
            gp["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        loss, logs = dspark_loss(drafter, feats, ids, tlogits, torch.tensor([anchors], device=device),
                                 use_sequential_head=not args.no_sequential)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        for k, v in logs.items():
            ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()})
        if step % 20 == 0:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "t": time.time() - t_start, **ema}) + "\n")
        if step - last_save >= args.save_every:
            save()
            last_save = step
    if bar is not None:
        bar.close()
    drafter.eval()
    save(final=True)

    # ---- held-out tau per position (+ STS)
    report: dict[str, Any] = {"steps": step, "train_minutes": (time.time() - t_train) / 60,
                              "params_M": drafter.num_parameters() / 1e6}
    if args.eval_prompts > 0:
        held = load_prompts(domains, "heldout", args.prompts_dir, args.eval_prompts)
        held_cache = os.path.join(os.path.dirname(os.path.abspath(cache)), "heldout.jsonl")
        hseqs = generate_sequences(target, tok, held, held_cache, max_new_tokens=args.gen_tokens,
                                   batch_size=args.gen_batch, temperature=args.gen_temperature,
                                   seed=args.seed + 1, progress=not args.no_progress)
        cal = STSCalibration()
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        for t in [float(x) for x in args.eval_temperatures.split(",") if x.strip()]:
            per = evaluate_offline(drafter, target, hseqs, temperature=t, anchors_per_seq=args.eval_anchors,
                                   seed=args.seed, use_sequential_head=not args.no_sequential,
                                   eos_token_ids=eos)
            report[f"T={t}"] = {d: {"tau": s.tau, "n": len(s.accept_lens),
                                    "cond_accept": s.conditional_acceptance()} for d, s in per.items()}
            allst = per["all"]
            if args.calibrate and allst.conf_logits:
                stats = cal.fit(t, torch.tensor(allst.conf_logits), allst.survived())
                report[f"T={t}"]["sts"] = stats
        if args.calibrate and cal.buckets:
            drafter.calibration = cal
            cal.save(os.path.join(args.out, "sts_calibration.json"))
    with open(os.path.join(args.out, "train_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
