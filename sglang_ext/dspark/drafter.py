"""The DSpark drafter: parallel KV-injected backbone + sequential (Markov/RNN) head +
confidence head, with checkpoint I/O in DeepSpec's weight names and a per-request context
cache for serving.

Shapes: d = hidden_size, m = len(target_layer_ids), g = block_size (gamma), V = vocab,
r = markov_rank.  Slot k (0-based) of a block holds the anchor (k=0) or a mask token, sits at
position anchor_pos + k and predicts the token at anchor_pos + k + 1.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu.matmul import fast_linear
from .config import DSparkConfig, DSparkConfigError
from .sampling import BlockSample, SamplingParams, sample_block_sequential

SHARED_WEIGHT_NAMES = ("embed_tokens.weight", "lm_head.weight")


# ----------------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dt)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Neox-style RoPE as in HF Llama/Qwen3 (rotate_half on the two halves)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x [..., S, H, hd], positions [..., S]
        ang = positions.float()[..., None] * self.inv_freq  # [..., S, hd/2]
        emb = torch.cat((ang, ang), dim=-1)[..., None, :]  # [..., S, 1, hd]
        cos, sin = emb.cos(), emb.sin()
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


class DraftAttention(nn.Module):
    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        b = cfg.attention_bias
        self.q_proj = nn.Linear(d, self.nh * hd, bias=b)
        self.k_proj = nn.Linear(d, self.nkv * hd, bias=b)
        self.v_proj = nn.Linear(d, self.nkv * hd, bias=b)
        self.o_proj = nn.Linear(self.nh * hd, d, bias=False)
        self.use_qk_norm = cfg.use_qk_norm
        if cfg.use_qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.rotary = Rotary(hd, cfg.rope_theta)

    def kv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K (normed, roped) and V of x [..., S, d] -> [..., S, nkv, hd] each.  Used for the
        injected context (from H_ctx, no input layernorm) and for the block itself."""
        k = self.k_proj(x).unflatten(-1, (self.nkv, self.hd))
        v = self.v_proj(x).unflatten(-1, (self.nkv, self.hd))
        if self.use_qk_norm:
            k = self.k_norm(k)
        return self.rotary(k, positions), v

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        ctx_k: torch.Tensor,
        ctx_v: torch.Tensor,
        mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """x [B, N, d] block tokens; ctx_k/v [B, S, nkv, hd]; mask [B, N, S+N] (True=attend;
        None: every row attends to all of its context and block)."""
        q = self.q_proj(x).unflatten(-1, (self.nh, self.hd))
        if self.use_qk_norm:
            q = self.q_norm(q)
        q = self.rotary(q, positions)
        k, v = self.kv(x, positions)
        k = torch.cat([ctx_k.to(k.dtype), k], dim=1)
        v = torch.cat([ctx_v.to(v.dtype), v], dim=1)
        # grouped-query heads are shared inside SDPA (no repeated K/V copies); mask None = attend all
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None], enable_gqa=self.nh != self.nkv,
        )
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class DraftMLP(nn.Module):
    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DraftMLP(cfg)

    def forward(self, x, positions, ctx_k, ctx_v, mask):  # type: ignore[no-untyped-def]
        x = x + self.self_attn(self.input_layernorm(x), positions, ctx_k, ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- sequential heads
class MarkovHead(nn.Module):
    """vanilla: B(x_{k-1},.) = W2 W1[x_{k-1}];  gated: W2 (sigmoid(G[h;e]) * e);
    rnn: s_k = g*s + (1-g)*tanh(c), B_k = W2 tanh(o), [g,c,o] = joint_proj([s; e; h])."""

    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        v, r, d = cfg.vocab_size, cfg.markov_rank, cfg.hidden_size
        self.kind = cfg.markov_head_type
        self.rank = r
        self.markov_w1 = nn.Embedding(v, r)  # indexed by full-vocabulary previous tokens
        self.markov_w2 = nn.Linear(r, cfg.draft_vocab_size or v, bias=False)  # over the draft vocabulary
        if self.kind == "gated":
            self.gate_proj = nn.Linear(d + r, r)
        elif self.kind == "rnn":
            self.joint_proj = nn.Linear(2 * r + d, 3 * r)

    def embed_prev(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.markov_w1(tokens.long())

    def init_state(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        if self.kind != "rnn":
            return None
        return hidden.new_zeros(*hidden.shape[:-1], self.rank)

    def _latent(
        self, e: torch.Tensor, h: torch.Tensor, state: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.kind == "vanilla":
            return e, state
        if self.kind == "gated":
            return torch.sigmoid(self.gate_proj(torch.cat([h, e.to(h.dtype)], -1))) * e, state
        assert state is not None
        z = torch.cat([state, e.to(h.dtype), h], -1)
        g_raw, c_raw, o_raw = self.joint_proj(z).chunk(3, dim=-1)
        gate = torch.sigmoid(g_raw)
        new_state = gate * state + (1.0 - gate) * torch.tanh(c_raw)
        return torch.tanh(o_raw), new_state

    def step(
        self, prev: torch.Tensor, h: torch.Tensor, state: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One sampling step: prev [R], h [R, d] -> bias [R, V]."""
        if state is None and self.kind == "rnn":
            state = self.init_state(h)
        latent, state = self._latent(self.embed_prev(prev), h, state)
        return self.markov_w2(latent.to(self.markov_w2.weight.dtype)), state

    def teacher_forced(self, prev: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Training: prev [..., g] (anchor, x_1..x_{g-1}), hidden [..., g, d] -> bias [..., g, V]."""
        e = self.embed_prev(prev)
        if self.kind != "rnn":
            latent, _ = self._latent(e, hidden, None)
            return self.markov_w2(latent)
        state = self.init_state(hidden[..., 0, :])
        outs = []
        for k in range(prev.shape[-1]):
            lat, state = self._latent(e[..., k, :], hidden[..., k, :], state)
            outs.append(lat)
        return self.markov_w2(torch.stack(outs, dim=-2))


class ConfidenceHead(nn.Module):
    """c_k = sigmoid(w^T [h_k ; W1[x_{k-1}]]): P(x_k survives | x_<k survived)."""

    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        self.with_markov = cfg.confidence_head_with_markov
        dim = cfg.hidden_size + (cfg.markov_rank if self.with_markov else 0)
        self.proj = nn.Linear(dim, 1, bias=True)

    def forward(self, hidden: torch.Tensor, prev_emb: Optional[torch.Tensor]) -> torch.Tensor:
        feats = hidden
        if self.with_markov:
            assert prev_emb is not None
            feats = torch.cat([hidden, prev_emb.to(hidden.dtype)], dim=-1)
        return self.proj(feats.to(self.proj.weight.dtype)).squeeze(-1)  # raw logit


# ----------------------------------------------------------------------------- serving cache
@dataclass
class DraftContext:
    """Per-request injected context: per-draft-layer K/V of H_ctx for committed positions.

    Grows by amortised doubling; ``truncate`` drops positions after a rejection.
    """

    k: list[torch.Tensor] = field(default_factory=list)  # per layer [cap, nkv, hd]
    v: list[torch.Tensor] = field(default_factory=list)
    positions: Optional[torch.Tensor] = None  # long [cap]
    length: int = 0

    def truncate(self, length: int) -> None:
        if length < 0 or length > self.length:
            raise ValueError(f"cannot truncate DraftContext of length {self.length} to {length}")
        self.length = length

    def head(self, n: int) -> "DraftContext":
        """A new context holding copies of this one's first n positions."""
        n = max(0, min(int(n), self.length))
        if n == 0 or self.positions is None:
            return DraftContext()
        return DraftContext(k=[k[:n].clone() for k in self.k], v=[v[:n].clone() for v in self.v],
                            positions=self.positions[:n].clone(), length=n)

    def keys(self, layer: int) -> torch.Tensor:
        return self.k[layer][: self.length]

    def values(self, layer: int) -> torch.Tensor:
        return self.v[layer][: self.length]

    def pos(self) -> torch.Tensor:
        assert self.positions is not None
        return self.positions[: self.length]

    def _ensure(self, n_new: int, like_k: Sequence[torch.Tensor], device: torch.device) -> None:
        need = self.length + n_new
        cap = 0 if self.positions is None else int(self.positions.shape[0])
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 16)
        pos = torch.zeros(new_cap, dtype=torch.long, device=device)
        if self.positions is not None:
            pos[: self.length] = self.positions[: self.length]
        self.positions = pos
        for i, kk in enumerate(like_k):
            nk = kk.new_zeros(new_cap, *kk.shape[1:])
            nv = kk.new_zeros(new_cap, *kk.shape[1:])
            if i < len(self.k):
                nk[: self.length] = self.k[i][: self.length]
                nv[: self.length] = self.v[i][: self.length]
            if i < len(self.k):
                self.k[i], self.v[i] = nk, nv
            else:
                self.k.append(nk)
                self.v.append(nv)


@dataclass
class DraftBlock:
    tokens: torch.Tensor  # long [R, g]
    q_probs: torch.Tensor  # float [R, g, V]: exact distribution each token was drawn from
    logits: torch.Tensor  # float [R, g, V]: base logits + sequential bias (unprocessed)
    confidence_logits: Optional[torch.Tensor]  # [R, g] raw logit of the confidence head
    confidences_raw: Optional[torch.Tensor]  # [R, g] sigmoid(raw)
    confidences: Optional[torch.Tensor]  # [R, g] after STS calibration (== raw if none)
    hidden: torch.Tensor  # [R, g, d]


# ----------------------------------------------------------------------------- the drafter
class DSparkDrafter(nn.Module):
    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.hidden_size
        self.fc = nn.Linear(cfg.num_context_features * d, d, bias=False)
        self.hidden_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.layers = nn.ModuleList([DraftLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.markov_head = MarkovHead(cfg)
        self.confidence_head: Optional[ConfidenceHead] = (
            ConfidenceHead(cfg) if cfg.enable_confidence_head else None
        )
        # Shared frozen target weights kept OUT of the module tree (not saved, not trained);
        # a checkpoint that carries them (DeepSeek's releases) registers owned copies instead.
        self._shared: dict[str, torch.Tensor] = {}
        self.calibration = None  # Optional[calibration.STSCalibration]
        if cfg.draft_vocab_size:
            # FR-Spec: draft index -> target token id (saved in the checkpoint as `d2t`)
            self.register_buffer("d2t", torch.arange(cfg.draft_vocab_size, dtype=torch.long))
        self._head_cache: Optional[tuple[object, torch.Tensor]] = None

    @property
    def token_map(self) -> Optional[torch.Tensor]:
        return self._buffers.get("d2t")

    def set_token_map(self, d2t: torch.Tensor) -> None:
        """Install the draft vocabulary: K distinct target token ids (K = config.draft_vocab_size)."""
        k = self.config.draft_vocab_size
        d2t = torch.as_tensor(d2t, dtype=torch.long).reshape(-1)
        if not k or d2t.numel() != k or d2t.unique().numel() != k:
            raise DSparkConfigError(f"token map must hold {k} distinct ids (config draft_vocab_size), got {d2t.numel()}")
        if int(d2t.min()) < 0 or int(d2t.max()) >= self.config.vocab_size:
            raise DSparkConfigError(f"token map ids must lie in [0, vocab_size={self.config.vocab_size})")
        self.d2t.copy_(d2t.to(self.d2t.device))
        self._head_cache = None

    def to_draft_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids -> draft indices (-1 where a token is outside the draft vocabulary)."""
        tm = self.token_map
        if tm is None:
            return ids
        t2d = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=tm.device)
        t2d[tm] = torch.arange(tm.numel(), device=tm.device)
        return t2d[ids.to(tm.device).long()]

    # ---- shared embedding / LM head
    def attach_shared(self, embed_weight: torch.Tensor, lm_head_weight: Optional[torch.Tensor] = None) -> None:
        """Use the target's embedding [V, d] and LM head [V, d] (tied if lm_head is None)."""
        v, d = self.config.vocab_size, self.config.hidden_size
        for name, w in (("embed_tokens", embed_weight), ("lm_head", lm_head_weight)):
            # Engines may pad the vocab (rows >= V); extra rows are dropped below.
            if w is not None and (w.dim() != 2 or w.shape[0] < v or w.shape[1] != d):
                raise DSparkConfigError(
                    f"shared {name} has shape {tuple(w.shape)}, expected ({v}, {d}) from the draft config"
                )
        head = lm_head_weight if lm_head_weight is not None else embed_weight
        self._shared = {"embed_tokens": embed_weight.detach()[:v], "lm_head": head.detach()[:v]}

    def attach_target(self, target: nn.Module) -> None:
        """Convenience for HF models: share get_input/output_embeddings()."""
        emb = target.get_input_embeddings().weight
        out = target.get_output_embeddings()
        self.attach_shared(emb, out.weight if out is not None else None)

    @property
    def embed_weight(self) -> torch.Tensor:
        if "embed_tokens" in self._modules:
            return self._modules["embed_tokens"].weight  # type: ignore[union-attr]
        if "embed_tokens" not in self._shared:
            raise RuntimeError("DSparkDrafter has no embedding: call attach_shared/attach_target")
        return self._shared["embed_tokens"]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if "lm_head" in self._modules:
            return self._modules["lm_head"].weight  # type: ignore[union-attr]
        if "lm_head" not in self._shared:
            raise RuntimeError("DSparkDrafter has no LM head: call attach_shared/attach_target")
        return self._shared["lm_head"]

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_weight
        return F.embedding(ids.to(w.device), w).to(device=self.device, dtype=self.dtype)

    def draft_head_weight(self) -> torch.Tensor:
        """The LM head rows of the draft vocabulary (all rows without a token map)."""
        w = self.lm_head_weight
        tm = self.token_map
        if tm is None:
            return w
        # cached by the map's version: the slice is re-taken only after set_token_map / load
        key = (tm._version, w.data_ptr(), str(tm.device))
        if self._head_cache is None or self._head_cache[0] != key:
            self._head_cache = (key, w[tm.to(w.device)].contiguous())
        return self._head_cache[1]

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Base logits over the draft vocabulary ([..., K] with a token map, else [..., V])."""
        w = self.draft_head_weight()
        # the measured bf16/fp32 kernel choice on CPUs (plain F.linear elsewhere and in training)
        return fast_linear(hidden.to(w.dtype), w.to(hidden.device) if w.device != hidden.device else w)

    # ---- backbone
    def project_context(self, target_hidden: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """[..., m*d] (or a list of m tensors [..., d]) -> H_ctx [..., d]."""
        if not isinstance(target_hidden, torch.Tensor):
            target_hidden = torch.cat(list(target_hidden), dim=-1)
        exp = self.fc.in_features
        if target_hidden.shape[-1] != exp:
            raise ValueError(
                f"target hidden feature dim {target_hidden.shape[-1]} != {exp} "
                f"(= {self.config.num_context_features} target layers x hidden {self.config.hidden_size})"
            )
        return self.hidden_norm(self.fc(target_hidden.to(device=self.device, dtype=self.dtype)))

    def run_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        ctx_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
        mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        for layer, (ck, cv) in zip(self.layers, ctx_kv):
            x = layer(x, positions, ck, cv, mask)
        return self.norm(x)

    def block_input_ids(self, anchors: torch.Tensor) -> torch.Tensor:
        g = self.config.block_size
        ids = torch.full((*anchors.shape, g), self.config.mask_token_id, dtype=torch.long, device=anchors.device)
        ids[..., 0] = anchors
        return ids

    def confidence_logits(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> Optional[torch.Tensor]:
        if self.confidence_head is None:
            return None
        emb = self.markov_head.embed_prev(prev_tokens) if self.confidence_head.with_markov else None
        return self.confidence_head(hidden, emb)

    # ---- training forward (packed anchors over full sequences)
    def forward_train(
        self,
        target_hidden: torch.Tensor,
        input_ids: torch.Tensor,
        anchor_pos: torch.Tensor,
        ctx_valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """target_hidden [B, S, m*d], input_ids [B, S], anchor_pos [B, A] -> hidden [B, A, g, d].

        Block i sees context positions < anchor_pos[i] and its own g slots (bidirectional).
        """
        b, s = input_ids.shape
        a = anchor_pos.shape[1]
        g = self.config.block_size
        dev = self.device
        ctx = self.project_context(target_hidden)
        ctx_pos = torch.arange(s, device=dev).expand(b, s)
        ctx_kv = [layer.self_attn.kv(ctx, ctx_pos) for layer in self.layers]
        anchors = torch.gather(input_ids.to(dev), 1, anchor_pos.to(dev))
        x = self.embed(self.block_input_ids(anchors)).reshape(b, a * g, -1)
        pos = (anchor_pos.to(dev)[..., None] + torch.arange(g, device=dev)).reshape(b, a * g)
        blk_of = torch.arange(a * g, device=dev) // g
        m_ctx = ctx_pos[:, None, :] < pos.view(b, a, g)[:, :, :1].expand(b, a, g).reshape(b, a * g)[..., None]
        if ctx_valid is not None:
            m_ctx = m_ctx & ctx_valid.to(dev)[:, None, :]
        m_blk = (blk_of[:, None] == blk_of[None, :]).expand(b, a * g, a * g)
        mask = torch.cat([m_ctx, m_blk], dim=-1)
        h = self.run_layers(x, pos, ctx_kv, mask)
        return h.view(b, a, g, -1)

    # ---- serving API
    def new_context(self) -> DraftContext:
        return DraftContext()

    @torch.no_grad()
    def append_context(
        self,
        ctx: DraftContext,
        target_hidden: torch.Tensor | Sequence[torch.Tensor],
        positions: torch.Tensor | Sequence[int],
    ) -> None:
        """Append target features of newly committed positions: [n, m*d] (or m x [n, d])."""
        pos = torch.as_tensor(positions, dtype=torch.long, device=self.device).reshape(-1)
        h = self.project_context(target_hidden)
        if h.shape[0] != pos.shape[0]:
            raise ValueError(f"got {h.shape[0]} hidden rows but {pos.shape[0]} positions")
        kvs = [layer.self_attn.kv(h, pos) for layer in self.layers]
        ctx._ensure(pos.shape[0], [k for k, _ in kvs], self.device)
        n0, n1 = ctx.length, ctx.length + pos.shape[0]
        for i, (k, v) in enumerate(kvs):
            ctx.k[i][n0:n1] = k
            ctx.v[i][n0:n1] = v
        assert ctx.positions is not None
        ctx.positions[n0:n1] = pos
        ctx.length = n1

    def _batch_context(self, ctxs: Sequence[DraftContext]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        r = len(ctxs)
        if r == 1:  # one request (batch 1): its cache as views, no padded copy
            c = ctxs[0]
            kv = [(c.keys(li)[None].to(self.dtype), c.values(li)[None].to(self.dtype)) if c.length else
                  (torch.zeros(1, 0, self.config.num_key_value_heads, self.config.head_dim, dtype=self.dtype,
                               device=self.device),) * 2 for li in range(len(self.layers))]
            return kv, torch.ones(1, c.length, dtype=torch.bool, device=self.device)
        lmax = max([c.length for c in ctxs] + [0])
        nkv, hd = self.config.num_key_value_heads, self.config.head_dim
        valid = torch.zeros(r, lmax, dtype=torch.bool, device=self.device)
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for li in range(len(self.layers)):
            ks = torch.zeros(r, lmax, nkv, hd, dtype=self.dtype, device=self.device)
            vs = torch.zeros_like(ks)
            for ri, c in enumerate(ctxs):
                if c.length:
                    ks[ri, : c.length] = c.keys(li)
                    vs[ri, : c.length] = c.values(li)
            out.append((ks, vs))
        for ri, c in enumerate(ctxs):
            valid[ri, : c.length] = True
        return out, valid

    @torch.no_grad()
    def draft_block(
        self,
        ctxs: Sequence[DraftContext],
        anchors: torch.Tensor,
        anchor_positions: torch.Tensor,
        sampling: SamplingParams,
        generator: Optional[torch.Generator] = None,
        prev_tokens: Optional[torch.Tensor] = None,
        use_sequential_head: bool = True,
        gumbel: Optional[dict[int, torch.Tensor]] = None,
    ) -> DraftBlock:
        """Draft one block of g tokens for each of R requests.

        anchors [R]: the last target-produced token (not yet in the context); anchor_positions
        [R]: its position.  prev_tokens [R] is the Markov predecessor of slot 0 (defaults to the
        anchor, as in training).  The context of request r must cover positions < anchor_pos[r].
        `gumbel` {r: noise [g, V]}: request r's drafts are keyed draws (sample_block_sequential).
        """
        g = self.config.block_size
        r = len(ctxs)
        anchors = anchors.to(self.device).long().reshape(r)
        apos = torch.as_tensor(anchor_positions, device=self.device).long().reshape(r)
        ctx_kv, valid = self._batch_context(ctxs)
        pos = apos[:, None] + torch.arange(g, device=self.device)
        x = self.embed(self.block_input_ids(anchors))
        mask: Optional[torch.Tensor] = None  # one request: every slot sees all (no mask needed)
        if r > 1:
            mask = torch.cat([valid[:, None, :].expand(r, g, valid.shape[1]),
                              torch.ones(r, g, g, dtype=torch.bool, device=self.device)], dim=-1)
        hidden = self.run_layers(x, pos, ctx_kv, mask)
        base = self.lm_logits(hidden).float()
        first_prev = anchors if prev_tokens is None else prev_tokens.to(self.device).long().reshape(r)
        bs: BlockSample = sample_block_sequential(
            base, hidden, first_prev, sampling,
            self.markov_head.step if use_sequential_head else None, generator, gumbel=gumbel,
            token_map=self.token_map, token_map_vocab=self.config.vocab_size,
        )
        conf_logit = self.confidence_logits(hidden, bs.prev_tokens)
        conf_raw = conf_cal = None
        if conf_logit is not None:
            conf_logit = conf_logit.float()
            conf_raw = torch.sigmoid(conf_logit)
            conf_cal = conf_raw
            if self.calibration is not None:
                conf_cal = self.calibration.apply_logits(conf_logit, sampling.temperature)
        return DraftBlock(bs.tokens, bs.q_probs, bs.logits, conf_logit, conf_raw, conf_cal, hidden)

    # ---- checkpoint I/O
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items()}

    def save_pretrained(
        self,
        directory: str,
        dtype: torch.dtype = torch.bfloat16,
        include_shared: bool = False,
    ) -> str:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        sd = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
              for k, v in self.state_dict().items()}
        if include_shared:
            sd["embed_tokens.weight"] = self.embed_weight.detach().to("cpu", dtype).contiguous()
            sd["lm_head.weight"] = self.lm_head_weight.detach().to("cpu", dtype).contiguous()
        cfg = self.config
        cfg.torch_dtype = str(dtype).replace("torch.", "")
        cfg.save(directory)
        path = os.path.join(directory, "model.safetensors")
        save_file(sd, path, metadata={"format": "pt"})
        if self.calibration is not None:
            self.calibration.save(os.path.join(directory, "sts_calibration.json"))
        return path

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        v, d = self.config.vocab_size, self.config.hidden_size
        shapes.setdefault("embed_tokens.weight", (v, d))
        shapes.setdefault("lm_head.weight", (v, d))
        return shapes

    def load_state_checked(self, sd: dict[str, torch.Tensor]) -> None:
        """Strict load: every non-shared parameter present with the right shape, nothing unknown."""
        expected = self.expected_shapes()
        # Tolerate a "model." prefix (some exports) by stripping it.
        sd = {(k[len("model."):] if k.startswith("model.") and k[len("model."):] in expected else k): t
              for k, t in sd.items()}
        for k, t in sd.items():
            if k not in expected:
                raise DSparkConfigError(f"checkpoint has unexpected weight '{k}' for this config "
                                        f"(markov_head_type={self.config.markov_head_type!r}, "
                                        f"num_hidden_layers={self.config.num_hidden_layers})")
            if tuple(t.shape) != expected[k]:
                raise DSparkConfigError(f"checkpoint weight '{k}' has shape {tuple(t.shape)}, "
                                        f"expected {expected[k]} from config.json")
        own = self.state_dict()
        missing = [k for k in own if k not in sd]
        if missing:
            raise DSparkConfigError(f"checkpoint is missing weight '{missing[0]}' "
                                    f"({len(missing)} missing in total)")
        dt = self.dtype
        for name in SHARED_WEIGHT_NAMES:
            if name in sd:
                mod_name = name.split(".")[0]
                if mod_name == "embed_tokens":
                    mod: nn.Module = nn.Embedding(self.config.vocab_size, self.config.hidden_size)
                else:
                    mod = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
                mod.weight.requires_grad_(False)
                mod.to(device=self.device, dtype=dt)
                self.add_module(mod_name, mod)
        self.load_state_dict({k: v.to(dt) if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
        self._head_cache = None

    @classmethod
    def from_pretrained(
        cls,
        directory: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        target: Optional[nn.Module] = None,
    ) -> "DSparkDrafter":
        from safetensors.torch import load_file

        cfg = DSparkConfig.from_pretrained(directory)
        model = cls(cfg).to(device=device, dtype=dtype)
        path = os.path.join(directory, "model.safetensors")
        if not os.path.exists(path):
            raise DSparkConfigError(f"{directory}: missing model.safetensors")
        model.load_state_checked(load_file(path, device=str(device)))
        if target is not None:
            model.attach_target(target)
        cal_path = os.path.join(directory, "sts_calibration.json")
        if os.path.exists(cal_path):
            from .calibration import STSCalibration

            model.calibration = STSCalibration.load(cal_path)
        return model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
