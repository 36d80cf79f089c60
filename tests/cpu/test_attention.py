"""The TARGET_VERIFY attention we give SGLang's torch_native backend, against a direct
computation: each draft query sees its request's whole prefix and the drafts its mask allows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_ext.cpu.attention import verify_forward

H, D, HKV = 4, 8, 2


class _Pool:
    def __init__(self, size: int, layers: int, g: torch.Generator) -> None:
        self.k = [torch.randn(size, HKV, D, generator=g) for _ in range(layers)]
        self.v = [torch.randn(size, HKV, D, generator=g) for _ in range(layers)]

    def set_kv_buffer(self, layer, loc, k, v) -> None:
        self.k[layer.layer_id][loc.loc] = k.view(-1, HKV, D)
        self.v[layer.layer_id][loc.loc] = v.view(-1, HKV, D)

    def get_key_buffer(self, i: int) -> torch.Tensor:
        return self.k[i]

    def get_value_buffer(self, i: int) -> torch.Tensor:
        return self.v[i]


def _reference(q, pool, layer_id, slots, prefix, mask, scale):
    k = pool.k[layer_id][slots].repeat_interleave(H // HKV, dim=1)  # [L, H, D]
    v = pool.v[layer_id][slots].repeat_interleave(H // HKV, dim=1)
    att = torch.einsum("nhd,lhd->hnl", q, k) * scale
    n = q.shape[0]
    allowed = torch.ones(n, prefix + n, dtype=torch.bool)
    allowed[:, prefix:] = mask
    att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hnl,lhd->nhd", att, v).reshape(n, H * D)


@pytest.mark.parametrize("n", [1, 3])
def test_verify_attention_matches_direct_computation(n: int) -> None:
    g = torch.Generator().manual_seed(0)
    layers, prefixes = 3, [5, 9]
    bs = len(prefixes)
    pool = _Pool(64, layers, g)
    req_to_token = torch.zeros(4, 32, dtype=torch.long)
    req_to_token[1, :20] = torch.randperm(30, generator=g)[:20]
    req_to_token[3, :20] = 30 + torch.randperm(30, generator=g)[:20]
    rpi = torch.tensor([1, 3])
    out_loc = torch.cat([req_to_token[r, p:p + n] for r, p in zip(rpi.tolist(), prefixes)])
    chain = torch.ones(n, n, dtype=torch.bool).tril()
    backend = SimpleNamespace(token_to_kv_pool=pool, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                              swa_out_cache_loc=None)
    fb = SimpleNamespace(batch_size=bs, seq_lens=torch.tensor(prefixes), req_pool_indices=rpi, out_cache_loc=out_loc,
                         spec_info=SimpleNamespace(custom_mask=chain.expand(bs, n, n).flatten()))
    for forward in range(2):  # the same batch object twice: the second forward must not reuse the first's slots
        if forward:
            fb.seq_lens = torch.tensor([p + 1 for p in prefixes])
            fb.out_cache_loc = torch.cat([req_to_token[r, p + 1:p + 1 + n] for r, p in zip(rpi.tolist(), prefixes)])
        for lid in range(layers):
            layer = SimpleNamespace(layer_id=lid, tp_q_head_num=H, qk_head_dim=D, v_head_dim=D, tp_k_head_num=HKV,
                                    scaling=D ** -0.5)
            q = torch.randn(bs * n, H * D, generator=g)
            k = torch.randn(bs * n, HKV * D, generator=g)
            v = torch.randn(bs * n, HKV * D, generator=g)
            out = verify_forward(backend, q, k, v, layer, fb)
            for b, r in enumerate(rpi.tolist()):
                pre = int(fb.seq_lens[b])
                ref = _reference(q[b * n:(b + 1) * n].view(n, H, D), pool, lid, req_to_token[r, :pre + n], pre, chain,
                                 layer.scaling)
                torch.testing.assert_close(out[b * n:(b + 1) * n], ref, atol=1e-5, rtol=1e-5)


def test_ragged_chain_widths_match_direct_computation() -> None:
    """Our ragged layout: request b verifies only widths[b] positions (a chain)."""
    g = torch.Generator().manual_seed(1)
    layers, prefixes, widths = 2, [5, 9, 3], [4, 1, 2]
    bs = len(prefixes)
    pool = _Pool(96, layers, g)
    req_to_token = torch.zeros(3, 32, dtype=torch.long)
    for r in range(3):
        req_to_token[r, :20] = 30 * r + torch.randperm(30, generator=g)[:20]
    rpi = torch.tensor([0, 1, 2])
    out_loc = torch.cat([req_to_token[r, p:p + w] for r, p, w in zip(rpi.tolist(), prefixes, widths)])
    backend = SimpleNamespace(token_to_kv_pool=pool, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                              swa_out_cache_loc=None)
    fb = SimpleNamespace(batch_size=bs, seq_lens=torch.tensor(prefixes), req_pool_indices=rpi, out_cache_loc=out_loc,
                         spec_info=SimpleNamespace(custom_mask=None, agentserve_widths=widths))
    total = sum(widths)
    for lid in range(layers):
        layer = SimpleNamespace(layer_id=lid, tp_q_head_num=H, qk_head_dim=D, v_head_dim=D, tp_k_head_num=HKV,
                                scaling=D ** -0.5)
        q = torch.randn(total, H * D, generator=g)
        k = torch.randn(total, HKV * D, generator=g)
        v = torch.randn(total, HKV * D, generator=g)
        out = verify_forward(backend, q, k, v, layer, fb)
        start = 0
        for b, r in enumerate(rpi.tolist()):
            n, pre = widths[b], prefixes[b]
            ref = _reference(q[start:start + n].view(n, H, D), pool, lid, req_to_token[r, :pre + n], pre,
                             torch.ones(n, n, dtype=torch.bool).tril(), layer.scaling)
            torch.testing.assert_close(out[start:start + n], ref, atol=1e-5, rtol=1e-5)
            start += n
    fb.spec_info.agentserve_widths = [4, 1, 1]  # widths that do not add up to the tokens: refused
    with pytest.raises(AssertionError):
        verify_forward(backend, q, k, v, layer, fb)


def test_half_precision_decode_runs_in_fp32_and_everything_else_is_sglangs() -> None:
    """The decode hook against SGLang's own torch_native decode loop: for bf16 on a CPU it is
    that loop's result computed in fp32 (within bf16 rounding of the output, and closer to the
    fp32 truth than the bf16 loop); fp32, sliding-window and cross-attention calls are SGLang's."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from sglang_ext.cpu.attention import around_decode_sdpa

    sglang_loop = TorchNativeAttnBackend._run_sdpa_forward_decode
    g = torch.Generator().manual_seed(1)
    hq, hkv, d, pool = 9, 3, 64, 256
    k32, v32 = torch.randn(pool, hkv, d, generator=g), torch.randn(pool, hkv, d, generator=g)
    req_to_token = torch.zeros(3, 128, dtype=torch.long)
    for r in range(3):
        req_to_token[r] = torch.randperm(pool, generator=g)[:128]
    rpi, lens = torch.tensor([2, 0]), torch.tensor([100, 37])
    q32 = torch.randn(2, hq, d, generator=g)
    backend = SimpleNamespace()

    def run(fn, q, k, v, **kw):
        out = torch.zeros_like(q)
        fn(backend, q, out, k, v, req_to_token, rpi, lens, None, scaling=d ** -0.5, enable_gqa=True, **kw)
        return out

    calls = []

    def spy(*a, **kw):
        calls.append(kw)
        return sglang_loop(*a, **kw)

    ours = run(lambda *a, **kw: around_decode_sdpa(spy, *a, **kw), q32.bfloat16(), k32.bfloat16(), v32.bfloat16())
    assert not calls and ours.dtype == torch.bfloat16
    truth = run(sglang_loop, q32.bfloat16().float(), k32.bfloat16().float(), v32.bfloat16().float())
    torch.testing.assert_close(ours.float(), truth, atol=8e-3, rtol=8e-3)  # the output's bf16 rounding
    theirs = run(sglang_loop, q32.bfloat16(), k32.bfloat16(), v32.bfloat16())
    assert (ours.float() - truth).abs().sum() <= (theirs.float() - truth).abs().sum()
    # fp32, and layers the fp32 loop does not model, go to SGLang's loop unchanged
    assert torch.equal(run(lambda *a, **kw: around_decode_sdpa(spy, *a, **kw), q32, k32, v32), run(sglang_loop, q32, k32, v32))
    for kw in ({"sliding_window_size": 16}, {"is_cross_attn": True}):
        run(lambda *a, **k: around_decode_sdpa(lambda *a2, **k2: calls.append(k2), *a, **k), q32.bfloat16(),
            k32.bfloat16(), v32.bfloat16(), **kw)
    assert len(calls) == 3 and calls[1]["sliding_window_size"] == 16 and calls[2]["is_cross_attn"] is True


def test_only_torch_native_with_our_verify_hook_reads_ragged_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker asks the backend before sending a packed ragged batch: torch_native with our
    hook installed says yes; the same backend without the hook, a subclass (which may override
    forward_extend) or any other backend says no and gets the uniform layout."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_ext.cpu.attention import TARGET, supports_ragged_verify

    native = TorchNativeAttnBackend.__new__(TorchNativeAttnBackend)  # the type is what matters

    class OtherBackend(TorchNativeAttnBackend):
        pass

    monkeypatch.setattr(HookRegistry, "_patched", set(HookRegistry._patched) - {TARGET})
    assert not supports_ragged_verify(native)
    monkeypatch.setattr(HookRegistry, "_patched", set(HookRegistry._patched) | {TARGET})
    assert supports_ragged_verify(native)
    assert not supports_ragged_verify(OtherBackend.__new__(OtherBackend))
    assert not supports_ragged_verify(SimpleNamespace(forward_extend=None))
