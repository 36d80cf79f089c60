"""A pure-torch stand-in for the CPU build of `sgl_kernel`, which is not on PyPI.

SGLang 0.5.23's CPU path imports a handful of names from `sgl_kernel` at module load; plain
serving calls none of them on a CPU without AMX (layers take their forward_native paths).
Speculative decoding calls the few implemented below. Every other name resolves to a function
that raises a clear NotImplementedError, so a missing kernel shows up as a named error, never as
a silently wrong result.

SGLang's spawned processes import `sgl_kernel` while unpickling, before any plugin runs, so the
stand-in is a real package (cpu/shim/sgl_kernel) that the launcher puts on PYTHONPATH, and only
when `shim_needed()`: a CPU server with no real `sgl_kernel` importable.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

STANDIN_MARK = "__agentserve_standin__"
_SUBMODULES = ("speculative", "mamba", "kvcacheio", "allreduce", "elementwise", "sampling", "memory", "flash_attn")


# --- the ops SGLang's CPU speculative path calls ------------------------------------------

def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor, start_offset: torch.Tensor,
                                 end_offset: torch.Tensor, out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """req_to_token[req, start:end] = the request's slice of out_cache_loc (slices packed in order)."""
    cum = 0
    for r, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        n = e - s
        if n > 0:
            req_to_token[r, s:e] = out_cache_loc[cum:cum + n].to(req_to_token.dtype)
        cum += n


def assign_extend_cache_locs_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor, start_offset: torch.Tensor,
                                 end_offset: torch.Tensor, out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """The inverse gather: out_cache_loc (packed) = req_to_token[req, start:end] for each request."""
    cum = 0
    for r, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        n = e - s
        if n > 0:
            out_cache_loc[cum:cum + n] = req_to_token[r, s:e].to(out_cache_loc.dtype)
        cum += n


def fill_bonus_tokens_cpu(accept_tokens: torch.Tensor, accept_lens: torch.Tensor, bonus_tokens: torch.Tensor,
                          accept_stride: int) -> None:
    """bonus[i] = the last accepted token of request i (accept_lens includes the bonus)."""
    flat = accept_tokens.reshape(-1)
    idx = torch.arange(accept_lens.numel(), device=flat.device) * accept_stride + accept_lens.long() - 1
    bonus_tokens.copy_(flat[idx].to(bonus_tokens.dtype))


def fill_accept_out_cache_loc_cpu(accept_index: torch.Tensor, out_cache_loc: torch.Tensor,
                                  accept_out_cache_loc: torch.Tensor) -> None:
    """Compact out_cache_loc[accept_index] over the entries that are not -1, in order."""
    flat = accept_index.reshape(-1)
    keep = flat[flat != -1].long()
    accept_out_cache_loc[: keep.numel()] = out_cache_loc[keep].to(accept_out_cache_loc.dtype)


def verify_tree_greedy_cpu(predicts: torch.Tensor, accept_index: torch.Tensor, accept_token_num: torch.Tensor,
                           candidates: torch.Tensor, retrive_index: torch.Tensor, retrive_next_token: torch.Tensor,
                           retrive_next_sibling: torch.Tensor, target_predict: torch.Tensor) -> None:
    """Greedy tree verification with the same contract as SGLang's device kernel: walk from the
    root, at each depth take the first child (then siblings) equal to the target's argmax at the
    last accepted node; write the target token at every accepted node and at the last one."""
    bs, n = candidates.shape
    depth_max = accept_index.shape[1]
    cand, ridx = candidates.tolist(), retrive_index.tolist()
    nxt, sib = retrive_next_token.tolist(), retrive_next_sibling.tolist()
    tp = target_predict.reshape(-1).tolist()
    pred = predicts.reshape(-1)
    for b in range(bs):
        last = ridx[b][0]
        accept_index[b, 0] = last
        num, cur = 0, 0
        for _ in range(1, depth_max):
            cur = nxt[b][cur]
            target = tp[last]
            matched = False
            while cur != -1:
                if cand[b][cur] == target:
                    pred[last] = target
                    num += 1
                    accept_index[b, num] = ridx[b][cur]
                    last = ridx[b][cur]
                    matched = True
                    break
                cur = sib[b][cur]
            if not matched:
                break
        accept_token_num[b] = num
        pred[last] = tp[last]


