"""Long, resumable drafter training on the self-distilled corpus and cached target features.

`agentserve train-draft --corpus corpus/ ...` lands here: the target never runs per step (its
features and top-k distribution come from features.FeatureCache, built once), an optional
truncated draft vocabulary (--draft-vocab K) is fitted on the corpus' train split, a loader
thread prepares the next batches while the current step runs, held-out tau per position is
measured every --eval-every steps on the corpus' eval split, and the best checkpoint (T=0 tau)
is kept in --out while the latest resumable state stays in the state dir.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import sys
import threading
import time
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .config import DSparkConfig, default_target_layer_ids
from .corpus import load_corpus
from .drafter import DSparkDrafter
from .features import FeatureCache, build_token_map, target_topk_probs
from .offline_eval import evaluate_offline


def cached_loss(drafter: DSparkDrafter, ent: dict[str, torch.Tensor], ids: torch.Tensor, anchors: torch.Tensor,
                t2d: Optional[torch.Tensor], use_sequential_head: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The DSpark loss (0.1 CE + 0.9 TV + BCE(c, c*), weights exp(-(k-1)/4)) against cached top-k
    target probabilities.  TV is measured over the drafter's vocabulary plus the target mass it
    cannot see (outside the top-k or the draft vocabulary): an upper bound of the true L1."""
    from .train import LOSS_WEIGHTS, position_weights

    g = drafter.config.block_size
    dev = drafter.device
    feats = ent["feats"][None].to(dev, torch.float32)
    ids = ids.to(dev)[None]
    anchors = anchors.to(dev)[None]
    h = drafter.forward_train(feats, ids, anchors)  # [1, A, g, d]
    pos = anchors[..., None] + torch.arange(g, device=dev)
    prev = torch.gather(ids, 1, pos.flatten(1)).view_as(pos)
    labels = torch.gather(ids, 1, (pos + 1).flatten(1)).view_as(pos)
    logits = drafter.lm_logits(h).float()
    if use_sequential_head:
        logits = logits + drafter.markov_head.teacher_forced(prev, h).float()
    logp_d = torch.log_softmax(logits, -1)
    p_d = logp_d.exp()
    flat = pos.flatten()
    p_t = target_topk_probs(ent["top_v"][flat].to(dev), ent["top_i"][flat].to(dev), ent["lse"][flat].to(dev),
                            t2d, logits.shape[-1]).view_as(p_d)
    l1 = (p_d - p_t).abs().sum(-1) + (1.0 - p_t.sum(-1)).clamp(min=0.0)
    w = position_weights(g, device=dev)
    wsum = w.sum()
    lab = labels if t2d is None else t2d[labels]
    ok = lab >= 0  # a label outside the draft vocabulary cannot be predicted: no CE term
    ce = -(logp_d.gather(-1, lab.clamp(min=0)[..., None]).squeeze(-1)) * ok
    loss_ce = ((ce.sum(dim=(0, 1)) / ok.sum(dim=(0, 1)).clamp(min=1)) * w).sum() / wsum
    loss_tv = (l1.mean(dim=(0, 1)) * w).sum() / wsum
    total = LOSS_WEIGHTS["ce"] * loss_ce + LOSS_WEIGHTS["tv"] * loss_tv
    logs = {"ce": float(loss_ce.detach()), "tv": float(loss_tv.detach()),
            "acc1": float((1.0 - 0.5 * l1[..., 0]).mean().detach())}
    conf = drafter.confidence_logits(h, prev)
    if conf is not None:
        c_star = (1.0 - 0.5 * l1).clamp(0.0, 1.0).detach()
        bce = F.binary_cross_entropy_with_logits(conf.float(), c_star, reduction="none")
        loss_conf = (bce.mean(dim=(0, 1)) * w).sum() / wsum
        total = total + LOSS_WEIGHTS["conf"] * loss_conf
        logs["conf"] = float(loss_conf.detach())
    return total, logs


def _loader(cache: FeatureCache, seqs: list[dict[str, Any]], g: int, n_anchors: int, rng: random.Random,
            out: "queue.Queue[Any]", stop: threading.Event) -> None:
    """Background thread: reads cached features and draws anchors ahead of the training step."""
    from .train import sample_anchors

    while not stop.is_set():
        rec = seqs[rng.randrange(len(seqs))]
        anchors = sample_anchors(len(rec["ids"]), rec["prompt_len"], g, n_anchors, rng)
        if not anchors:
            continue
        item = (cache.load(rec["ids"]), torch.tensor(rec["ids"]), torch.tensor(anchors))
        while not stop.is_set():
            try:
                out.put(item, timeout=0.5)
                break
            except queue.Full:
                continue


def heldout_tau(drafter: DSparkDrafter, target: Any, held: list[dict[str, Any]], temps: list[float],
                anchors: int, seed: int, eos: list[int], use_seq: bool) -> dict[str, Any]:
    drafter.eval()
    rep: dict[str, Any] = {}
    for t in temps:
        per = evaluate_offline(drafter, target, held, temperature=t, anchors_per_seq=anchors, seed=seed,
                               use_sequential_head=use_seq, eos_token_ids=eos)
        rep[f"T={t}"] = {d: {"tau": s.tau, "n": len(s.accept_lens), "cond_accept": s.conditional_acceptance()}
                         for d, s in per.items()}
    drafter.train()
    return rep


