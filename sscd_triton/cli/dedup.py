#!/usr/bin/env python3
"""Find every group of near-duplicates in one collection.

    python client/dedup.py --embeddings runs/photos --groups groups.parquet --pairs pairs.csv
    python client/dedup.py --embeddings photos.npz --threshold 0.8 --groups groups.csv

--embeddings: any output of embed.py (a Parquet folder or an .npz). The collection is
searched against itself with the engine of match.py (exact and streamed by default;
--index ivf|hnsw for very large collections, recall printed): each item's --k nearest
other items (itself excluded) scoring at least --threshold are its near-duplicate pairs,
and the connected components of those pairs are the groups.

--threshold defaults to 0.75, upstream SSCD's cosine for about 90% precision with
sscd_disc_mixup on DISC2021 (no postprocessing); raise it for exact re-encodes only,
lower it for heavier edits at the cost of false groups. With --background (score
normalisation) the scores shift: give --threshold explicitly (calibrate it with
evaluate.py's threshold@P90).

Outputs (each .csv or .parquet, by the name's extension; written atomically; with
neither, the pairs are printed as CSV on stdout and the summary goes to stderr):
  --pairs   id_a,id_b,score: every near-duplicate pair once, best first (with score
            normalisation, which is not symmetric, a pair's score is the larger of its
            two directions)
  --groups  group_id,id,representative,group_size: one row per item in a group of two or
            more (items with no near-duplicate are in no group); groups numbered from 0
            by size, largest first; rows in collection order. Keep the rows where
            id == representative to keep one per group.

--keep chooses each group's representative (the summary says which):
  largest     the largest resolution (width x height, read from the image header at the
              id's path), then the largest file, then most pairs (files that cannot be
              read, e.g. ids from another machine, count as 0 and are counted)
  most-pairs  the member with the most near-duplicate pairs in its group
  first       the first in collection order
  ties always go to the first in collection order.

Pairs come from each item's k nearest neighbours, so an item with more than k
near-duplicates lists only k of them; groups are still complete wherever those pairs
connect them (raise --k for dense groups).

Exit status: 0 done; 2 bad input (a missing file, an empty collection, an unwritable
output: one line, nothing written); 130 interrupted.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from sscd_triton.cli.match import (COPY_THRESHOLD, EXIT_OK,
                                   add_search_arguments, demo_notes, index_line, logger,
                                   parser_for, run_search, search_problems)
from sscd_triton.copydetect import search
from sscd_triton.copydetect.dedup import (KEEP, connected_groups, groups_table, largest_keys,
                                          near_duplicate_pairs, pair_counts)
from sscd_triton.copydetect.tables import FORMATS, score_text, text_writer, write_table
from sscd_triton.files import OutputError, check_writable
from sscd_triton.cli._main import plural, run_main

DEFAULT_K = 20


def parse_args(argv=None):
    p = parser_for(__doc__, "client/dedup.py")
    p.add_argument("--embeddings", required=True, metavar="EMBEDDINGS",
                   help="the collection (embed.py output: folder or .npz)")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"pairs scoring at least this are near-duplicates (default "
                        f"{COPY_THRESHOLD}; required with --background)")
    p.add_argument("--pairs", metavar="FILE", help="id_a,id_b,score (.csv or .parquet)")
    p.add_argument("--groups", metavar="FILE",
                   help="group_id,id,representative,group_size (.csv or .parquet)")
    p.add_argument("--keep", choices=list(KEEP), default="largest",
                   help="each group's representative (see above)")
    add_search_arguments(p, DEFAULT_K)
    return p.parse_args(argv)


def problems_of(args) -> list[str]:
    out = search_problems(args)
    for flag, path in (("--pairs", args.pairs), ("--groups", args.groups)):
        if path and not path.lower().endswith(FORMATS):
            out.append(f"{flag} {path}: name it .csv or .parquet")
    if args.background and args.threshold is None:
        out.append("--background shifts the scores: give --threshold too (calibrate it "
                   "with evaluate.py's threshold@P90)")
    return out














def run(args) -> int:
    log = logger(args, "dedup")
    threshold = COPY_THRESHOLD if args.threshold is None else args.threshold
    for flag, path in (("--pairs", args.pairs), ("--groups", args.groups)):
        if path:
            check_writable(path, flag, "groups.parquet" if flag == "--groups" else "pairs.csv")
    collection = search.Embeddings.open(args.embeddings, f"--embeddings {args.embeddings}")
    t0 = time.perf_counter()
    result = run_search(args, collection, collection, exclude_self=True, log=log)
    a, b, s = near_duplicate_pairs(result, threshold)
    ids = result.reference_ids
    n = len(ids)
    labels = connected_groups(n, a, b)
    prefer, unread = None, 0
    if args.keep == "largest":
        keys, unread = largest_keys(ids, np.nonzero(labels >= 0)[0])
        prefer = keys + [pair_counts(n, a, b)]
    elif args.keep == "first":
        prefer = []
    g = groups_table(labels, a, b, prefer)
    # with no output named, the pairs are the output: CSV on stdout, the summary aside
    to_stdout = not args.pairs and not args.groups
    say = (lambda m: print(m, file=sys.stderr)) if to_stdout else print
    if to_stdout:
        text_writer(lambda w: (w.writerow(["id_a", "id_b", "score"]),
                               w.writerows(zip(ids[a], ids[b], score_text(s)))))(
            sys.stdout.buffer)
        sys.stdout.flush()
    if args.pairs:
        write_table(args.pairs, {"id_a": ids[a], "id_b": ids[b], "score": s})
    if args.groups:
        write_table(args.groups, {"group_id": g["group_id"], "id": ids[g["member"]],
                                  "representative": ids[g["representative"]],
                                  "group_size": g["size"]})
    n_groups = int(g["group_id"].max()) + 1 if len(g["group_id"]) else 0
    in_groups = len(g["member"])
    largest = int(g["size"].max()) if in_groups else 0
    say(f"{n} items ({result.stats['dims']}-d), k={args.k}, {index_line(result.stats)}"
        + (f", score normalisation {args.score_norm} against {args.background}"
           if args.background else ""))
    say(f"{plural(len(a), 'near-duplicate pair')} scoring >= {threshold}; "
        f"{plural(n_groups, 'group')} holding {plural(in_groups, 'item')} (largest {largest}); "
        f"keeping one per group removes {plural(in_groups - n_groups, 'item')} "
        f"({time.perf_counter() - t0:.1f} s)")
    if n_groups:
        cannot = (f"; {unread} of {in_groups} members' files could not be read (counted as 0)"
                  if unread else "")
        say(f"representatives (--keep {args.keep}): {KEEP[args.keep]}, ties to the first in "
            f"collection order{cannot}")
    for flag, path in (("pairs", args.pairs), ("groups", args.groups)):
        if path:
            say(f"{flag}: {path}")
    for note in demo_notes((("--embeddings", args.embeddings),)):
        say(note)
    return EXIT_OK


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(problems_of(args), lambda: run(args), (search.SearchInputError, OutputError))


if __name__ == "__main__":
    sys.exit(main())
