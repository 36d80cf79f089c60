"""The pure-torch sgl_kernel stand-in ops against SGLang's own references and hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sglang_ext.cpu import kernels as ck


def random_tree_mask(rng: np.random.Generator, bs: int, n: int) -> np.ndarray:
    """Ancestor masks (self included) of random trees rooted at node 0, parents before children."""
    masks = np.zeros((bs, n, n), dtype=bool)
    for b in range(bs):
        for i in range(n):
            masks[b, i, i] = True
            if i:
                p = int(rng.integers(0, i))
                masks[b, i] |= masks[b, p]
    return masks


@pytest.mark.parametrize("seed", range(5))
def test_reconstruct_matches_sglang_host_reference(seed: int) -> None:
    from sglang.srt.speculative.ngram_worker import _derive_tree_links

    rng = np.random.default_rng(seed)
    bs, n = 3, 8
    mask = random_tree_mask(rng, bs, n)
    seq = torch.tensor([5, 17, 2])
    pos = torch.empty(bs * n, dtype=torch.int64)
    ridx, nt, ns = (torch.empty(bs, n, dtype=torch.int64) for _ in range(3))
    ck.reconstruct_indices_from_tree_mask(torch.from_numpy(mask.reshape(-1)), seq, pos, ridx, nt, ns, bs, n)
    ref_nt, ref_ns = _derive_tree_links(mask.reshape(-1), bs, n)
    assert torch.equal(nt, ref_nt) and torch.equal(ns, ref_ns)
    depth = torch.from_numpy(mask.sum(-1) - 1)
    assert torch.equal(pos.view(bs, n), depth + seq[:, None])
    assert torch.equal(ridx, torch.arange(bs * n).view(bs, n))


def test_verify_tree_greedy_chain() -> None:
    # One request, chain of 4 draft nodes after the root; the target agrees on 2 drafts.
    n = 5
    cand = torch.tensor([[10, 11, 12, 13, 14]])
    ridx = torch.arange(n).view(1, n)
    nxt = torch.tensor([[1, 2, 3, 4, -1]])
    sib = torch.full((1, n), -1)
    target = torch.tensor([[11, 12, 99, 14, 15]])  # argmax after each node
    predicts = torch.zeros(n, dtype=torch.int32)
    accept_index = torch.full((1, n), -1, dtype=torch.int32)
    num = torch.zeros(1, dtype=torch.int32)
    ck.verify_tree_greedy_cpu(predicts, accept_index, num, cand, ridx, nxt, sib, target)
    assert num.tolist() == [2]
    assert accept_index[0, :3].tolist() == [0, 1, 2] and accept_index[0, 3:].tolist() == [-1, -1]
    # accepted nodes carry the target's next token; the last accepted node carries the bonus
    assert predicts[:3].tolist() == [11, 12, 99]


def test_verify_tree_greedy_takes_matching_sibling() -> None:
    cand = torch.tensor([[0, 7, 8, 9]])  # root, two children (7, 8), grandchild 9 under 8
    ridx = torch.arange(4).view(1, 4)
    nxt = torch.tensor([[1, -1, 3, -1]])
    sib = torch.tensor([[-1, 2, -1, -1]])
    target = torch.tensor([[8, 0, 9, 42]])
    predicts = torch.zeros(4, dtype=torch.int32)
    accept_index = torch.full((1, 3), -1, dtype=torch.int32)
    num = torch.zeros(1, dtype=torch.int32)
    ck.verify_tree_greedy_cpu(predicts, accept_index, num, cand, ridx, nxt, sib, target)
    assert num.item() == 2 and accept_index[0].tolist() == [0, 2, 3]
    assert predicts[3].item() == 42


def test_cache_loc_assign_and_gather_are_inverse() -> None:
    req_to_token = torch.zeros(4, 16, dtype=torch.int32)
    rpi = torch.tensor([2, 0])
    start, end = torch.tensor([3, 0]), torch.tensor([6, 2])
    locs = torch.tensor([100, 101, 102, 200, 201])
    ck.assign_req_to_token_pool_cpu(rpi, req_to_token, start, end, locs, 16)
    assert req_to_token[2, 3:6].tolist() == [100, 101, 102] and req_to_token[0, :2].tolist() == [200, 201]
    out = torch.empty(5, dtype=torch.int64)
    ck.assign_extend_cache_locs_cpu(rpi, req_to_token, start, end, out, 16)
    assert out.tolist() == locs.tolist()


def test_bonus_and_accept_compaction() -> None:
    accept_tokens = torch.tensor([[5, 6, 7], [8, 9, 0]])
    bonus = torch.empty(2, dtype=torch.int64)
    ck.fill_bonus_tokens_cpu(accept_tokens, torch.tensor([3, 1]), bonus, 3)
    assert bonus.tolist() == [7, 8]
    out = torch.full((4,), -7, dtype=torch.int64)
    ck.fill_accept_out_cache_loc_cpu(torch.tensor([[0, 2, -1], [3, -1, -1]]), torch.tensor([10, 11, 12, 13]), out)
    assert out.tolist() == [10, 12, 13, -7]


def test_pointer_copy_refuses_real_moves() -> None:
    same = torch.zeros(4, dtype=torch.int64)
    ck.copy_all_layer_kv_cache_cpu(torch.zeros(1), torch.zeros(1), same, same)  # warm-up no-op
    with pytest.raises(NotImplementedError, match="SGLANG_NATIVE_MOVE_KV_CACHE"):
        ck.copy_all_layer_kv_cache_cpu(torch.zeros(1), torch.zeros(1), torch.tensor([1]), torch.tensor([2]))


def test_standin_missing_names_fail_loudly() -> None:
    ns: dict = {}
    ck.populate_standin(ns)
    fn = ns["__getattr__"]("fused_add_rmsnorm")
    with pytest.raises(NotImplementedError, match="sgl_kernel.fused_add_rmsnorm"):
        fn()
    assert ns["verify_tree_greedy_cpu"] is ck.verify_tree_greedy_cpu
