"""TARGET_VERIFY attention for SGLang's torch_native backend (the CPU backend).

SGLang 0.5.23's torch_native backend only knows prefill/extend and decode; a verify forward
(several draft tokens per request, appended after the verified prefix, with a draft-to-draft
mask) fails inside its extend path. This AROUND hook handles that mode: each request's draft
queries attend to the whole verified prefix and to the draft positions its mask allows
(mask[i, j] = draft j is visible to draft i; a chain is lower-triangular, a tree is its
ancestor relation). Every other mode goes to the original method untouched.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.nn.functional import scaled_dot_product_attention

TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend"


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
    n = q_.shape[0] // bs
    seq_lens, slots, attn_masks = _per_forward(forward_batch, req_to_token, bs, n, q_.device, int(layer.layer_id))
    gqa = hq != layer.tp_k_head_num
    for b in range(bs):
        kk = k_cache[slots[b]].movedim(0, 1).unsqueeze(0)
        vv = v_cache[slots[b]].movedim(0, 1).unsqueeze(0)
        qq = q_[b * n:(b + 1) * n].movedim(0, 1).unsqueeze(0)
        if kk.dtype != qq.dtype:
            kk, vv = kk.to(qq.dtype), vv.to(qq.dtype)
        o = scaled_dot_product_attention(qq, kk, vv, attn_mask=attn_masks[b], scale=layer.scaling, enable_gqa=gqa)
        out[b * n:(b + 1) * n] = o.squeeze(0).movedim(0, 1)
    return out.reshape(-1, hq * dv)


def _per_forward(forward_batch: Any, req_to_token: torch.Tensor, bs: int, n: int, device: torch.device,
                 layer_id: int) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor | None]]:
    """What every layer of one verify forward shares (prefix lengths, KV slots, masks), built
    once per forward rather than once per layer. Layers run in increasing order, so a layer id
    not above the last one seen starts a new forward (even if the batch object is reused) and
    rebuilds. A one-token block sees the whole prefix and itself: no mask, which lets SDPA
    take its unmasked kernel."""
    cached = getattr(forward_batch, "_agentserve_verify_meta", None)
    if cached is not None and cached[0] < layer_id and cached[1] == (bs, n):
        forward_batch._agentserve_verify_meta = (layer_id, cached[1], cached[2])
        return cached[2]
    seq_lens = [int(x) for x in forward_batch.seq_lens.tolist()]
    rpi = forward_batch.req_pool_indices.tolist()
    slots = [req_to_token[rpi[b], : seq_lens[b] + n] for b in range(bs)]
    attn_masks: list[torch.Tensor | None] = []
    if n == 1:
        attn_masks = [None] * bs
    else:
        masks = _draft_mask(forward_batch.spec_info, bs, n, device)
        for b in range(bs):
            m = torch.ones(n, seq_lens[b] + n, dtype=torch.bool, device=device)
            m[:, seq_lens[b]:] = masks[b]
            attn_masks.append(m)
    meta = (seq_lens, slots, attn_masks)
    try:
        forward_batch._agentserve_verify_meta = (layer_id, (bs, n), meta)
    except AttributeError:  # a slotted batch object: recompute per layer
        pass
    return meta


def around_forward_extend(original: Callable[..., torch.Tensor], backend: Any, q: torch.Tensor, k: Any, v: Any,
                          layer: Any, forward_batch: Any, save_kv_cache: bool = True, **kw: Any) -> torch.Tensor:
    mode = getattr(forward_batch, "forward_mode", None)
    if mode is not None and mode.is_target_verify() and not getattr(layer, "is_cross_attention", False):
        return verify_forward(backend, q, k, v, layer, forward_batch, save_kv_cache)
    return original(backend, q, k, v, layer, forward_batch, save_kv_cache, **kw)
