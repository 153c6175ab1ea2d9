#!/usr/bin/env python3
"""Find the references each query copies: the k nearest references by inner product.

    python client/match.py --queries runs/queries --references runs/refs --output matches.csv
    python client/match.py --queries q.npz --references runs/refs --background runs/train \\
        --score-norm '1.0[0,2]' --k 10 --output matches.csv
    python client/match.py --queries q.npz --references runs/big --index hnsw --threshold 0.75 --output copies.csv

--queries, --references, --background: any output of embed.py (a Parquet folder or an
.npz; see `sscd_triton.load_embeddings`), all of the same width. Output: CSV
`query_id,reference_id,score`, each query's matches best first (score descending, then
reference order), written atomically. DISC ground-truth files are
`query_id,reference_id`; evaluate.py reads both.

Scores are inner products of the L2-normalised descriptors (= cosine). Threshold: by
default every query keeps its k matches (what evaluate.py needs: uAP counts the low
scores too). To decide "copy or not", use --threshold: upstream SSCD gives cosine 0.75 as
about 90% precision for sscd_disc_mixup on DISC2021 without postprocessing. Score
normalisation and PCA whitening shift the scores, so calibrate a threshold for them on
your own ground truth with evaluate.py (threshold@P90).

--score-norm (with --background B, e.g. descriptors of training images from the target
distribution, never the queries or references): upstream's score normalisation
`BETA[FIRST,LAST]`: score = q.r - BETA * mean(top-(FIRST..LAST) of q.B). It changes the
global ranking (uAP, recall@P90) and the thresholds, never a query's own ranking.
The background set is held in RAM.

Memory: exact search (the default) streams: a block of queries at a time against every
reference shard in turn, keeping only the running top-k, so neither the references nor
all queries need to fit in RAM (references are re-read once per --query-block queries).
--index ivf|hnsw builds an approximate faiss index (IndexIVFFlat with about sqrt(N)
lists and --nprobe; IndexHNSWFlat M=32 with --ef-search) for reference sets too large to
search exactly in time; it holds every reference vector in RAM, and its recall@k
against exact search on --recall-sample queries is printed.

Exit status: 0 done; 2 bad input (a missing file, an empty set, mismatched dimensions,
an unwritable output: one line, nothing written); 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from sscd_triton.cli._help import DefaultsHelpFormatter
from sscd_triton.copydetect import search
# 0.75: upstream, cosine > 0.75 = copy at ~90% precision (sscd_disc_mixup, DISC)
from sscd_triton.copydetect.api import COPY_THRESHOLD, check_threshold
from sscd_triton.copydetect.postprocess import ScoreNorm
from sscd_triton.copydetect.tables import score_text, text_writer
from sscd_triton.files import OutputError, check_writable, write_atomic
from sscd_triton import spec
from sscd_triton.cli._main import command, plural, run_main
from sscd_triton.client.io import recorded_model

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130


class _Formatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """The description and epilog as written; every option's default shown."""


def parser_for(doc: str, script: str) -> argparse.ArgumentParser:
    """The parser of the command `script` (e.g. "client/match.py"), named as it was called."""
    parts = doc.split("\n\n")
    return argparse.ArgumentParser(prog=command(script), description=parts[0],
                                   formatter_class=_Formatter, epilog="\n\n".join(parts[1:]))


def demo_notes(named: tuple[tuple[str, str], ...]) -> list[str]:
    """A note for each (flag, embeddings path) whose descriptors come from demo weights."""
    return [f"note: {flag} {path} holds descriptors of {spec.DEMO_NOTE}"
            for flag, path in named if recorded_model(path) == spec.DEMO_MODEL_NAME]


