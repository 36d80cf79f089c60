"""TARGET_VERIFY attention for SGLang's torch_native backend (the CPU backend).

SGLang 0.5.23's torch_native backend only knows prefill/extend and decode; a verify forward
(several draft tokens per request, appended after the verified prefix, with a draft-to-draft
mask) fails inside its extend path. This AROUND hook handles that mode: each request's draft
queries attend to the whole verified prefix and to the draft positions its mask allows
(mask[i, j] = draft j is visible to draft i; a chain is lower-triangular, a tree is its
ancestor relation). Every other mode goes to the original method untouched.

A second hook (DECODE_TARGET) makes the plain decode attention of half-precision models run in
fp32 on a CPU: on a CPU without native bf16 (this VM: AVX2), torch's SDPA over a bf16 KV cache
takes 144 ms per step for 8 requests with 700-token contexts (30 layers, GQA 9/3 heads), and
the same gathered K/V cast to fp32 takes 66 ms. Decode queries are one token per request, so
the attention is a small share of FLOPs but most of a long-context step's time. The verify path
above does the same, so plain and speculative steps use the same arithmetic. Prefill attention
stays in the model's dtype (measured no faster in fp32).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang_ext import config
from sglang_ext.cpu import selfcheck

TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend"
DECODE_TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_decode"
_HALF = (torch.bfloat16, torch.float16)


def supports_ragged_verify(backend: Any) -> bool:
    """Whether `backend` reads a ragged TARGET_VERIFY batch (`agentserve_widths`: request r
    verifies only its own 1 + l_r positions, packed). Only SGLang's torch_native backend with
    our verify hook installed does; any other backend (every GPU backend today, or
    torch_native without the hook) gets SGLang's uniform padded layout, which they all read."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.plugins.hook_registry import HookRegistry

    return type(backend) is TorchNativeAttnBackend and TARGET in HookRegistry._patched


def decode_mode_from_profile() -> str:
    """`server.cpu_attention` of the profile the launcher passed: fp32 (default) or native."""
    return config.served().server.cpu_attention


FP32_ON_CPU = True  # the plugin sets it from server.cpu_attention; verify and decode agree
EXACT = False  # server.deterministic: attention in float64 everywhere (cpu/exact.py)
log = logging.getLogger("agentserve.cpu_attention")
_announced = False


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision queries on a CPU (see the module docstring), else q's own;
    float64 for every CPU query in exact mode (cpu/exact.py)."""
    if EXACT and q.device.type == "cpu":
        return torch.float64
    return torch.float32 if FP32_ON_CPU and q.device.type == "cpu" and q.dtype in _HALF else q.dtype


def gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[slots] as [1, heads, n, d] in `dtype`. index_select, not advanced indexing:
    on a CPU it gathers a 700-token context's K or V about 2.5x faster (0.026 vs 0.07 ms)."""
    return torch.index_select(cache, 0, slots).to(dtype).movedim(0, 1).unsqueeze(0)


def _draft_mask(spec_info: Any, bs: int, n: int, device: torch.device) -> torch.Tensor:
    mask = getattr(spec_info, "custom_mask", None)
    if mask is None:
        m = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        return m.expand(bs, n, n)
    m = mask.to(device=device, dtype=torch.bool).reshape(bs, n, n)
    # A node always sees itself; some producers leave the diagonal implicit.
    return m | torch.eye(n, dtype=torch.bool, device=device)


def verify_forward(backend: Any, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer: Any,
                   forward_batch: Any, save_kv_cache: bool = True) -> torch.Tensor:
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    if save_kv_cache and k is not None and v is not None:
        backend.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, backend.swa_out_cache_loc), k, v)

    hq, dqk, dv = layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim
    q_ = q.reshape(-1, hq, dqk)
    out = q.new_empty((q_.shape[0], hq * dv)).view(-1, hq, dv)
    k_cache = backend.token_to_kv_pool.get_key_buffer(layer.layer_id)
    v_cache = backend.token_to_kv_pool.get_value_buffer(layer.layer_id)
    req_to_token = backend.req_to_token_pool.req_to_token

    bs = forward_batch.batch_size
    widths = _widths(forward_batch.spec_info, bs, q_.shape[0])
    seq_lens, slots, attn_masks = _per_forward(forward_batch, req_to_token, widths, q_.device, int(layer.layer_id))
    gqa = hq != layer.tp_k_head_num
    start = 0
    for b in range(bs):
        n = widths[b]
        qq = q_[start:start + n].movedim(0, 1).unsqueeze(0)
        cd = _compute_dtype(qq)
        qq, kk, vv = qq.to(cd), gather(k_cache, slots[b], cd), gather(v_cache, slots[b], cd)
        o = scaled_dot_product_attention(qq, kk, vv, attn_mask=attn_masks[b], scale=layer.scaling, enable_gqa=gqa)
        out[start:start + n] = o.squeeze(0).movedim(0, 1)
        start += n
    return out.reshape(-1, hq * dv)


