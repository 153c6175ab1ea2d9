"""Fit and apply descriptor postprocessing (centering, PCA whitening) as upstream SSCD
evaluates it: fitted on descriptors from the target distribution, applied to every
descriptor that will be compared with them.

    sscd-postprocess fit --embeddings sample/ --method whiten --dims 512 --output pcaw.npz
    sscd-postprocess apply --embeddings embeddings/ --params pcaw.npz --output whitened/

`fit` reads any output of sscd-embed (a Parquet folder or an .npz) a shard at a time and
writes PARAMS.npz: `method`, `mean` [d_in], `matrix` [d_in, d_out] and `provenance`
(samples, source, the model that produced them). Whitening is faiss's
`PCAW<d>,L2norm` (PCAMatrix with eigen_power -0.5, then L2); centering subtracts the
mean and re-normalises. `apply` writes the transformed descriptors in the same forms
sscd-embed writes (a folder is written one shard at a time), recording the
postprocessing in every file's metadata. The same params can be served:
`build_repository.py --postprocess PARAMS.npz` appends the transform to the served graph.
Exit status: 0 ok, 2 bad input (one line, no traceback).
The library is sscd_triton.copydetect.postprocess.
"""
from __future__ import annotations

import argparse
import sys

from sscd_triton.cli._help import DefaultsHelpFormatter
from sscd_triton.cli._main import command


def parse_args(argv=None) -> argparse.Namespace:
    from sscd_triton.copydetect.postprocess import METHODS

    p = argparse.ArgumentParser(prog=command("client/postprocess.py"),
                                description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit centering or whitening on sample descriptors",
                       formatter_class=DefaultsHelpFormatter,
                       description="Fit on descriptors from the target distribution (never on "
                       "the queries or references being scored).")
    f.add_argument("--embeddings", required=True, metavar="SAMPLE",
                   help="an sscd-embed output (Parquet folder or .npz) of training descriptors")
    f.add_argument("--method", required=True, choices=METHODS,
                   help="center: subtract the mean, re-L2; whiten: PCA whitening (PCAW<d>,L2norm)")
    f.add_argument("--dims", type=int, help="whiten: output dims (default: the input's); "
                   "needs more samples than dims")
    f.add_argument("--output", required=True, metavar="PARAMS.npz", help="params file to write")
    a = sub.add_parser("apply", help="write postprocessed descriptors",
                       formatter_class=DefaultsHelpFormatter,
                       description="Apply fitted params to every descriptor of an output.")
    a.add_argument("--embeddings", required=True, metavar="IN",
                   help="an sscd-embed output (Parquet folder or .npz)")
    a.add_argument("--params", required=True, metavar="PARAMS.npz", help="from `fit`")
    a.add_argument("--output", required=True, metavar="OUT",
                   help="OUT.npz, or a new folder for Parquet shards (as sscd-embed writes)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sscd_triton.copydetect import postprocess as pp
    from sscd_triton.files import OutputError, check_writable

    try:
        if args.command == "fit":
            if not args.output.lower().endswith(".npz"):
                raise pp.PostprocessError(f"--output {args.output}: give a file name ending in .npz")
            check_writable(args.output, "--output", "params.npz")
            params = pp.fit_embeddings(args.embeddings, args.method, args.dims)
            pp.save_params(args.output, params)
            print(f"fitted {params.describe()} -> {args.output} "
                  f"(sha256 {params.sha256()[:12]}...)")
        else:
            params = pp.load_params(args.params)
            n = pp.apply_embeddings(args.embeddings, params, args.output)
            print(f"applied {params.describe()} to {n} descriptors -> {args.output}")
    except (pp.PostprocessError, OutputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
