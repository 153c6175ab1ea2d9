#!/usr/bin/env python3
"""Print the near-duplicate groups of an sscd-embed output (a folder or an .npz).

    python examples/find_copies.py runs/photos --threshold 0.75
"""
import argparse

import pyarrow.compute as pc

import sscd_triton


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("embeddings", help="sscd-embed --output (folder or .npz)")
    p.add_argument("--threshold", type=float, default=0.75, help="cosine of a copy")
    args = p.parse_args()

    dups = sscd_triton.dedup(args.embeddings, threshold=args.threshold, keep="first")
    print(f"{dups.items} images, {dups.pairs.num_rows} pairs, {dups.n_groups} group(s) "
          f"at cosine >= {args.threshold}")
    # each group's members, the representative (kept) first
    for row in dups.groups.to_pylist():
        if row["id"] == row["representative"]:
            print(f"group {row['group_id']} ({row['group_size']} images): keep {row['id']}")
    for row in dups.groups.to_pylist():
        if row["id"] != row["representative"]:
            print(f"  group {row['group_id']}: copy {row['id']}")

    # the collection as its own queries: each image's best match other than itself
    copies = sscd_triton.find_copies(args.embeddings, args.embeddings, k=2)
    others = copies.filter(pc.not_equal(copies["query_id"], copies["reference_id"]))
    seen = set()
    for row in others.to_pylist():  # each query's rows best first: keep its first
        if row["query_id"] not in seen:
            seen.add(row["query_id"])
            print(f"best match of {row['query_id']}: {row['reference_id']} ({row['score']:.3f})")

if __name__ == "__main__":
    main()
