"""Packing sequences into prefix-tree rows: shared prefixes stored once, paths and masks exact."""

from __future__ import annotations

import random

import pytest
import torch

from soul.eval.trie import TrieRow, pack_tries


def _check_row(row: TrieRow, seqs) -> None:
    """Each packed sequence's path spells it, one depth per token, each node the child of the one before."""
    for i, path in row.paths.items():
        assert [row.tokens[n] for n in path] == list(seqs[i])
        assert [row.depth[n] for n in path] == list(range(len(seqs[i])))
        assert [row.parent[n] for n in path] == [-1, *path[:-1]]


def test_shared_prefixes_are_one_node_each():
    seqs = [[1, 2, 4], [1, 2, 3], [6], [1, 5], [1, 2, 3]]  # unsorted, with a duplicate
    (row,) = pack_tries(seqs, capacity=10)
    # trie nodes: 1 ─ 2 ─ 3, 2 ─ 4, 1 ─ 5, 6
    assert len(row) == 6
    assert sorted(row.tokens) == [1, 2, 3, 4, 5, 6]
    assert set(row.paths) == set(range(5))
    assert row.paths[1] == row.paths[4]  # identical sequences share every node
    _check_row(row, seqs)


def test_ancestor_mask_is_the_path_and_pads_see_only_themselves():
    seqs = [[1, 2, 3], [1, 2, 4], [1, 5]]
    (row,) = pack_tries(seqs, capacity=10)
    mask = row.ancestor_mask(width=len(row) + 2)
    for path in row.paths.values():
        for depth, node in enumerate(path):
            assert torch.nonzero(mask[node]).flatten().tolist() == sorted(path[:depth + 1])
    for pad in (len(row), len(row) + 1):
        assert torch.nonzero(mask[pad]).flatten().tolist() == [pad]
        assert not mask[:len(row), pad].any()  # no real node attends to a pad


def test_rows_respect_capacity_and_hold_every_sequence_once():
    rng = random.Random(0)
    # sequences from a small alphabet with common starts (templates), like prompts with their answers
    stems = [[rng.randrange(5) for _ in range(rng.randrange(1, 6))] for _ in range(6)]
    seqs = [rng.choice(stems) + [rng.randrange(8) for _ in range(rng.randrange(1, 7))] for _ in range(60)]
    capacity = 24
    rows = pack_tries(seqs, capacity)
    assert all(len(row) <= capacity for row in rows)
    assert sorted(i for row in rows for i in row.paths) == list(range(len(seqs)))
    for row in rows:
        _check_row(row, seqs)
        # a trie: no node has two children carrying the same token
        children = {(row.parent[n], row.tokens[n]) for n in range(len(row))}
        assert len(children) == len(row)
    assert sum(len(row) for row in rows) < sum(len(s) for s in seqs)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="sequence 1 has 4 tokens"):
        pack_tries([[1], [1, 2, 3, 4]], capacity=3)
    with pytest.raises(ValueError, match="sequence 0 is empty"):
        pack_tries([[]], capacity=3)
    with pytest.raises(ValueError, match="capacity"):
        pack_tries([[1]], capacity=0)
