#!/usr/bin/env python3
"""Score copy-detection matches against ground truth: uAP, acc@1, recall@P90.

    python client/evaluate.py --matches matches.csv --ground-truth gt.csv
    python client/evaluate.py --matches matches.csv --ground-truth dev_ground_truth.csv \\
        --stem-ids --json metrics.json --plot pr.png

--matches: CSV `query_id,reference_id,score` (match.py's output; any other columns are
ignored). --ground-truth: CSV `query_id,reference_id` (the DISC 2021 files; rows with an
empty reference_id, DISC's queries without a copy, are skipped).

Definitions (DISC 2021, see sscd_triton/copydetect/metrics.py): predictions sorted by score
descending, negatives first at equal scores (pessimistic); recall counts every
ground-truth pair, so pairs never retrieved are misses; uAP = sum of precision x recall
step; recall@P90 = the largest recall at precision >= 0.9, threshold@P90 its score
(keep pairs scoring >= it); acc@1 = the fraction of ground-truth pairs whose reference is
the query's unique top prediction (a tie at the top counts against). Predictions for
queries without ground truth are false positives.

--stem-ids compares ids by file stem (`/data/queries/Q00042.jpg` -> `Q00042`), for
matches of embed.py outputs (ids are paths) against DISC files (ids are image names).

Exit status: 0 done; 2 bad input (a missing file, a missing column, a score that is not
a number, empty ground truth, a pair predicted twice: one line, nothing written).
"""
from __future__ import annotations

import csv
import json
import os
import sys

from sscd_triton.cli.match import EXIT_OK, EXIT_USAGE, parser_for
from sscd_triton.copydetect import metrics
from sscd_triton.files import OutputError, check_writable, write_atomic


class InputError(ValueError):
    pass


def parse_args(argv=None):
    p = parser_for(__doc__, "client/evaluate.py")
    p.add_argument("--matches", required=True, metavar="CSV",
                   help="predictions: query_id,reference_id,score")
    p.add_argument("--ground-truth", required=True, metavar="CSV",
                   help="query_id,reference_id")
    p.add_argument("--stem-ids", action="store_true",
                   help="compare ids by file stem (paths against DISC image names)")
    p.add_argument("--json", metavar="OUT",
                   help="write uAP, acc@1, recall@P90, threshold@P90 (and counts)")
    p.add_argument("--plot", metavar="PNG", help="draw the precision-recall curve")
    return p.parse_args(argv)


def stem(id_: str) -> str:
    return os.path.splitext(os.path.basename(id_))[0]


def read_csv(path: str, flag: str, columns: tuple[str, ...]):
    """Rows of `columns` (a list per column) from a headed CSV; InputError when it
    cannot be read or lacks a column."""
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such file")
    out = [[] for _ in columns]
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in columns if c not in header]
            if missing:
                raise InputError(f"{flag} {path}: no column {', '.join(missing)} (header: "
                                 f"{','.join(header) or 'none'}; expected "
                                 f"{','.join(columns)})")
            where = [header.index(c) for c in columns]
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    for col, i in zip(out, where):
                        col.append(row[i].strip())
                except IndexError:
                    raise InputError(f"{flag} {path} line {line}: {len(row)} fields, "
                                     f"expected {len(header)}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{flag} {path}: not UTF-8 text ({e})") from None
    return out


def load(args):
    q, r, s = read_csv(args.matches, "--matches", ("query_id", "reference_id", "score"))
    scores = []
    for line, text in enumerate(s, start=2):
        try:
            scores.append(float(text))
        except ValueError:
            raise InputError(f"--matches {args.matches} line {line}: score {text!r} is not "
                             f"a number") from None
    gq, gr = read_csv(args.ground_truth, "--ground-truth", ("query_id", "reference_id"))
    truth = [(a, b) for a, b in zip(gq, gr) if a and b]
    if args.stem_ids:
        q, r = [stem(x) for x in q], [stem(x) for x in r]
        truth = [(stem(a), stem(b)) for a, b in truth]
    if not truth:
        raise InputError(f"--ground-truth {args.ground_truth}: no (query, reference) pairs")
    return q, r, scores, truth


def run(args) -> int:
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable(path, flag, "metrics.json" if flag == "--json" else "pr.png")
    q, r, scores, truth = load(args)
    try:
        m = metrics.evaluate(q, r, scores, truth)
    except ValueError as e:
        raise InputError(f"--matches {args.matches}: {e}") from None
    summary = m.summary()
    at = (f" at score >= {m.threshold_p90:.6g}" if m.threshold_p90 is not None
          else " (precision never reaches 0.9)")
    print(f"uAP {m.uap:.4f}  acc@1 {m.acc1:.4f}  recall@P90 {m.recall_p90:.4f}{at}")
    queries = len({a for a, _ in truth})
    print(f"{m.predictions} predictions; {m.ground_truth} ground-truth pairs ({queries} "
          f"queries), {m.true_positives} of them retrieved, "
          f"{m.ground_truth - m.true_positives} never retrieved (counted as misses)")
    if args.json:
        write_atomic(args.json, json.dumps(summary, indent=2) + "\n")
        print(f"metrics: {args.json}")
    if args.plot:
        metrics.plot_pr(m, args.plot, title=os.path.basename(args.matches))
        print(f"precision-recall curve: {args.plot}")
    return EXIT_OK


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (InputError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
