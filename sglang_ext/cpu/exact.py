"""Exact mode (`server.deterministic: true`): every row's arithmetic independent of its batch.

In bf16 a row's logits depend on the batch it runs in: a GEMM kernel picks its blocking by the
row count, so the same token computed in a decode step of 1 or 8 requests, in a verify block of
1 + l positions, or in a prefill of 500 tokens rounds differently, and at a near-tie greedy
decoding takes another token. Plain decoding itself then answers differently at 1 and at 8
agents, and no speculative method can be byte-identical to it. This mode removes the cause for
the two kinds of product a decoder layer has:

- **Linear layers and the LM head** run in fixed tiles of `TILE` rows (the last one padded with
  zero rows): every row, whatever the batch, is computed by the same kernel call on a matrix of
  the same shape, so its reduction order is the same. The kernel is bf16 where the CPU has native
  bf16 matmul (AMX or AVX512-BF16), else fp32 on an fp32 copy of the weight (chosen from CPU
  flags, never by timing, so two servers on one machine choose alike). At a weight shape's first
  use the tiles are checked on this CPU: a row computed alone, among other rows and at another
  position of its tile must come out bit-identical, and the product must agree with a float64
  reference (selfcheck.py's tolerance); a kernel that fails falls back to fp32 tiles, then to one
  row per call (identical by construction), logged.
- **Attention** (prefill/extend, decode and verify alike) runs in float64 over each query's own
  visible keys and rounds to the model's dtype once. Scores of bf16 queries and keys are exact
  in float64, and the softmax and value sums differ between reduction orders by ~1e-16
  relative, 13 orders of magnitude below a bf16 rounding step, so the rounded output is the same
  whether a query runs alone (decode), in a verify block or in a prefill.

Norms, rotary embeddings and activations are per row or per element already. What this costs is
measured in docs/results.md ("Exact mode"); tests/serving/test_exact_mode.py shows plain and
speculative servers in bf16 byte-identical at 1 and 4 concurrent requests.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang_ext import config
from sglang_ext.cpu import matmul, selfcheck

log = logging.getLogger("agentserve.exact")

EXTEND_TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_extend"
TILE = 32  # rows per kernel call; measured on AMX: 1.6x a one-row product, ~4x a 1k-row prefill
ATTN_DTYPE = torch.float64
_HALF = (torch.bfloat16, torch.float16)

BF16, F32, ROW = "bf16", "fp32", "row"  # tiled bf16 kernel, tiled fp32 kernel, one row per call


def enabled_from_profile() -> bool:
    return bool(config.served().server.deterministic)


def native_bf16_matmul() -> bool:
    """The CPU multiplies bf16 natively (AMX tiles or AVX512-BF16): the bf16 kernel is cheap.
    A oneDNN ISA cap below that (ONEDNN_MAX_CPU_ISA=AVX2, say) counts as no: oneDNN's bf16
    product then costs about M one-row products (measured: 0.2 tok/s in exact mode)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and cap not in ("ALL", "DEFAULT") and "AMX" not in cap and "BF16" not in cap:
        return False
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # an older torch without the probes: the fp32 kernel is safe everywhere
        return False


def _tiles(x: torch.Tensor, tile: int) -> list[torch.Tensor]:
    m = x.shape[0]
    pad = (-m) % tile
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    return list(x.split(tile))


