"""Checks of the kernels chosen by measurement against a reference, on the CPU they run on.

A kernel picked by timing (cpu/matmul.py's GemmChooser; the fp32 decode attention of
cpu/attention.py) could compute something else on a CPU the project was not written on (another
ISA path of oneDNN/MKL, a torch build with a broken kernel). Each is compared once, at start-up
or first use, with a float64 computation of the same maths on the same inputs; where it
disagrees beyond the tolerance below, the caller falls back to the reference kernel and logs it.

Tolerances (stated, per output element):
- GEMM of bf16 values, output rounded to bf16: |out - ref| <= 2^-7 |ref| + 2^-10 sum_k |x_k w_k|
  (one bf16 step of the value, plus a thousandth of the magnitude of the terms for the
  accumulation; fp32 accumulation over K <= 8192 terms stays far below that).
- fp32 attention: |out - ref| <= 1e-4 max|v| (softmax and sums in fp32 err by ~1e-6 here).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("agentserve.cpu_selfcheck")

GEMM_REL, GEMM_ABS = 2.0 ** -7, 2.0 ** -10
ATTN_TOL = 1e-4
_COLS = 256  # output columns checked per weight (the float64 reference of a 49k-row LM head is slow)


def gemm_error(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, cols: torch.Tensor) -> float:
    """max over checked elements of |out - ref| / allowed (<= 1 passes); out [M, N] any dtype,
    x [M, K], w [N, K], cols: the output columns compared."""
    wc = w[cols].double()
    ref = x.double() @ wc.T
    allowed = GEMM_REL * ref.abs() + GEMM_ABS * (x.double().abs() @ wc.abs().T)
    return float(((out[:, cols].double() - ref).abs() / allowed.clamp_min(1e-30)).max())


def check_columns(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: min(n, _COLS)]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                        enable_gqa: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale) v in q's dtype by explicit products ([B, H, Lq, D] layout, no mask):
    the reference the fp32 decode attention falls back to."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return torch.softmax(s, dim=-1) @ v


def attention_error(kernel: Callable[..., torch.Tensor], heads: int = 9, kv_heads: int = 3, d: int = 64,
                    n: int = 300, seed: int = 0) -> float:
    """max |kernel - float64 reference| / (ATTN_TOL max|v|) on one decode-shaped fp32 input."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, 1, d, generator=g)
    k, v = torch.randn(1, kv_heads, n, d, generator=g), torch.randn(1, kv_heads, n, d, generator=g)
    out = kernel(q, k, v, 0.125, kv_heads != heads)
    ref = reference_attention(q.double(), k.double(), v.double(), 0.125, kv_heads != heads)
    return float((out.double() - ref).abs().max() / (ATTN_TOL * v.abs().max()))


_sdpa_ok: bool | None = None


def fp32_sdpa_ok() -> bool:
    """torch's fp32 SDPA agrees with the reference on this CPU (checked once, then cached)."""
    global _sdpa_ok
    if _sdpa_ok is None:
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        err = attention_error(lambda q, k, v, s, gqa: sdpa(q, k, v, scale=s, enable_gqa=gqa))
        _sdpa_ok = err <= 1.0
        if _sdpa_ok:
            log.info("cpu_selfcheck: fp32 SDPA agrees with the float64 reference (%.3f of the tolerance)", err)
        else:
            log.warning("cpu_selfcheck: fp32 SDPA is off the float64 reference by %.1fx the tolerance on this CPU; "
                        "decode attention uses the explicit-product reference instead", err)
    return _sdpa_ok
