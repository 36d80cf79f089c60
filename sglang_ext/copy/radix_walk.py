"""Copied drafts from SGLang's radix tree: what followed this exact sequence before.

The radix cache holds the KV of earlier requests' token sequences (prompt + output, inserted
when a request finishes) for as long as memory allows. If a running request's whole sequence so
far (prompt + emitted tokens) is a path in that tree and the path goes on, the tokens that
follow are what an earlier request produced from exactly this point: a retried tool call, the
same JSON plan re-emitted, another agent with the same prompt. That is the "exact prefix seen
before" source; the per-session suffix index (``suffix_index.py``) covers repeats *inside* a
conversation.

The walk is read-only: SGLang's own ``match_prefix`` splits nodes and bumps LRU clocks, which a
drafting probe must not do on every decode step. It follows ``children`` and compares
``key.token_ids`` (C-level slice compares), so it needs a tree core that Python can walk (the
Python TreeCore; the launcher selects it when radix drafting is on). Cost: one dict lookup and
one slice compare per tree node on the path (a few per request on agent prompts).

Where the tree branches after the match, the most recently used child is followed and the
position's ``agreement`` is 1/(number of children): a pre-verification statistic the copy
survival estimator uses. The proposal depends only on the tree (earlier requests' tokens) and
the request's own committed tokens, never on this step's draws, so verifying it as a
deterministic draft is lossless (see ``suffix_proposer.py``).
"""

from __future__ import annotations

from array import array
from typing import Any, Optional, Sequence

from .suffix_index import Proposal


def _token_ids(node: Any) -> Sequence[int]:
    key = node.key
    return key.token_ids if hasattr(key, "token_ids") else key


def _child(node: Any, token: int) -> Any:
    children = node.children
    child = children.get(token)
    if child is not None:
        return child
    # keys namespaced by extra_key / cache_salt: find the child by its first token
    for c in children.values():
        t = _token_ids(c)
        if len(t) and t[0] == token:
            return c
    return None


def _same(a: Sequence[int], b: array) -> bool:
    return a == b if isinstance(a, array) else list(a) == b.tolist()


def walkable(root: Any) -> bool:
    """Whether ``root`` looks like a Python radix tree (dict of children with token keys)."""
    return isinstance(getattr(root, "children", None), dict)


def radix_continuation(root: Any, tokens: Sequence[int], max_len: int, min_prefix: int = 1) -> Optional[Proposal]:
    """Up to ``max_len`` tokens that followed ``tokens`` (as a whole, from the root) in the
    tree, or None when the tree does not hold the whole sequence or nothing follows it."""
    n = len(tokens)
    if max_len <= 0 or n < min_prefix or not walkable(root):
        return None
    seq = tokens if isinstance(tokens, array) else array("q", tokens)
    node, off = root, 0
    edge: Sequence[int] = ()
    pos = 0  # matched tokens of the current edge
    while off < n:
        child = _child(node, int(seq[off]))
        if child is None:
            return None
        edge = _token_ids(child)
        m = min(len(edge), n - off)
        if not _same(edge[:m], seq[off:off + m]):
            return None
        node, off, pos = child, off + m, m
    out: list[int] = []
    agreement: list[float] = []
    # rest of the edge the match ended in
    if node is not root:
        rest = edge[pos:]
        take = list(rest[:max_len])
        out += take
        agreement += [1.0] * len(take)
    while len(out) < max_len:
        children = [c for c in node.children.values() if len(_token_ids(c))]
        if not children:
            break
        node = max(children, key=lambda c: getattr(c, "last_access_time", 0))
        share = 1.0 / len(children)
        take = list(_token_ids(node)[: max_len - len(out)])
        out += take
        agreement += [share] + [1.0] * (len(take) - 1)
    if not out:
        return None
    return Proposal(tokens=[int(t) for t in out], match_len=n, occurrences=1, agreement=agreement)
