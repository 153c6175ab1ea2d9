"""The edited-photo copy-detection set, built from the photographs shipped with the package,
and its DISC metrics (used by benchmarks/copy_detection.py and the int8 export report).

The 16 photographs (sscd_triton.samples) are split in two: the 8 at even positions are the
*originals*, the 8 at odd positions are *distractors*. The references are all 16 (their
shipped JPEG bytes, unchanged). Each original gets 8 edited copies (the queries, 64): JPEG
quality 30, 70% centre crop, half-size resize, grayscale, horizontal flip, Gaussian blur
(radius 2), overlaid text, and a combination (80% crop + flip + text + JPEG 40). A query's
only ground-truth reference is the original it was made from.
"""
from __future__ import annotations

import os

import numpy as np

from sscd_triton import images, samples

METRICS = ("uAP", "acc@1", "recall@P90")


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


def evaluate(q_ids, q_vecs, r_ids, r_vecs, ground_truth, k: int):
    """DISC metrics (sscd_triton.copydetect.metrics) of exact inner-product top-`k` search:
    `q_vecs` float32 [Q, dims] against `r_vecs` [R, dims] (a few hundred rows: numpy, no
    index)."""
    from sscd_triton.copydetect import metrics

    scores = np.asarray(q_vecs, np.float32) @ np.asarray(r_vecs, np.float32).T
    k = min(k, scores.shape[1])
    # stable sort on -score: equal scores keep reference order, as a flat index returns them
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    qs = [q for q in q_ids for _ in range(k)]
    rs = [r_ids[j] for row in top for j in row]
    ss = [float(scores[i, j]) for i, row in enumerate(top) for j in row]
    return metrics.evaluate(qs, rs, ss, ground_truth)