def reconstruct_indices_from_tree_mask(tree_mask: torch.Tensor, verified_seq_len: torch.Tensor, positions: torch.Tensor,
                                       retrieve_index: torch.Tensor, retrieve_next_token: torch.Tensor,
                                       retrieve_next_sibling: torch.Tensor, batch_size: int, draft_token_num: int) -> None:
    """Verify metadata from an ancestor mask (mask[b,i,j]: j is an ancestor of i), as SGLang's op:
    position = depth + seq_len, parent = nearest ancestor, first child, next sibling."""
    n = draft_token_num
    if batch_size == 0:
        return
    m = tree_mask.reshape(batch_size, n, n).bool().cpu()
    order = torch.arange(n)
    anc = m & (order[None, :] < order[:, None])[None]  # strict ancestors j < i
    depth = anc.sum(-1)
    positions.view(batch_size, n).copy_((depth + verified_seq_len.cpu().view(-1, 1)).to(positions.dtype))
    retrieve_index.copy_((torch.arange(batch_size)[:, None] * n + order[None, :]).to(retrieve_index.dtype))
    parent = torch.where(anc.any(-1), (anc * order).argmax(-1), torch.full_like(depth, -1))
    nt = torch.full((batch_size, n), -1, dtype=torch.long)
    ns = torch.full((batch_size, n), -1, dtype=torch.long)
    par = parent.tolist()
    for b in range(batch_size):
        first_child: dict[int, int] = {}
        for i in reversed(range(n)):
            nt[b, i] = first_child.get(i, -1)
            p = par[b][i]
            if p >= 0:
                ns[b, i] = first_child.get(p, -1)
                first_child[p] = i
    retrieve_next_token.copy_(nt.to(retrieve_next_token.dtype))
    retrieve_next_sibling.copy_(ns.to(retrieve_next_sibling.dtype))


def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor,
                                src_loc: torch.Tensor) -> None:
    # The real kernel copies rows through raw data pointers. SGLang calls it for real only when
    # SGLANG_NATIVE_MOVE_KV_CACHE is off (our launcher turns it on: rows move with plain
    # indexing); the pool's start-up warm-up copies slot 0 onto itself, which is a no-op.
    if torch.equal(tgt_loc, src_loc):
        return
    raise NotImplementedError("sgl_kernel.copy_all_layer_kv_cache_cpu: set SGLANG_NATIVE_MOVE_KV_CACHE=1 (agentserve's launcher does)")


_IMPLEMENTED: dict[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (assign_req_to_token_pool_cpu, assign_extend_cache_locs_cpu, fill_bonus_tokens_cpu,
              fill_accept_out_cache_loc_cpu, verify_tree_greedy_cpu, copy_all_layer_kv_cache_cpu)
}
_SPECULATIVE: dict[str, Callable[..., Any]] = {"reconstruct_indices_from_tree_mask": reconstruct_indices_from_tree_mask}


def _missing(qualname: str) -> Callable[..., Any]:
    def fn(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{qualname} has no CPU implementation in agentserve's sgl_kernel stand-in")

    fn.__name__ = qualname.rsplit(".", 1)[-1]
    return fn


def _module_getattr(name: str) -> Callable[[str], Any]:
    def __getattr__(attr: str) -> Any:  # PEP 562: `from sgl_kernel import anything` succeeds
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _missing(f"{name}.{attr}")

    return __getattr__


def populate_standin(ns: dict[str, Any]) -> None:
    """Fill the shim package `sgl_kernel` (its globals) and register its submodules."""
    ns.update(_IMPLEMENTED)
    ns["__version__"] = "0.0.0+agentserve-cpu-standin"
    ns[STANDIN_MARK] = True
    ns["__getattr__"] = _module_getattr("sgl_kernel")
    for sub in _SUBMODULES:
        name = f"sgl_kernel.{sub}"
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        mod.__dict__.update(_SPECULATIVE if sub == "speculative" else {})
        mod.__getattr__ = _module_getattr(name)  # type: ignore[method-assign]
        setattr(mod, STANDIN_MARK, True)
        ns[sub] = mod
        sys.modules[name] = mod


SHIM_DIR = Path(__file__).resolve().parent / "shim"


def shim_needed() -> bool:
    """True when a CPU server here would find no sgl_kernel of its own."""
    spec = importlib.util.find_spec("sgl_kernel")
    return spec is None or (spec.origin is not None and str(SHIM_DIR) in spec.origin)
