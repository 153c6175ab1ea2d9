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
from sscd_triton.copydetect import api, search
from sscd_triton.copydetect.dedup import KEEP
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














def write_outputs(dups, pairs: str | None, groups: str | None, to_stdout: bool) -> None:
    """The pairs and groups tables of `dups` as CSV/Parquet files (or the pairs on stdout)."""
    p = dups.pairs.to_pydict()
    ids_a, ids_b = np.array(p["id_a"], dtype=object), np.array(p["id_b"], dtype=object)
    scores = dups.pairs.column("score").to_numpy()
    if to_stdout:
        text_writer(lambda w: (w.writerow(["id_a", "id_b", "score"]),
                               w.writerows(zip(ids_a, ids_b, score_text(scores)))))(
            sys.stdout.buffer)
        sys.stdout.flush()
    if pairs:
        write_table(pairs, {"id_a": ids_a, "id_b": ids_b, "score": scores})
    if groups:
        g = dups.groups.to_pydict()
        write_table(groups, {"group_id": np.array(g["group_id"], np.int64),
                             "id": np.array(g["id"], dtype=object),
                             "representative": np.array(g["representative"], dtype=object),
                             "group_size": np.array(g["group_size"], np.int64)})


def summary(args, dups, seconds: float) -> list[str]:
    """The lines every run ends with (both modes)."""
    g = dups.groups
    in_groups = len(g)
    n_groups = dups.n_groups
    largest = max(g.column("group_size").to_pylist()) if in_groups else 0
    lines = [f"{dups.items} items ({dups.stats['dims']}-d), k={args.k}, {index_line(dups.stats)}"
             + (f", score normalisation {args.score_norm} against {args.background}"
                if args.background else ""),
             f"{plural(len(dups.pairs), 'near-duplicate pair')} scoring >= {dups.threshold}; "
             f"{plural(n_groups, 'group')} holding {plural(in_groups, 'item')} (largest "
             f"{largest}); keeping one per group removes {plural(in_groups - n_groups, 'item')} "
             f"({seconds:.1f} s)"]
    if n_groups:
        cannot = (f"; {dups.unread} of {in_groups} members' files could not be read (counted "
                  "as 0)" if dups.unread else "")
        lines.append(f"representatives (--keep {args.keep}): {KEEP[args.keep]}, ties to the "
                     f"first in collection order{cannot}")
    return lines


def find(args, collection, log):
    """`api.dedup` with the command line's options."""
    background = None
    if args.background:
        _, background = search.Embeddings.open(args.background,
                                               f"--background {args.background}").load()
    threshold = COPY_THRESHOLD if args.threshold is None else args.threshold
    return api.dedup(collection, threshold, args.k, args.keep, background=background,
                     score_norm=args.score_norm, index=args.index,
                     query_block=args.query_block, reference_block=args.reference_block,
                     nlist=args.nlist, nprobe=args.nprobe, ef_search=args.ef_search,
                     recall_sample=args.recall_sample, log=log)


def run(args) -> int:
    log = logger(args, "dedup")
    for flag, path in (("--pairs", args.pairs), ("--groups", args.groups)):
        if path:
            check_writable(path, flag, "groups.parquet" if flag == "--groups" else "pairs.csv")
    collection = search.Embeddings.open(args.embeddings, f"--embeddings {args.embeddings}")
    t0 = time.perf_counter()
    dups = find(args, collection, log)
    # with no output named, the pairs are the output: CSV on stdout, the summary aside
    to_stdout = not args.pairs and not args.groups
    say = (lambda m: print(m, file=sys.stderr)) if to_stdout else print
    write_outputs(dups, args.pairs, args.groups, to_stdout)
    for line in summary(args, dups, time.perf_counter() - t0):
        say(line)
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
