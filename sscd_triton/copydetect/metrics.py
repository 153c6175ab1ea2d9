"""Copy-detection metrics by the DISC / ISC 2021 definitions (numpy only).

    m = evaluate(query_ids, reference_ids, scores, ground_truth)   # ground_truth: {(q, r)}
    m.uap, m.acc1, m.recall_p90, m.threshold_p90

Predictions are (query, reference, score) triples, higher = more similar; ground truth
is a set of (query, reference) pairs. As the DISC evaluation code does:

- Predictions are sorted by score descending; at equal scores negatives come first
  (pessimistic: a tie never helps).
- precision_i = TP_i / i; recall_i = TP_i / G, G = the number of ground-truth pairs,
  retrieved or not (a pair never predicted is a miss).
- uAP (micro average precision) = sum_i (recall_i - recall_{i-1}) * precision_i.
- recall@P90: the largest recall among the points with precision >= 0.9 (0 if none);
  threshold@P90 is the score of the first such point (None if none): keeping the
  predictions scoring >= it gives that recall at >= 90% precision.
- acc@1: the fraction of the G ground-truth pairs (q, r) for which r is q's top
  prediction: r has q's highest score and no other prediction of q scores as high
  (ties count against). For DISC, where a query has at most one ground-truth reference,
  this is the fraction of ground-truth queries whose top prediction is correct.

Predictions for queries without ground truth count as false positives (DISC's
distractor queries). The same (query, reference) pair predicted twice is an error, as in
the DISC code.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Metrics:
    uap: float
    acc1: float
    recall_p90: float
    threshold_p90: float | None
    precision_p90: float | None  # the precision at that point (>= 0.9)
    predictions: int
    ground_truth: int
    true_positives: int  # ground-truth pairs among the predictions
    precisions: np.ndarray  # the curve, one point per prediction in ranking order
    recalls: np.ndarray
    thresholds: np.ndarray

    def summary(self) -> dict:
        """The JSON form: `uAP`, `acc@1`, `recall@P90`, `threshold@P90` and counts."""
        return {"uAP": self.uap, "acc@1": self.acc1, "recall@P90": self.recall_p90,
                "threshold@P90": self.threshold_p90, "predictions": self.predictions,
                "ground_truth_pairs": self.ground_truth,
                "true_positives": self.true_positives}


def precision_recall(positive: np.ndarray, scores: np.ndarray, num_positives: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and score at each rank of the pessimistic ranking (score
    descending, negatives before positives at equal scores)."""
    positive = np.asarray(positive, bool)
    scores = np.asarray(scores, np.float64)
    order = np.lexsort((positive, -scores))  # last key first: -score, then False < True
    tp = np.cumsum(positive[order])
    ranks = np.arange(1, len(order) + 1)
    return tp / ranks, tp / num_positives, scores[order]


def average_precision(precisions: np.ndarray, recalls: np.ndarray) -> float:
    """sum_i (recall_i - recall_{i-1}) * precision_i, recall_0 = 0."""
    if len(recalls) == 0:
        return 0.0
    steps = np.diff(np.concatenate([[0.0], recalls]))
    return float((steps * precisions).sum())


def operating_point(precisions: np.ndarray, recalls: np.ndarray, thresholds: np.ndarray,
                    min_precision: float = 0.9) -> tuple[float, float | None, float | None]:
    """(the largest recall at precision >= min_precision, the score of its first point,
    the precision there); (0.0, None, None) if no point reaches it."""
    valid = np.nonzero(precisions >= min_precision)[0]
    if len(valid) == 0:
        return 0.0, None, None
    best = valid[np.argmax(recalls[valid])]  # argmax: the first point of the largest recall
    return float(recalls[best]), float(thresholds[best]), float(precisions[best])


def accuracy_at_1(query_ids, reference_ids, scores, ground_truth: set) -> float:
    """Fraction of ground-truth pairs whose reference is its query's unique top
    prediction (a tie at the top counts against)."""
    if not ground_truth:
        return 0.0
    best: dict = {}  # query -> (top score, its reference, tied)
    for q, r, s in zip(query_ids, reference_ids, np.asarray(scores, np.float64)):
        cur = best.get(q)
        if cur is None or s > cur[0]:
            best[q] = (s, r, False)
        elif s == cur[0]:
            best[q] = (s, cur[1], True)
    correct = sum(1 for q, r in ground_truth
                  if q in best and not best[q][2] and best[q][1] == r)
    return correct / len(ground_truth)


def evaluate(query_ids, reference_ids, scores, ground_truth) -> Metrics:
    """All metrics of the predictions `(query_ids[i], reference_ids[i], scores[i])`
    against `ground_truth` (an iterable of (query, reference) pairs; repeats count once).
    ValueError: no ground truth, lengths that differ, a pair predicted twice, a score
    that is not a finite number."""
    gt = {(q, r) for q, r in ground_truth}
    if not gt:
        raise ValueError("the ground truth is empty")
    query_ids, reference_ids = list(query_ids), list(reference_ids)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if not len(query_ids) == len(reference_ids) == len(scores):
        raise ValueError(f"{len(query_ids)} queries, {len(reference_ids)} references and "
                         f"{len(scores)} scores")
    if not np.all(np.isfinite(scores)):
        raise ValueError("a score is not a finite number")
    pairs = list(zip(query_ids, reference_ids))
    if len(set(pairs)) != len(pairs):
        seen: set = set()
        dup = next(p for p in pairs if p in seen or seen.add(p))
        raise ValueError(f"the pair query {dup[0]!r}, reference {dup[1]!r} is predicted "
                         f"more than once")
    positive = np.fromiter((p in gt for p in pairs), bool, len(pairs))
    p, r, t = precision_recall(positive, scores, len(gt))
    recall_p90, threshold_p90, precision_p90 = operating_point(p, r, t)
    return Metrics(uap=average_precision(p, r),
                   acc1=accuracy_at_1(query_ids, reference_ids, scores, gt),
                   recall_p90=recall_p90, threshold_p90=threshold_p90,
                   precision_p90=precision_p90,
                   predictions=len(pairs), ground_truth=len(gt),
                   true_positives=int(positive.sum()),
                   precisions=p, recalls=r, thresholds=t)


def plot_pr(metrics: Metrics, path: str, title: str = "") -> None:
    """The precision-recall curve (matplotlib, no display needed), the P90 operating
    point marked, written atomically to `path` (format from its extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sscd_triton.files import write_atomic

    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    ax.plot(np.concatenate([[0.0], metrics.recalls]),
            np.concatenate([[1.0], metrics.precisions]), lw=1.5,
            label=f"uAP {metrics.uap:.4f}")
    if metrics.threshold_p90 is not None:
        ax.plot([metrics.recall_p90], [metrics.precision_p90], "o", color="C3",
                label=f"recall@P90 {metrics.recall_p90:.4f} (score >= {metrics.threshold_p90:.4g})")
    ax.axhline(0.9, color="0.7", lw=0.8, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=title or "precision-recall")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fmt = path.rsplit(".", 1)[-1].lower() if "." in path else "png"
    write_atomic(path, lambda f: fig.savefig(f, format=fmt, bbox_inches="tight"))
    plt.close(fig)


