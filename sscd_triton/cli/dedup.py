#!/usr/bin/env python3
"""Find every group of near-duplicates in one collection.

    python client/dedup.py photos/ --output runs/photos-dedup          # images: one command
    python client/dedup.py photos/ 'more/*.jpg' --url 127.0.0.1:8001 --checkpoint ... --output OUT
    python client/dedup.py --embeddings runs/photos --groups groups.parquet --pairs pairs.csv
    python client/dedup.py --embeddings photos.npz --threshold 0.8 --groups groups.csv

From images (INPUT ... --output OUT): INPUT as embed.py takes them (files, folders,
glob patterns, @list files, - for stdin). The images are embedded into OUT (embed.py's
folder layout: OUT/manifest.json, OUT/embeddings/, OUT/failures/; `load_embeddings(OUT)`
reads it, rerunning the same command resumes it, and a run with other INPUT adds them: the
results cover all of OUT), then OUT/pairs.csv,
OUT/groups.parquet and OUT/report.html are written: a self-contained page showing every
group's images side by side with their scores, largest groups first, the representative
marked, the model and threshold named (open it in any browser; no network needed). The
server: --url HOST:PORT of a running one, or else a local tritonserver started for the
job and stopped after, serving a cpu model repository built from --checkpoint (the
untrained demo weights without it: the groups then mean nothing) and kept under
runs/repositories/ (relative to the working folder), keyed by the checkpoint's sha256 and
the version of the code that builds it, so a rerun does not rebuild it.

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

Exit status: 0 done; 1 (from images) done, report written, but some inputs failed to
embed (reasons in the report and OUT/failures/); 2 bad input (a missing file, an empty
collection, an unwritable output, INPUT together with --embeddings: one line, nothing
written); 3 (from images) the server could not be reached, started or did not finish:
rerun the same command to resume; 130 interrupted (Ctrl-C or SIGTERM; a local server is
stopped too).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import numpy as np

from sscd_triton.cli.match import (COPY_THRESHOLD, EXIT_OK,
                                   add_search_arguments, demo_notes, index_line, logger,
                                   parser_for, search_problems)
from sscd_triton.copydetect import api, search
from sscd_triton.copydetect.dedup import KEEP
from sscd_triton.copydetect.tables import FORMATS, score_text, text_writer, write_table
from sscd_triton.client.exceptions import UsageError
from sscd_triton.files import OutputError, check_writable
from sscd_triton.cli._main import EXIT_INTERRUPTED, plural, run_main

DEFAULT_K = api.DEDUP_K
EXIT_FAILURES, EXIT_UNFINISHED = 1, 3
PAIRS, GROUPS, REPORT = "pairs.csv", "groups.parquet", "report.html"
SERVER_LOG = "tritonserver.log"


def parse_args(argv=None):
    p = parser_for(__doc__, "client/dedup.py")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="images: files, folders, glob patterns, @list files, - for stdin "
                        "(with --output; instead of --embeddings)")
    p.add_argument("--output", metavar="OUT",
                   help="with INPUT: the folder for the descriptors, pairs.csv, "
                        "groups.parquet and report.html")
    p.add_argument("--url", metavar="HOST:PORT",
                   help="with INPUT: a running Triton server's gRPC endpoint (when not "
                        "given: a local tritonserver is started for the job)")
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="with INPUT and no --url: the SSCD checkpoint the local server "
                        "serves (default: the untrained demo weights)")
    p.add_argument("--embeddings", metavar="EMBEDDINGS",
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
    return p.parse_intermixed_args(argv)  # INPUT before and after options, as embed.py


def problems_of(args) -> list[str]:
    if args.inputs and args.embeddings:
        return ["give INPUT ... (images) or --embeddings (descriptors), not both"]
    if not args.inputs and not args.embeddings:
        return ["give INPUT ... --output OUT (images) or --embeddings EMBEDDINGS (descriptors)"]
    out = search_problems(args)
    if args.inputs:
        out += image_problems(args)
    else:
        given = [f for f, v in (("--output", args.output), ("--url", args.url),
                                ("--checkpoint", args.checkpoint)) if v]
        if given:
            out.append(f"{', '.join(given)}: for INPUT ... (images); with --embeddings name "
                       "the outputs with --pairs and --groups")
    for flag, path in (("--pairs", args.pairs), ("--groups", args.groups)):
        if path and not path.lower().endswith(FORMATS):
            out.append(f"{flag} {path}: name it .csv or .parquet")
    if args.background and args.threshold is None:
        out.append("--background shifts the scores: give --threshold too (calibrate it "
                   "with evaluate.py's threshold@P90)")
    return out


def image_problems(args) -> list[str]:
    """Usage problems of the images form, found before anything starts."""
    from sscd_triton.client import sources

    out = []
    if not args.output:
        out.append("INPUT ... needs --output OUT (a folder: the descriptors, pairs.csv, "
                   "groups.parquet, report.html)")
    elif args.output.lower().endswith(".npz") or (os.path.exists(args.output)
                                                  and not os.path.isdir(args.output)):
        out.append(f"--output {args.output}: give a folder (the descriptors, pairs.csv, "
                   "groups.parquet and report.html go into it)")
    if args.pairs or args.groups:
        out.append(f"--pairs/--groups are for --embeddings; from images they are "
                   f"OUT/{PAIRS} and OUT/{GROUPS}")
    if args.url and args.checkpoint:
        out.append("--checkpoint is for the local server started without --url; a server "
                   "at --url serves its own model")
    if args.url and ("://" in args.url or ":" not in args.url):
        out.append(f"--url {args.url!r}: give HOST:PORT (the gRPC port), e.g. 127.0.0.1:8001")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        out.append(f"--checkpoint {args.checkpoint}: no such file")
    return out + sources.check_args(args.inputs)


def _embed(inputs: list[str], output: str, url: str, quiet: bool) -> int:
    """Embed `inputs` into the folder `output` through the server at `url` (resuming what
    is there), as sscd-embed does: its messages, its exit status (0, 1 some failed, 3, 130;
    a usage error raises UsageError)."""
    from sscd_triton.cli import embed
    from sscd_triton.client import job
    from sscd_triton.client.exceptions import Unfinished

    try:
        summary = job.run(inputs, output, job.Settings(urls=[url], quiet=quiet))
    except Unfinished as e:
        return embed.unfinished(e)
    embed.report(summary)
    return EXIT_FAILURES if summary.failed else EXIT_OK


def _say(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (timeout, systemd, Kubernetes) stops the job as Ctrl-C does: the local
    server, in a session of its own, is stopped on the way out instead of left running."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def embed_images(args) -> int:
    """Embed the INPUTs into --output through --url, or a local server started here."""
    if args.url:
        return _embed(args.inputs, args.output, args.url, args.quiet)
    from sscd_triton.serving import local
    from sscd_triton.serving.build import BuildError
    from sscd_triton.serving.server import TritonServerError

    log = os.path.join(args.output, SERVER_LOG)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_interrupts())
        try:
            url = stack.enter_context(local.serving(args.checkpoint, log, _say))
        except KeyboardInterrupt:
            print("interrupted while the local tritonserver was starting: nothing was "
                  "embedded; rerun the same command", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BuildError as e:
            raise OutputError(f"--checkpoint: {e}" if args.checkpoint else str(e)) from None
        except (TritonServerError, OSError) as e:
            print(f"error: could not start the local tritonserver: "
                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (log: {log})",
                  file=sys.stderr)
            return EXIT_UNFINISHED
        return _embed(args.inputs, args.output, url, args.quiet)


def run_images(args) -> int:
    """INPUT ... --output OUT: embed, find the groups, write the tables and report.html."""
    from sscd_triton.client import io
    from sscd_triton.copydetect import report

    out = args.output
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--output {out}: {e.strerror or e}") from None
    paths = {name: os.path.join(out, name) for name in (PAIRS, GROUPS, REPORT)}
    for path in paths.values():
        check_writable(path, "--output")
    status = embed_images(args)
    if status not in (EXIT_OK, EXIT_FAILURES):
        return status  # embed.py said why (usage, unreachable, interrupted)
    t0 = time.perf_counter()
    collection = search.Embeddings.open(out, out)
    if any(len(ids) for ids, _ in io.iter_shards(out)):
        dups = find(args, collection, logger(args, "dedup"))
    else:  # every input failed: an empty report still says why
        threshold = COPY_THRESHOLD if args.threshold is None else args.threshold
        dups = api.Duplicates.empty(threshold, args.k, args.keep,
                                    (io.read_manifest(out) or {}).get("dims"))
    write_outputs(dups, paths[PAIRS], paths[GROUPS], False)
    failures = io.load_failures(out)
    report.write_report(paths[REPORT], dups, io.read_manifest(out), failures, descriptors=out,
                        title="Near-duplicates in " + ", ".join(args.inputs[:3])
                        + (f" and {len(args.inputs) - 3} more" if len(args.inputs) > 3 else ""))
    for line in summary(args, dups, time.perf_counter() - t0):
        print(line)
    print(f"descriptors: {out}; pairs: {paths[PAIRS]}; groups: {paths[GROUPS]}")
    if failures:
        print(f"{plural(len(failures), 'input')} failed to embed (reasons in the report and "
              f"{os.path.join(out, io.FAILURE_SHARDS)}/): exit status {EXIT_FAILURES}")
    print(f"report: {paths[REPORT]}")
    return EXIT_FAILURES if failures else EXIT_OK


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
    go = run_images if args.inputs else run
    return run_main(problems_of(args), lambda: go(args),
                    (search.SearchInputError, OutputError, UsageError))


if __name__ == "__main__":
    sys.exit(main())