def _widths(spec_info: Any, bs: int, tokens: int) -> tuple[int, ...]:
    """Positions per request: uniform (SGLang's layout, tokens = bs x n) unless the producer
    gives ragged chain widths (`agentserve_widths`, ours): then a request verifies only its
    own block and a batch of one long copy and seven plain rows costs 1 x w + 7 tokens, not 8 x w."""
    ragged = getattr(spec_info, "agentserve_widths", None)
    if ragged is not None:
        assert len(ragged) == bs and sum(ragged) == tokens, "ragged verify widths do not match the batch"
        return tuple(int(w) for w in ragged)
    return (tokens // bs,) * bs


def _per_forward(forward_batch: Any, req_to_token: torch.Tensor, widths: tuple[int, ...], device: torch.device,
                 layer_id: int) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor | None]]:
    """What every layer of one verify forward shares (prefix lengths, KV slots, masks), built
    once per forward rather than once per layer. Layers run in increasing order, so a layer id
    not above the last one seen starts a new forward (even if the batch object is reused) and
    rebuilds. A one-token block sees the whole prefix and itself: no mask, which lets SDPA
    take its unmasked kernel."""
    cached = getattr(forward_batch, "_agentserve_verify_meta", None)
    if cached is not None and cached[0] < layer_id and cached[1] == widths:
        forward_batch._agentserve_verify_meta = (layer_id, cached[1], cached[2])
        return cached[2]
    bs = len(widths)
    seq_lens = [int(x) for x in forward_batch.seq_lens.tolist()]
    rpi = forward_batch.req_pool_indices.tolist()
    slots = [req_to_token[rpi[b], : seq_lens[b] + widths[b]] for b in range(bs)]
    attn_masks: list[torch.Tensor | None] = []
    uniform = len(set(widths)) == 1
    masks = (_draft_mask(forward_batch.spec_info, bs, widths[0], device)
             if uniform and widths[0] > 1 and not hasattr(forward_batch.spec_info, "agentserve_widths") else None)
    for b, n in enumerate(widths):
        if n == 1:
            attn_masks.append(None)
            continue
        m = torch.ones(n, seq_lens[b] + n, dtype=torch.bool, device=device)
        # ragged blocks are chains; a uniform block uses the producer's mask (chain or tree)
        m[:, seq_lens[b]:] = masks[b] if masks is not None else torch.ones(n, n, dtype=torch.bool, device=device).tril()
        attn_masks.append(m)
    meta = (seq_lens, slots, attn_masks)
    try:
        forward_batch._agentserve_verify_meta = (layer_id, widths, meta)
    except AttributeError:  # a slotted batch object: recompute per layer
        pass
    return meta


def around_forward_extend(original: Callable[..., torch.Tensor], backend: Any, q: torch.Tensor, k: Any, v: Any,
                          layer: Any, forward_batch: Any, save_kv_cache: bool = True, **kw: Any) -> torch.Tensor:
    mode = getattr(forward_batch, "forward_mode", None)
    if mode is not None and mode.is_target_verify() and not getattr(layer, "is_cross_attention", False):
        return verify_forward(backend, q, k, v, layer, forward_batch, save_kv_cache)
    return original(backend, q, k, v, layer, forward_batch, save_kv_cache, **kw)


def around_decode_sdpa(original: Callable[..., torch.Tensor], backend: Any, query: torch.Tensor, output: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                       req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, encoder_lens: Any = None,
                       scaling: Any = None, enable_gqa: bool = False, causal: bool = False, is_cross_attn: bool = False,
                       sliding_window_size: Any = None) -> torch.Tensor:
    """The torch_native decode loop (one query token per request over its whole KV) in fp32 for
    half-precision queries on a CPU; encoder, cross-attention and sliding-window layers, and
    every other dtype or device, go to SGLang's loop unchanged."""
    plain = encoder_lens is None and not is_cross_attn and (sliding_window_size is None or sliding_window_size < 0)
    if not plain or _compute_dtype(query) == query.dtype:
        return original(backend, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        encoder_lens, scaling=scaling, enable_gqa=enable_gqa, causal=causal,
                        is_cross_attn=is_cross_attn, sliding_window_size=sliding_window_size)
    global _announced
    cd = _compute_dtype(query)
    if not _announced:
        _announced = True
        log.info("cpu_attention: %s decode attention runs in %s", query.dtype,
                 "float64 (server.deterministic)" if cd == torch.float64 else "fp32 (server.cpu_attention: fp32)")
    sdpa_ok = cd == torch.float64 or selfcheck.fp32_sdpa_ok()  # once per process, at first use
    rows = req_pool_indices.tolist()
    lens = seq_lens.tolist()
    for i, (r, n) in enumerate(zip(rows, lens)):
        slots = req_to_token[r, :n]
        kk = gather(k_cache, slots, cd)  # [1, heads_kv, n, d]
        vv = gather(v_cache, slots, cd)
        qq = query[i:i + 1].movedim(0, 1).unsqueeze(0).to(cd)  # [1, heads_q, 1, d]
        if sdpa_ok:
            o = scaled_dot_product_attention(qq, kk, vv, scale=scaling, enable_gqa=enable_gqa, is_causal=causal)
        else:  # torch's fp32 SDPA failed its check on this CPU (selfcheck.py): explicit products
            o = selfcheck.reference_attention(qq, kk, vv, scaling, enable_gqa)
        output[i:i + 1] = o.squeeze(0).movedim(1, 0)
    return output
