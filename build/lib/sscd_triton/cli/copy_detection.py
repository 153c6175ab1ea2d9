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
model). Both are searched (faiss, exact inner product, top-k) and scored with the DISC
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

from sscd_triton import images, samples, spec
from sscd_triton.cli._help import DefaultsHelpFormatter

METRICS = ("uAP", "acc@1", "recall@P90")
DEFAULT_BOUND = 0.02
DEFAULT_THRESHOLD = 0.75


# --- the data set -----------------------------------------------------------------------

def _text(img, label: str = "COPY  (c) 2024  sscd"):
    from PIL import ImageDraw, ImageFont

    img = img.copy()
    w, h = img.size
    try:
        font = ImageFont.load_default(size=max(12, h // 9))
    except TypeError:  # Pillow < 10.1: the small bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    for i, y in enumerate((h // 10, h // 2, 4 * h // 5)):
        draw.text((w // 20, y), label, fill=(255, 255, 0) if i % 2 else (255, 0, 255),
                  font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return img


def _crop(img, frac: float):
    w, h = img.size
    cw, ch = round(w * frac), round(h * frac)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def _jpeg(img, quality: int = 90) -> bytes:
    return images.encode(img.convert("RGB") if img.mode not in ("RGB", "L") else img,
                         "JPEG", quality=quality)


def _edits():
    from PIL import Image, ImageFilter

    flip = Image.Transpose.FLIP_LEFT_RIGHT
    return {
        "jpeg30": lambda im: _jpeg(im, 30),
        "crop70": lambda im: _jpeg(_crop(im, 0.7)),
        "resize50": lambda im: _jpeg(im.resize((max(1, im.width // 2), max(1, im.height // 2)),
                                               Image.Resampling.BILINEAR)),
        "gray": lambda im: _jpeg(im.convert("L")),
        "hflip": lambda im: _jpeg(im.transpose(flip)),
        "blur2": lambda im: _jpeg(im.filter(ImageFilter.GaussianBlur(2))),
        "text": lambda im: _jpeg(_text(im)),
        "combo": lambda im: _jpeg(_text(_crop(im, 0.8).transpose(flip)), 40),
    }


EDITS = ("jpeg30", "crop70", "resize50", "gray", "hflip", "blur2", "text", "combo")


def dataset(edits=EDITS) -> dict:
    """`{"references": [(id, bytes)], "queries": [(id, bytes)], "ground_truth": {(q, r)},
    "originals": [...], "distractors": [...], "source": {id: photograph}}`."""
    table = _edits()
    photos = samples.photographs()
    originals = [name for name, _ in photos[0::2]]
    distractors = [name for name, _ in photos[1::2]]
    refs, source = [], {}
    for path in samples.photograph_paths():  # the shipped bytes, as a user would hold them
        name = os.path.basename(path)
        with open(path, "rb") as f:
            refs.append((name, f.read()))
        source[name] = name
    queries, gt = [], set()
    for name, img in photos[0::2]:
        for edit in edits:
            qid = f"{os.path.splitext(name)[0]}.{edit}.jpg"
            queries.append((qid, table[edit](img)))
            gt.add((qid, name))
            source[qid] = name
    return {"references": refs, "queries": queries, "ground_truth": gt,
            "originals": originals, "distractors": distractors, "source": source}


# --- search, metrics, groups ------------------------------------------------------------

def evaluate_path(q_ids, q_vecs, r_ids, r_vecs, ground_truth, k: int):
    from sscd_triton.client import metrics, search

    result = search.topk(search.Embeddings.from_arrays(q_ids, q_vecs, "queries"),
                         search.Embeddings.from_arrays(r_ids, r_vecs, "references"), k=k)
    qs, rs, ss = [], [], []
    for qb, rb, sb in result:
        for q, rrow, srow in zip(qb, rb, sb):
            for r, s in zip(rrow, srow):
                if r is not None:
                    qs.append(q)
                    rs.append(r)
                    ss.append(float(s))
    return metrics.evaluate(qs, rs, ss, ground_truth)


def dedup_groups(ids, vecs, source: dict, threshold: float, k: int) -> dict:
    """Groups of items (references + queries) linked by pairs scoring >= threshold."""
    from sscd_triton.cli.dedup import connected_groups, near_duplicate_pairs
    from sscd_triton.client import search

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
    p.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    return p.parse_args(argv)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:+.4f}" if isinstance(v, float) and v < 0 else \
        f"{v:.4f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.k < 1 or not -1.0 <= args.threshold <= 1.0 or args.bound < 0:
        print("error: --k must be >= 1, --threshold in [-1, 1], --bound >= 0", file=sys.stderr)
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
    data = dataset()
    refs, queries = data["references"], data["queries"]
    print(f"data: {len(refs)} references ({len(data['originals'])} originals + "
          f"{len(data['distractors'])} distractors), {len(queries)} queries "
          f"({len(EDITS)} edits x {len(data['originals'])} originals: {', '.join(EDITS)})")
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
           "distractors": data["distractors"], "queries": len(q_ids), "edits": list(EDITS),
           "k": k, "bound": args.bound,
           "descriptor_max_abs_diff": float(np.abs(served - reference).max()),
           "descriptor_min_cosine": float(np.min(np.sum(served * reference, axis=1))),
           "paths": {}, "dedup": {}}
    for name, vecs in (("served", served), ("reference", reference)):
        m = evaluate_path(q_ids, vecs[n:], r_ids, vecs[:n], data["ground_truth"], k)
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
    rows.append(("served - reference", *(_fmt(out["difference"][c]) for c in METRICS), ""))
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
        print("\nnote: untrained demo weights: the absolute numbers are meaningless; the "
              "served - reference row is what this checks.")
    verdict = "PASS" if out["passed"] else "FAIL"
    print(f"{verdict}: largest |served - reference| {worst:.4f} (bound {args.bound}); "
          f"{out['seconds']:.0f} s")
    if args.json:
        from sscd_triton.files import write_atomic

        write_atomic(args.json, json.dumps(out, indent=2) + "\n")
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
