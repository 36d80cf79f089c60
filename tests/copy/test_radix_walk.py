"""Radix-tree continuations walked on SGLang's own RadixCache (no server, no mocks)."""

from __future__ import annotations

from array import array

import pytest

from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang_ext.copy.radix_walk import radix_continuation


def _insert(tree: RadixCache, tokens: list[int]) -> None:
    tree.insert(InsertParams(key=RadixKey(array("q", tokens))))


def _shape(tree: RadixCache) -> list:
    """Every node's key and child count (to prove the walk changes nothing)."""
    out, stack = [], [tree.root_node]
    while stack:
        n = stack.pop()
        out.append((None if n.key is None else list(n.key.token_ids), len(n.children), n.last_access_time))
        stack.extend(n.children.values())
    return sorted(out, key=repr)


@pytest.fixture
def tree() -> RadixCache:
    t = RadixCache.create_simulated()
    _insert(t, [1, 2, 3, 4, 5, 6, 7, 8])
    return t


def test_continues_an_exact_prefix_across_nodes(tree: RadixCache) -> None:
    _insert(tree, [1, 2, 3, 9, 9])  # splits the first edge after 3
    p = radix_continuation(tree.root_node, [1, 2, 3, 4], 3)
    assert p is not None and p.tokens == [5, 6, 7]
    assert p.agreement == [1.0, 1.0, 1.0] and p.match_len == 4


def test_branch_point_follows_most_recent_and_lowers_agreement(tree: RadixCache) -> None:
    _insert(tree, [1, 2, 3, 9, 9])
    # touch the [9, 9] branch last so it is the most recently used child
    tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", [1, 2, 3, 9, 9]))))
    p = radix_continuation(tree.root_node, [1, 2, 3], 4)
    assert p is not None and p.tokens == [9, 9]
    assert p.agreement[0] == pytest.approx(0.5) and p.agreement[1] == 1.0


def test_no_proposal_when_the_sequence_is_not_a_tree_path(tree: RadixCache) -> None:
    assert radix_continuation(tree.root_node, [1, 2, 4], 4) is None  # diverges inside an edge
    assert radix_continuation(tree.root_node, [7], 4) is None  # not from the root
    assert radix_continuation(tree.root_node, [1, 2, 3, 4, 5, 6, 7, 8], 4) is None  # nothing follows
    assert radix_continuation(tree.root_node, [1, 2, 3, 4, 5, 6, 7, 8, 10], 4) is None  # longer than the tree
    assert radix_continuation(tree.root_node, [], 4) is None
    assert radix_continuation(tree.root_node, [1, 2], 0) is None


def test_walk_is_read_only(tree: RadixCache) -> None:
    _insert(tree, [1, 2, 3, 9, 9])
    before = _shape(tree)
    for probe in ([1], [1, 2], [1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, 9]):
        radix_continuation(tree.root_node, probe, 8)
    assert _shape(tree) == before  # no node split, no LRU clock touched


def test_not_walkable_root_gives_none() -> None:
    assert radix_continuation(object(), [1, 2, 3], 4) is None
