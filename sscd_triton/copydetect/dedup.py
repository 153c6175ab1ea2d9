"""Near-duplicate groups of one collection, by position: pairs from a self-search, their
connected components, and each group's representative (numpy only; the search is
`copydetect.search`)."""
from __future__ import annotations

import os

import numpy as np

from sscd_triton import images
from sscd_triton.copydetect import search

KEEP = {"largest": "the largest resolution, then the largest file, then most pairs",
        "most-pairs": "the member with the most pairs",
        "first": "the first in collection order"}

def near_duplicate_pairs(result: search.Result, threshold: float
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unordered pairs (a < b positions) scoring >= threshold in either direction, each
    once with its larger score, best first. Rows holding the same id (a path listed in
    two partitions of an sscd-embed output) are one item: its first row."""
    a, b, s = [], [], []
    for block in result.blocks:
        q, r, sc = search.pairs(block, threshold)
        a.append(q)
        b.append(r)
        s.append(sc)
    if not a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    first_row = first_rows(result.reference_ids)
    a, b, s = first_row[np.concatenate(a)], first_row[np.concatenate(b)], np.concatenate(s)
    other = a != b
    a, b, s = np.minimum(a, b)[other], np.maximum(a, b)[other], s[other]
    order = np.lexsort((-s, b, a))  # by pair, best score first
    a, b, s = a[order], b[order], s[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    a, b, s = a[first], b[first], s[first]
    order = np.lexsort((b, a, -s))
    return a[order], b[order], s[order]


def first_rows(ids: np.ndarray) -> np.ndarray:
    """[n] the first row holding each row's id."""
    _, first, inverse = np.unique(np.asarray(ids, dtype=str), return_index=True,
                                  return_inverse=True)
    return first[inverse].astype(np.int64)


def connected_groups(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label per position (union-find); -1 for positions in no pair."""
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    roots = np.array([find(x) for x in range(n)], np.int64)
    in_pair = np.zeros(n, bool)
    in_pair[a] = True
    in_pair[b] = True
    return np.where(in_pair, roots, -1)

def groups_table(labels: np.ndarray, a: np.ndarray, b: np.ndarray,
                 prefer: list[np.ndarray] | None = None) -> dict:
    """Columns of the groups output, by position: group_id (by size, largest first,
    then first member), member position, representative position, group size.
    `prefer`: per-position keys [n], most important first, larger preferred, choosing
    the representative (default: most pairs); ties go to the first position."""
    members = np.nonzero(labels >= 0)[0]
    if len(members) == 0:
        empty = np.zeros(0, np.int64)
        return {"group_id": empty, "member": empty, "representative": empty, "size": empty}
    if prefer is None:
        prefer = [pair_counts(len(labels), a, b)]
    roots, inverse, sizes = np.unique(labels[members], return_inverse=True, return_counts=True)
    # roots are each group's smallest position: order groups by size desc, then root
    rank = np.empty(len(roots), np.int64)
    rank[np.lexsort((roots, -sizes))] = np.arange(len(roots))
    group = rank[inverse]
    # representative: the preferred keys, then first position
    order = np.lexsort((members, *[-key[members] for key in reversed(prefer)], group))
    first_of_group = np.ones(len(order), bool)
    first_of_group[1:] = group[order][1:] != group[order][:-1]
    rep = np.empty(len(roots), np.int64)
    rep[group[order][first_of_group]] = members[order][first_of_group]
    rows = np.lexsort((members, group))
    return {"group_id": group[rows], "member": members[rows],
            "representative": rep[group[rows]], "size": sizes[inverse][rows]}

def pair_counts(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Near-duplicate pairs of each position [n]."""
    return np.bincount(np.concatenate([a, b]), minlength=n)

def largest_keys(ids: np.ndarray, members: np.ndarray) -> tuple[list[np.ndarray], int]:
    """`--keep largest`'s keys (pixels, file bytes; 0 for other positions) and how many
    of `members` could not be read."""
    pixels = np.zeros(len(ids), np.int64)
    size = np.zeros(len(ids), np.int64)
    unread = 0
    for m in members.tolist():
        wh = images.header_size(ids[m])
        if wh is None:
            unread += 1
            continue
        pixels[m] = wh[0] * wh[1]
        try:
            size[m] = os.path.getsize(ids[m])
        except OSError:
            pass
    return [pixels, size], unread