def add_search_arguments(p: argparse.ArgumentParser, k: int) -> None:
    """The engine's options, shared by match.py and dedup.py."""
    p.add_argument("--k", type=int, default=k, help="neighbours kept per query")
    p.add_argument("--background", metavar="EMBEDDINGS",
                   help="background descriptors for --score-norm (held in RAM)")
    p.add_argument("--score-norm", default="1.0[0,2]", metavar="BETA[FIRST,LAST]",
                   help="score normalisation against --background (upstream's format; "
                        "used only with --background)")
    p.add_argument("--index", choices=search.INDEXES, default="exact",
                   help="exact (streamed, memory-bounded) or an approximate faiss index "
                        "over all references in RAM, its recall against exact printed")
    p.add_argument("--nlist", type=int, default=None,
                   help="ivf: inverted lists (about sqrt(N) when not given)")
    p.add_argument("--nprobe", type=int, default=search.DEFAULT_NPROBE,
                   help="ivf: lists searched per query")
    p.add_argument("--ef-search", type=int, default=search.DEFAULT_EF_SEARCH,
                   help="hnsw: search breadth (efSearch)")
    p.add_argument("--recall-sample", type=int, default=search.DEFAULT_RECALL_SAMPLE,
                   help="ivf/hnsw: queries searched exactly too, to measure recall (0: skip)")
    p.add_argument("--query-block", type=int, default=search.DEFAULT_QUERY_BLOCK,
                   help="queries searched together (memory: block x d floats; the "
                        "references are read once per block)")
    p.add_argument("--reference-block", type=int, default=search.DEFAULT_REFERENCE_BLOCK,
                   help="at most this many reference rows in memory at once (exact)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def search_problems(args) -> list[str]:
    out = []
    for name in ("k", "query_block", "reference_block", "nprobe", "ef_search"):
        if getattr(args, name) < 1:
            out.append(f"--{name.replace('_', '-')} must be at least 1")
    if args.nlist is not None and args.nlist < 1:
        out.append("--nlist must be at least 1")
    if args.recall_sample < 0:
        out.append("--recall-sample must be 0 or more")
    try:
        ScoreNorm.parse(args.score_norm)
    except ValueError as e:
        out.append(str(e))
    try:
        check_threshold(args.threshold, "--threshold", cosine=not args.background)
    except search.SearchInputError as e:
        out.append(str(e))
    if args.background and not os.path.exists(args.background):
        out.append(f"--background {args.background}: no such file or folder")
    return out


def logger(args, prefix: str):
    if args.quiet:
        return lambda m: None
    return lambda m: print(f"[{prefix}] {m}", file=sys.stderr, flush=True)


def run_search(args, queries: search.Embeddings, references: search.Embeddings,
               exclude_self: bool = False, log=lambda m: None) -> search.Result:
    """The engine with the command line's options (SearchInputError on bad input)."""
    background = None
    if args.background:
        _, background = search.Embeddings.open(args.background, f"--background {args.background}").load()
    return search.topk(queries, references, args.k, index=args.index, background=background,
                       score_norm=ScoreNorm.parse(args.score_norm),
                       query_block=args.query_block, reference_block=args.reference_block,
                       nlist=args.nlist, nprobe=args.nprobe, ef_search=args.ef_search,
                       recall_sample=args.recall_sample, exclude_self=exclude_self, log=log)


def index_line(stats: dict) -> str:
    """How the search was done, for the summary."""
    if stats["index"] == "exact":
        return "exact search"
    knobs = (f"nlist {stats['nlist']}, nprobe {stats['nprobe']}" if stats["index"] == "ivf"
             else f"efSearch {stats['ef_search']}")
    line = f"{stats['index']} index ({knobs})"
    if "recall" in stats:
        line += (f", recall@{stats['recall_k']} against exact search {stats['recall']:.4f} "
                 f"on {stats['recall_queries']} queries")
    return line






def parse_args(argv=None) -> argparse.Namespace:
    p = parser_for(__doc__, "client/match.py")
    p.add_argument("--queries", required=True, metavar="EMBEDDINGS",
                   help="query descriptors (embed.py output: folder or .npz)")
    p.add_argument("--references", required=True, metavar="EMBEDDINGS",
                   help="reference descriptors (embed.py output: folder or .npz)")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"keep only pairs scoring at least this (default: all k; "
                        f"{COPY_THRESHOLD} = upstream's ~90%% precision for raw cosine)")
    p.add_argument("--output", required=True, metavar="CSV",
                   help="query_id,reference_id,score")
    add_search_arguments(p, search.DEFAULT_K)
    return p.parse_args(argv)


def run(args) -> int:
    log = logger(args, "match")
    check_writable(args.output, "--output", "matches.csv")
    queries = search.Embeddings.open(args.queries, f"--queries {args.queries}")
    references = search.Embeddings.open(args.references, f"--references {args.references}")
    t0 = time.perf_counter()
    result = run_search(args, queries, references, log=log)
    counts = {"pairs": 0, "queries": 0, "matched": 0}

    def rows(w):
        w.writerow(["query_id", "reference_id", "score"])
        for block in result.blocks:
            qpos, rpos, scores = search.pairs(block, args.threshold)
            q_ids = block.query_ids[qpos - block.query_offset]
            r_ids = result.reference_ids[rpos]
            w.writerows(zip(q_ids, r_ids, score_text(scores)))
            counts["pairs"] += len(qpos)
            counts["queries"] += len(block.query_ids)
            counts["matched"] += len(np.unique(qpos))

    write_atomic(args.output, text_writer(rows))
    st = result.stats
    print(f"{plural(counts['queries'], 'query', 'queries')} x "
          f"{plural(st['references'], 'reference')} ({st['dims']}-d), k={args.k}, "
          f"{index_line(st)}"
          + (f", score normalisation {args.score_norm} against {args.background}"
             if args.background else ""))
    kept = (f"scoring >= {args.threshold}: {plural(counts['matched'], 'query', 'queries')} "
            "with a match"
            if args.threshold is not None else "(no threshold: every query's k best)")
    print(f"{plural(counts['pairs'], 'pair')} {kept}; written to {args.output} "
          f"({time.perf_counter() - t0:.1f} s)")
    for note in demo_notes((("--queries", args.queries), ("--references", args.references))):
        print(note)
    return EXIT_OK


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(search_problems(args), lambda: run(args), (search.SearchInputError, OutputError))


if __name__ == "__main__":
    sys.exit(main())