def run(args: argparse.Namespace) -> int:
    from .train import _default_mask_token, _resolve_device, load_target, lr_at

    device = _resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    state_dir = args.state_dir or os.path.join(args.out, ".train")
    os.makedirs(state_dir, exist_ok=True)
    log_path = os.path.join(state_dir, "train_log.jsonl")
    state_path = os.path.join(state_dir, "train_state.pt")
    target, tok = load_target(args.target, device)
    tcfg = target.config
    train_recs = [r for r in load_corpus(args.corpus, "train") if len(r["ids"]) - r["prompt_len"] > args.block_size + 1]
    held = [r for r in load_corpus(args.corpus, "eval") if r["variant"] == "greedy"][: args.eval_seqs]
    if not train_recs:
        print(f"{args.corpus}: no train records yet (run `agentserve corpus build`)", file=sys.stderr)
        return 2
    state = torch.load(state_path, map_location="cpu", weights_only=False) if args.resume and os.path.exists(state_path) else None
    init = None
    if state is not None:
        cfg = DSparkConfig.from_dict(state["config"])
    elif args.init_from:
        # fresh optimizer and schedule on a trained drafter (its train state need not exist here)
        init = DSparkDrafter.from_pretrained(args.init_from)
        cfg = init.config
        cfg.extra.setdefault("dspark_training", {})["init_from"] = os.path.abspath(args.init_from)
    else:
        n_tl = int(tcfg.num_hidden_layers)
        lids = ([int(x) for x in args.target_layers.split(",")] if "," in args.target_layers
                else default_target_layer_ids(n_tl, int(args.target_layers)))
        cfg = DSparkConfig.for_target(tcfg, num_draft_layers=args.layers, block_size=args.block_size,
                                      markov_rank=args.markov_rank, markov_head_type=args.markov_head,
                                      target_layer_ids=lids,
                                      mask_token_id=_default_mask_token(tok, int(tcfg.vocab_size), args.mask_token_id))
        if args.intermediate_size:
            cfg.intermediate_size = args.intermediate_size
        cfg.draft_vocab_size = args.draft_vocab
        cfg.extra["dspark_training"] = {"no_sequential": bool(args.no_sequential), "corpus": True}
    drafter = (init if init is not None else DSparkDrafter(cfg)).to(device)
    drafter.attach_target(target)
    if cfg.draft_vocab_size and state is None and init is None:
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        drafter.set_token_map(build_token_map(train_recs, cfg.draft_vocab_size, cfg.vocab_size, eos))
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    step, best = 0, -1.0
    if state is not None:
        drafter.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step, best = int(state["step"]), float(state.get("best_tau", -1.0))
        rng.setstate(state["py_rng"])
        print(f"resumed from step {step} (best held-out tau {best:.3f})", file=sys.stderr)
    t2d = None
    if drafter.token_map is not None:
        t2d = drafter.to_draft_ids(torch.arange(cfg.vocab_size, device=drafter.device))
    cache = FeatureCache(args.target, cfg.target_layer_ids, args.topk, args.feature_cache)
    cache.ensure(target, train_recs, progress=not args.no_progress)
    print(f"{len(train_recs)} train sequences ({sum(len(r['ids']) - r['prompt_len'] for r in train_recs)} answer "
          f"tokens), {len(held)} held-out; draft vocab {cfg.draft_vocab_size or cfg.vocab_size}; "
          f"params {drafter.num_parameters() / 1e6:.2f}M", file=sys.stderr)
    eos_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    temps = [float(x) for x in args.eval_temperatures.split(",") if x.strip()]
    use_seq = not args.no_sequential

    def save_state() -> None:
        torch.save({"model": drafter.state_dict(), "optim": opt.state_dict(), "step": step, "best_tau": best,
                    "config": cfg.to_dict(), "py_rng": rng.getstate()}, state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    q: "queue.Queue[Any]" = queue.Queue(maxsize=8)
    stop = threading.Event()
    th = threading.Thread(target=_loader, args=(cache, train_recs, cfg.block_size, args.anchors,
                                                random.Random(args.seed * 1000 + step), q, stop), daemon=True)
    th.start()
    drafter.train()
    t0, t_last = time.time(), time.time()
    ema: dict[str, float] = {}
    try:
        while step < args.steps:
            if args.max_minutes is not None and (time.time() - t0) / 60 > args.max_minutes:
                print(f"time budget reached at step {step}", file=sys.stderr)
                break
            ent, ids, anchors = q.get()
            for gp in opt.param_groups:
                gp["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
            loss, logs = cached_loss(drafter, ent, ids, anchors, t2d, use_seq)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            for k, v in logs.items():
                ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
            if step % 20 == 0:
                now = time.time()
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, "t": now - t0, "s_per_step": (now - t_last) / 20, **ema}) + "\n")
                t_last = now
            if step % args.save_every == 0:
                save_state()
            if held and step % args.eval_every == 0:
                rep = heldout_tau(drafter, target, held, temps, args.eval_anchors, args.seed, eos_ids, use_seq)
                tau0 = rep[f"T={temps[0]}"]["all"]["tau"]
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, "eval": rep}) + "\n")
                print(f"step {step}: held-out tau {tau0:.3f} at T={temps[0]} (best {best:.3f})", file=sys.stderr)
                if tau0 > best:
                    best = tau0
                    drafter.save_pretrained(args.out, dtype=getattr(torch, args.save_dtype))
                    with open(os.path.join(args.out, "train_report.json"), "w", encoding="utf-8") as f:
                        json.dump({"steps": step, "train_minutes_this_run": (time.time() - t0) / 60,
                                   "params_M": drafter.num_parameters() / 1e6, "corpus": os.path.abspath(args.corpus),
                                   "heldout_sequences": len(held), **rep}, f, indent=1)
                save_state()
    finally:
        stop.set()
        save_state()
    print(f"stopped at step {step}; {(time.time() - t0) / 60:.1f} min this run; best held-out tau {best:.3f}",
          file=sys.stderr)
    return 0
