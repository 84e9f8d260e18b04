"""Token sequences packed into prefix trees (tries), laid out as the rows of one transformer batch.

Evaluation scores many sequences that share long prefixes: every answer of a question repeats its prompt,
the prompts repeat a template or a chat system prompt, and TOFU's perturbed answers repeat the answer's frame
with one fact swapped. In a trie each distinct prefix is one node, so a forward pass over the nodes computes
each shared token once. A node is a token at position ``depth`` that may attend to itself and its ancestors
only (`TrieRow.ancestor_mask`); with that mask and ``position_ids = depth`` a causal LM gives every node the
hidden state it has in each sequence passing through it.

`pack_tries` fills rows greedily in lexicographic order of the sequences, which is the trie's depth-first
order: a sequence then shares the longest prefix it can with the row (the longest common prefix with any
sequence already in it is the one with the sequence just before it in sorted order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class TrieRow:
    """One batch row: trie nodes in depth-first order, and the node path of every sequence packed into it."""

    tokens: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)  # index of the parent node in this row, -1 for a root
    paths: dict[int, list[int]] = field(default_factory=dict)  # sequence index -> node of each of its tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def add_node(self, token: int, parent: int) -> int:
        self.tokens.append(token)
        self.parent.append(parent)
        self.depth.append(self.depth[parent] + 1 if parent >= 0 else 0)
        return len(self.tokens) - 1

    def ancestor_mask(self, width: int | None = None) -> torch.Tensor:
        """[width, width] bool: ``mask[j, k]`` iff node k is node j or one of its ancestors.

        Columns and rows past ``len(self)`` (padding up to `width`) see only themselves, so no query row is
        entirely masked (an all-masked softmax row would be NaN)."""
        width = len(self) if width is None else width
        mask = torch.zeros(width, width, dtype=torch.bool)
        for j, parent in enumerate(self.parent):  # depth-first order: a parent's row is complete before its child
            if parent >= 0:
                mask[j] = mask[parent]
            mask[j, j] = True
        for j in range(len(self), width):
            mask[j, j] = True
        return mask


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pack_tries(seqs: Sequence[Sequence[int]], capacity: int) -> list[TrieRow]:
    """Pack `seqs` (non-empty token lists) into trie rows of at most `capacity` nodes each.

    Sequences go in lexicographic order; each joins the current row if the nodes it adds (its tokens past the
    longest prefix it shares with the row) fit, else it starts a new row. Every sequence lies whole in one row.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    rows: list[TrieRow] = []
    row: TrieRow | None = None
    prev: Sequence[int] = ()
    prev_path: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda k: list(seqs[k])):
        seq = list(seqs[i])
        if not seq:
            raise ValueError(f"sequence {i} is empty")
        if len(seq) > capacity:
            raise ValueError(f"sequence {i} has {len(seq)} tokens, more than a row holds ({capacity})")
        shared = _common_prefix(prev, seq) if row is not None else 0
        if row is not None and len(row) + len(seq) - shared > capacity:
            rows.append(row)
            row, shared = None, 0
        if row is None:
            row = TrieRow()
        path = prev_path[:shared]
        for token in seq[shared:]:
            path.append(row.add_node(token, path[-1] if path else -1))
        row.paths[i] = path
        prev, prev_path = seq, path
    if row is not None:
        rows.append(row)
    return rows
