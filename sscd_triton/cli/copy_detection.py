"""End-to-end copy detection on real photographs: served descriptors against PyTorch.

    python benchmarks/copy_detection.py                      # demo weights, local cpu server
    python benchmarks/copy_detection.py --checkpoint sscd_disc_mixup.torchvision.pt
    python benchmarks/copy_detection.py --repository runs/model_repository --json out.json

The 16 photographs shipped with the package (sscd_triton.samples) are split in two:
the 8 at even positions are the *originals*, the 8 at odd positions are *distractors*.
The reference set is all 16 (their shipped JPEG bytes, unchanged). Each original gets
8 edited copies (the queries, 64): JPEG quality 30, 70% centre crop, half-size resize,
grayscale, horizontal flip, Gaussian blur (radius 2), overlaid text, and a combination
(80% crop + flip + text + JPEG 40). A query's only ground-truth reference is the
original it was made from; distractors are different photographs, never edited, so any
match to one is a false positive.

Queries and references are embedded twice from the same encoded bytes: through the
Triton `sscd` ensemble (a cpu repository built here from the checkpoint, or
`--repository`), and by upstream's pipeline (PIL, torchvision transforms, the PyTorch
model). Both are searched (exact inner product, top-k) and scored with the DISC
metrics (uAP, acc@1, recall@P90), and dedup groups (pairs scoring >= the threshold,
connected components) are found over references + queries.

With the untrained demo weights the absolute numbers mean nothing; the served-minus-
reference difference is the figure that matters (the cpu path is bit-exact up to float
rounding). With a real checkpoint the absolute numbers are your own accuracy check.
Exit status: 0; 1 when |served - reference| on a metric exceeds --bound; 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from sscd_triton import spec
from sscd_triton.cli._help import DefaultsHelpFormatter
from sscd_triton.copydetect.copyset import EDITS, METRICS, dataset, evaluate

DEFAULT_BOUND = 0.02
DEFAULT_THRESHOLD = 0.75


# --- dedup groups ----------------------------------------------------------------------

def dedup_groups(ids, vecs, source: dict, threshold: float, k: int) -> dict:
    """Groups of items (references + queries) linked by pairs scoring >= threshold."""
    from sscd_triton.copydetect.dedup import connected_groups, near_duplicate_pairs
    from sscd_triton.copydetect import search

    ids = list(ids)
    emb = search.Embeddings.from_arrays(ids, vecs, "all")
    result = search.topk(emb, emb, k=min(k, len(ids) - 1), exclude_self=True)
    a, b, _ = near_duplicate_pairs(result, threshold)
    labels = connected_groups(len(ids), a, b)
    groups = {}
    for pos, lab in enumerate(labels.tolist()):
        if lab >= 0:
            groups.setdefault(lab, []).append(ids[pos])
    members = sorted(groups.values(), key=lambda g: (-len(g), g[0]))
    pure = sum(1 for g in members if len({source[m] for m in g}) == 1)
    return {"threshold": threshold, "pairs": int(len(a)), "groups": len(members),
            "grouped_items": sum(len(g) for g in members), "items": len(ids),
            "pure_groups": pure, "mixed_groups": len(members) - pure,
            "members": members}


# --- the two paths ----------------------------------------------------------------------

def served_descriptors(url: str, encoded: list[bytes]) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    from sscd_triton.cli.serve_check import infer_ensemble

    client = grpcclient.InferenceServerClient(url)
    try:
        return infer_ensemble(client, encoded)
    finally:
        client.close()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="an SSCD checkpoint (any published layout); "
                   "default: the untrained demo weights")
    p.add_argument("--repository", help="serve this cpu model repository (built from "
                   "--checkpoint) instead of building one in a temporary folder")
    p.add_argument("--k", type=int, default=10, help="predictions per query")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="dedup: cosine at or above which two items are duplicates")
    p.add_argument("--bound", type=float, default=DEFAULT_BOUND,
                   help="largest |served - reference| allowed on any metric")
    p.add_argument("--edits", default=",".join(EDITS),
                   help="comma-separated edits to make queries with (a subset is faster)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    return p.parse_args(argv)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.k < 1 or not -1.0 <= args.threshold <= 1.0 or args.bound < 0:
        print("error: --k must be >= 1, --threshold in [-1, 1], --bound >= 0", file=sys.stderr)
        return 2
    edits = [e for e in args.edits.split(",") if e]
    unknown = sorted(set(edits) - set(EDITS))
    if unknown or not edits:
        print(f"error: --edits: unknown {', '.join(unknown) or '(none given)'}; choose from "
              f"{', '.join(EDITS)}", file=sys.stderr)
        return 2
    if args.repository and not os.path.isfile(os.path.join(args.repository, spec.ENSEMBLE_NAME,
                                                           "config.pbtxt")):
        print(f"error: {args.repository} holds no '{spec.ENSEMBLE_NAME}' ensemble; build one "
              "with export/build_repository.py --target cpu", file=sys.stderr)
        return 2
    from sscd_triton.cli.serve_check import reference_descriptors, served_preprocess
    from sscd_triton.export import checkpoints, demo
    from sscd_triton.serving.server import TritonServer

    t0 = time.perf_counter()
    source = args.checkpoint or demo.write_demo_checkpoint()
    try:
        loaded = checkpoints.load(source)
    except (checkpoints.CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    label = demo.DEMO_LABEL if args.checkpoint is None else source
    print(f"weights: {label}")
    data = dataset(edits)
    refs, queries = data["references"], data["queries"]
    print(f"data: {len(refs)} references ({len(data['originals'])} originals + "
          f"{len(data['distractors'])} distractors), {len(queries)} queries "
          f"({len(edits)} edits x {len(data['originals'])} originals: {', '.join(edits)})")
    encoded = [b for _, b in refs] + [b for _, b in queries]

    with tempfile.TemporaryDirectory(prefix="sscd-copy-detection-") as tmp:
        repo = args.repository
        if repo is None:
            from sscd_triton.serving.build import BuildError, build_repository

            repo = os.path.join(tmp, "model_repository")
            print(f"building a cpu model repository from {source} ...")
            try:
                built = build_repository(repo, target="cpu", checkpoint=source)
            except BuildError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            if not built.passed:
                print("error: the built repository failed its parity checks", file=sys.stderr)
                return 1
        preprocess = served_preprocess(repo)
        with TritonServer(repo, log_path=os.path.join(tmp, "tritonserver.log")) as server:
            print(f"tritonserver ready on {server.grpc_url}; embedding {len(encoded)} images "
                  f"through '{spec.ENSEMBLE_NAME}' ({preprocess.upstream_name})")
            served = served_descriptors(server.grpc_url, encoded)
    print(f"embedding {len(encoded)} images with PyTorch (upstream pipeline)")
    reference = reference_descriptors(loaded.model, encoded, preprocess)

    r_ids = [i for i, _ in refs]
    q_ids = [i for i, _ in queries]
    n = len(refs)
    k = min(args.k, n)
    out = {"weights": label, "checkpoint": source, "preprocess": preprocess.name,
           "references": r_ids, "originals": data["originals"],
           "distractors": data["distractors"], "queries": len(q_ids), "edits": edits,
           "k": k, "bound": args.bound,
           "descriptor_max_abs_diff": float(np.abs(served - reference).max()),
           "descriptor_min_cosine": float(np.min(np.sum(served * reference, axis=1))),
           "paths": {}, "dedup": {}}
    for name, vecs in (("served", served), ("reference", reference)):
        m = evaluate(q_ids, vecs[n:], r_ids, vecs[:n], data["ground_truth"], k)
        out["paths"][name] = m.summary()
        out["dedup"][name] = dedup_groups(r_ids + q_ids, vecs, data["source"],
                                          args.threshold, args.k)
    s, r = out["paths"]["served"], out["paths"]["reference"]
    out["difference"] = {key: s[key] - r[key] for key in METRICS}
    worst = max(abs(v) for v in out["difference"].values())
    out["passed"] = worst <= args.bound
    out["seconds"] = time.perf_counter() - t0

    cols = ("path", *METRICS, "threshold@P90")
    rows = [(name, *(_fmt(out["paths"][name][c]) for c in cols[1:])) for name in
            ("reference", "served")]
    rows.append(("served - reference", *(f"{out['difference'][c]:+.4f}" for c in METRICS), ""))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print()
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))
    print(f"({s['ground_truth_pairs']} ground-truth pairs, {s['predictions']} predictions: "
          f"top-{k} of {n} references per query; descriptors served vs PyTorch: max |diff| "
          f"{out['descriptor_max_abs_diff']:.2e}, min cosine {out['descriptor_min_cosine']:.6f})")
    print()
    for name in ("reference", "served"):
        d = out["dedup"][name]
        print(f"dedup {name}: {d['groups']} groups of {d['grouped_items']}/{d['items']} items "
              f"at cosine >= {d['threshold']} ({d['pairs']} pairs; {d['pure_groups']} groups "
              f"from one photograph, {d['mixed_groups']} mixing photographs)")
    for g in out["dedup"]["served"]["members"][:10]:
        shown = ", ".join(g[:6]) + (f", ... (+{len(g) - 6})" if len(g) > 6 else "")
        print(f"  [{len(g)}] {shown}")
    if args.checkpoint is None:
        print("\nnote: untrained demo weights: the absolute numbers are meaningless (random "
              "descriptors are all alike, so dedup merges nearly everything); the served - "
              "reference row is what this checks.")
    verdict = "PASS" if out["passed"] else "FAIL"
    print(f"{verdict}: largest |served - reference| {worst:.4f} (bound {args.bound}); "
          f"{out['seconds']:.0f} s")
    if args.json:
        from sscd_triton.files import write_atomic

        write_atomic(args.json, json.dumps(out, indent=2) + "\n")
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