class TiledLinear:
    """x @ w.T (+ bias) with a row's result independent of the other rows and of their count."""

    def __init__(self, tile: int = TILE, prefer: Optional[str] = None) -> None:
        self.tile = tile
        self.prefer = prefer or (BF16 if native_bf16_matmul() else F32)
        self.kinds: dict[tuple[int, int], str] = {}  # weight shape -> kernel that passed its check
        self._w32: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, int]] = {}

    def weight32(self, w: torch.Tensor) -> torch.Tensor:
        key = (w.data_ptr(), tuple(w.shape))
        held = self._w32.get(key)
        if held is None or held[1] != w._version:  # remade when SGLang updated the weight in place
            held = self._w32[key] = (w.detach().float(), w._version)
        return held[0]

    def _run(self, kind: str, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if kind == ROW:
            outs = [torch.nn.functional.linear(r, w, bias) for r in x.split(1)]
            return torch.cat(outs)
        if kind == F32:
            w32, b32 = self.weight32(w), (bias.float() if bias is not None else None)
            outs = [torch.nn.functional.linear(t.float(), w32, b32) for t in _tiles(x, self.tile)]
            return torch.cat(outs)[: x.shape[0]].to(x.dtype)
        outs = [torch.nn.functional.linear(t, w, bias) for t in _tiles(x, self.tile)]
        return torch.cat(outs)[: x.shape[0]]

    def check(self, kind: str, w: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
        """Row invariance (alone, among others, at another tile position, in a longer batch) and
        agreement with the float64 reference, on this CPU, for this weight."""
        n, k = w.shape
        g = torch.Generator().manual_seed(n * 131 + k)
        x = torch.randn(2 * self.tile + 5, k, generator=g).to(w.dtype)
        y = self._run(kind, x, w, bias)
        alone = self._run(kind, x[3:4], w, bias)
        perm = torch.randperm(x.shape[0], generator=g)
        shuffled = self._run(kind, x[perm], w, bias)
        same = (torch.equal(alone[0], y[3]) and torch.equal(shuffled, y[perm])
                and torch.equal(self._run(kind, x[: self.tile + 1], w, bias), y[: self.tile + 1]))
        yb = y if bias is None else y - bias
        ok = selfcheck.gemm_error(yb, x, w, selfcheck.check_columns(n)) <= 1.0 + (bias is not None)
        if not (same and ok):
            log.warning("exact: the %s kernel on %dx%d is %s on this CPU; not used", kind, n, k,
                        "not row-invariant" if not same else "off the float64 reference")
        return same and ok

    def kind(self, w: torch.Tensor, bias: Optional[torch.Tensor]) -> str:
        shape = (int(w.shape[0]), int(w.shape[1]))
        got = self.kinds.get(shape)
        if got is None:
            order = [self.prefer] + [k for k in (F32, ROW) if k != self.prefer]
            got = next((k for k in order[:-1] if self.check(k, w, bias)), ROW)
            self.kinds[shape] = got
            log.info("exact: %dx%d products in %s%s", shape[0], shape[1], got,
                     f" tiles of {self.tile} rows" if got != ROW else " (one row per call)")
        return got

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out = self._run(self.kind(w, bias), x2, w, bias)
        return out.reshape(*x.shape[:-1], w.shape[0])

    def calibrate(self, model: torch.nn.Module) -> int:
        """Check every CPU linear shape of a loaded model at start-up, not inside a request."""
        n = 0
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if (matmul.is_linear(mod) and isinstance(w, torch.Tensor) and w.dim() == 2 and w.device.type == "cpu"
                    and w.dtype in _HALF + (torch.float32,)):
                self.kind(w, getattr(mod, "bias", None) if isinstance(mod, torch.nn.Linear) else None)
                n += 1
        return n


_tiled: Optional[TiledLinear] = None


def tiled() -> TiledLinear:
    global _tiled
    if _tiled is None:
        _tiled = TiledLinear()
    return _tiled


def _applies(x: torch.Tensor, w: Any) -> bool:
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and x.device.type == "cpu" and w.device.type == "cpu"
            and x.dtype == w.dtype and not (w.requires_grad and torch.is_grad_enabled()))


# ---- SGLang hooks (registered by plugin.py instead of cpu/matmul.py's when the mode is on)

def after_load_model(result: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    if str(getattr(runner, "device", "")) == "cpu":
        n = tiled().calibrate(runner.model)
        log.info("exact mode (server.deterministic): %d linear layers in row-invariant tiles, attention in float64", n)
    return result


def around_linear(original: Callable[..., torch.Tensor], method: Any, layer: Any, x: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if _applies(x, getattr(layer, "weight", None)) and not getattr(layer, "use_intel_amx_backend", False):
        return tiled().linear(x, layer.weight, bias)
    return original(method, layer, x, bias)


def around_lm_head(original: Callable[..., torch.Tensor], proc: Any, hidden_states: torch.Tensor, lm_head: Any,
                   embedding_bias: Optional[torch.Tensor] = None, **kw: Any) -> torch.Tensor:
    if matmul._plain_head(proc, lm_head, embedding_bias) and _applies(hidden_states, lm_head.weight):
        return tiled().linear(hidden_states, lm_head.weight, None)
    return original(proc, hidden_states, lm_head, embedding_bias, **kw)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: Any, gqa: bool) -> torch.Tensor:
    """Queries q [n, Hq, d] at positions prefix .. prefix+n-1 over keys/values k, v [L, Hkv, d]
    (L = prefix + n, causal), in float64; returns [n, Hq, d] in float64."""
    n, length = q.shape[0], k.shape[0]
    qq = q.movedim(0, 1).unsqueeze(0).to(ATTN_DTYPE)
    kk = k.movedim(0, 1).unsqueeze(0).to(ATTN_DTYPE)
    vv = v.movedim(0, 1).unsqueeze(0).to(ATTN_DTYPE)
    mask = None
    if n > 1:  # query i sees keys 0 .. prefix + i
        mask = torch.ones(n, length, dtype=torch.bool).tril(diagonal=length - n)
    o = scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.squeeze(0).movedim(1, 0)


def around_extend_sdpa(original: Callable[..., torch.Tensor], backend: Any, query: torch.Tensor, output: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                       req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, extend_prefix_lens: torch.Tensor,
                       extend_seq_lens: torch.Tensor, encoder_lens: Any = None, scaling: Any = None,
                       enable_gqa: bool = False, causal: bool = False, is_cross_attn: bool = False,
                       sliding_window_size: Any = None) -> torch.Tensor:
    """The torch_native extend loop (prefill, chunked prefill, mixed batches) in float64 per
    request; encoder, cross-attention, non-causal and sliding-window layers go to SGLang's."""
    plain = (encoder_lens is None and not is_cross_attn and causal
             and (sliding_window_size is None or sliding_window_size < 0))
    if not plain or query.device.type != "cpu":
        return original(backend, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        extend_prefix_lens, extend_seq_lens, encoder_lens, scaling=scaling, enable_gqa=enable_gqa,
                        causal=causal, is_cross_attn=is_cross_attn, sliding_window_size=sliding_window_size)
    start = 0
    for r, total, n in zip(req_pool_indices.tolist(), seq_lens.tolist(), extend_seq_lens.tolist()):
        slots = req_to_token[r, :total]
        k = torch.index_select(k_cache, 0, slots)
        v = torch.index_select(v_cache, 0, slots)
        output[start:start + n] = attend(query[start:start + n], k, v, total - n, scaling, enable_gqa)
        start += n
    return output
