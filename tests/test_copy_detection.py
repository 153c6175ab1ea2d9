"""Copy detection on descriptors: the search engine (exact = brute force, blocked =
unblocked, approximate recall), score normalisation, dedup groups on planted
duplicates, the DISC metrics on FACTS' test vectors and edge cases, and the three
commands' outputs and exit codes. Synthetic descriptors only; no server."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from sscd_triton import load_embeddings
from sscd_triton.cli import dedup as dedup_cli
from sscd_triton.cli import evaluate as evaluate_cli
from sscd_triton.cli import match as match_cli
from sscd_triton.client import io
from sscd_triton.copydetect import dedup as dedup_lib, metrics, postprocess, search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {"model": "m", "model_version": "1", "sscd_model": "sscd_disc_mixup",
        "weights_sha256": "ab" * 32, "preprocess": "square320", "preprocess_on": "server",
        "urls": ["u:1"]}


def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_set(n, d=32, seed=0):
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def names(prefix, n):
    return np.array([f"{prefix}/{prefix[0].upper()}{i:05d}.jpg" for i in range(n)], dtype=object)


def write_npz(path, ids, emb) -> str:
    np.savez(path, ids=np.asarray(ids, dtype=str), embeddings=np.asarray(emb, np.float32))
    return str(path)


def write_folder(path, ids, emb, shard_size=50) -> str:
    """An embeddings folder written by the embedding client's own ShardStore."""
    store = io.ShardStore(str(path), {**META, "dims": emb.shape[1]}, shard_size=shard_size).open()
    for start in range(0, len(emb), 23):
        store.add(list(ids[start:start + 23]), emb[start:start + 23])
    store.close(complete=True)
    return str(path)


def brute_force(q, r, k):
    """Top-k by score descending, then reference position (numpy, float64 sort keys)."""
    s = q.astype(np.float32) @ r.astype(np.float32).T
    order = np.lexsort((np.broadcast_to(np.arange(r.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), order


def collect(result: search.Result):
    s, i, q = [], [], []
    for b in result.blocks:
        s.append(b.scores)
        i.append(b.positions)
        q.append(b.query_ids)
    return np.concatenate(q), np.concatenate(s), np.concatenate(i)


def run_cli(script, *args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "client", f"{script}.py"),
                           *map(str, args)], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


# --- the engine -------------------------------------------------------------------------

def test_exact_equals_brute_force_from_parquet_shards(tmp_path):
    q, r = random_set(120, seed=1), random_set(700, seed=2)
    Q = search.Embeddings.open(write_folder(tmp_path / "q", names("q", 120), q, 40))
    R = search.Embeddings.open(write_folder(tmp_path / "r", names("r", 700), r, 90))
    result = search.topk(Q, R, 7, query_block=50, reference_block=64)
    q_ids, s, i = collect(result)
    want_s, want_i = brute_force(q, r, 7)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(s, want_s, atol=1e-5)
    assert list(q_ids) == list(names("q", 120))
    np.testing.assert_array_equal(result.reference_ids, names("r", 700))
    assert result.stats["references"] == 700 and result.stats["queries"] == 120


@pytest.mark.parametrize("blocks", [(1, 1), (7, 13), (64, 100), (10**6, 10**6)])
def test_blocked_search_equals_unblocked(blocks):
    q, r = random_set(90, 16, seed=3), random_set(333, 16, seed=4)
    r[100] = r[5]  # an exact tie: broken by reference position, whatever the blocks
    Q = search.Embeddings.from_arrays(names("q", 90), q)
    R = search.Embeddings.from_arrays(names("r", 333), r)
    _, s0, i0 = collect(search.topk(Q, R, 10, query_block=10**6, reference_block=10**6))
    _, s1, i1 = collect(search.topk(Q, R, 10, query_block=blocks[0], reference_block=blocks[1]))
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_allclose(s0, s1, atol=1e-6)  # faiss's BLAS and per-query paths
    tied = np.nonzero((i0 == 5).any(axis=1) & (i0 == 100).any(axis=1))[0]
    for row in tied:
        assert list(i0[row]).index(5) < list(i0[row]).index(100)


def test_exact_search_streams_reference_blocks(tmp_path, monkeypatch):
    """Memory-bounded: faiss never sees more than --reference-block references at once,
    the shards are read once per query block, and only ids are kept."""
    q, r = random_set(100, 16, seed=14), random_set(500, 16, seed=15)
    R = search.Embeddings.open(write_folder(tmp_path / "r", names("r", 500), r, 200))
    reads, seen = [], []
    real_iter, real_knn = io.iter_shards, search._knn
    monkeypatch.setattr(io, "iter_shards", lambda p: (reads.append(p), real_iter(p))[1])
    monkeypatch.setattr(search, "_knn", lambda a, b, k: (seen.append(len(b)), real_knn(a, b, k))[1])
    result = search.topk(search.Embeddings.from_arrays(names("q", 100), q), R, 3,
                         query_block=40, reference_block=64)
    got = list(result)
    assert max(seen) <= 64 and sum(seen) == 500 * 3  # three query blocks x 500 references
    assert len(reads) == 1 + 3  # the first shard, for the width; then once per query block
    _, want = brute_force(q, r, 3)
    assert list(got[0][1][0]) == list(names("r", 500)[want[0]])  # Result yields ids


def test_merge_topk_orders_ties_and_pads():
    s = np.array([[0.5, 0.9, 0.5, -np.inf]], np.float32)
    i = np.array([[7, 3, 2, -1]])
    ms, mi = search.merge_topk(s, i, 6)
    assert mi.tolist() == [[3, 2, 7, -1, -1, -1]]
    assert ms[0, :3].tolist() == [pytest.approx(0.9), 0.5, 0.5] and np.isneginf(ms[0, 3:]).all()


def test_fewer_references_than_k():
    q, r = random_set(4, 8, seed=5), random_set(3, 8, seed=6)
    result = search.topk(search.Embeddings.from_arrays(names("q", 4), q),
                         search.Embeddings.from_arrays(names("r", 3), r), 5)
    blocks = list(result.blocks)
    assert (blocks[0].positions[:, 3:] == -1).all()
    qpos, rpos, _ = search.pairs(blocks[0])
    assert len(qpos) == 12 and (rpos >= 0).all()


def test_score_normalisation_matches_extended_vectors():
    q, r, b = random_set(60, 16, seed=7), random_set(200, 16, seed=8), random_set(80, 16, seed=9)
    norm = postprocess.ScoreNorm.parse("1.0[0,2]")
    result = search.topk(search.Embeddings.from_arrays(names("q", 60), q),
                         search.Embeddings.from_arrays(names("r", 200), r), 5,
                         background=b, score_norm=norm, query_block=17, reference_block=30)
    _, s, i = collect(result)
    qe, re = postprocess.score_normalization(q, r, b, norm)
    full = qe @ re.T
    np.testing.assert_allclose(s, np.take_along_axis(full, i, axis=1), atol=1e-5)
    _, plain_i = brute_force(q, r, 5)
    np.testing.assert_array_equal(i, plain_i)  # a query's own ranking never changes
    expected = q @ r.T - np.sort(q @ b.T, axis=1)[:, ::-1][:, :3].mean(axis=1, keepdims=True)
    np.testing.assert_allclose(s, np.take_along_axis(expected, i, axis=1), atol=1e-5)


def clustered(n_centres, per, d, seed, spread=0.15):
    rng = np.random.default_rng(seed)
    centres = random_set(n_centres, d, seed)
    return unit(np.repeat(centres, per, axis=0) + spread * rng.standard_normal((n_centres * per, d)))


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_index_reports_recall(index):
    r = clustered(60, 40, 32, seed=10)
    q = unit(r[::8] + 0.05 * np.random.default_rng(11).standard_normal((len(r[::8]), 32)))
    logs = []
    result = search.topk(search.Embeddings.from_arrays(names("q", len(q)), q),
                         search.Embeddings.from_arrays(names("r", len(r)), r), 10,
                         index=index, nprobe=8, recall_sample=200, log=logs.append)
    _, s, i = collect(result)
    st = result.stats
    assert st["recall_queries"] == 200 and 0.9 <= st["recall"] <= 1.0
    assert any(f"{index} recall@10" in m for m in logs)
    _, exact = brute_force(q, r, 10)
    measured = search.recall_at_k(i, exact)
    assert measured >= 0.9
    assert (i[:, 0] >= 0).all() and np.all(np.diff(s, axis=1) <= 1e-6)  # best first


def test_recall_at_k():
    assert search.recall_at_k(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [3, 5]])) == 0.75


def test_input_errors():
    e8 = search.Embeddings.from_arrays(names("a", 3), random_set(3, 8))
    e16 = search.Embeddings.from_arrays(names("b", 3), random_set(3, 16))
    with pytest.raises(search.SearchInputError, match="dimensions differ"):
        search.topk(e8, e16, 2)
    empty = search.Embeddings.from_arrays(np.zeros(0, str), np.zeros((0, 8), np.float32), "E")
    with pytest.raises(search.SearchInputError, match="E: empty"):
        search.topk(e8, empty, 2)
    with pytest.raises(search.SearchInputError, match="background"):
        search.topk(e8, e8, 2, background=random_set(2, 8))
    with pytest.raises(search.SearchInputError, match="no such file"):
        search.Embeddings.open("/nonexistent/emb")


# --- dedup ------------------------------------------------------------------------------

def planted_collection(seed=12):
    """300 random items, then near-copies: a group of 4 around item 0, a pair around item
    10, a chain 20 ~ c1 ~ c2 where 20 and c2 are less similar than the threshold."""
    rng = np.random.default_rng(seed + 1)
    base = random_set(300, 64, seed)
    extra = [base[0] + 0.07 * rng.standard_normal(64) for _ in range(3)]
    extra.append(base[10] + 0.07 * rng.standard_normal(64))
    direction = unit(rng.standard_normal((1, 64)))[0]
    direction -= direction @ base[20] * base[20]
    direction /= np.linalg.norm(direction)
    c1 = np.cos(0.6) * base[20] + np.sin(0.6) * direction
    c2 = np.cos(1.2) * base[20] + np.sin(1.2) * direction
    emb = unit(np.concatenate([base, np.array(extra), [c1, c2]]))
    return names("p", len(emb)), emb


def test_dedup_groups_on_planted_duplicates(tmp_path, capsys):
    ids, emb = planted_collection()
    src = write_folder(tmp_path / "photos", ids, emb, shard_size=64)
    assert emb[20] @ emb[305] < 0.75 < min(emb[20] @ emb[304], emb[304] @ emb[305])
    rc = dedup_cli.main(["--embeddings", src, "--groups", str(tmp_path / "g.parquet"),
                         "--pairs", str(tmp_path / "p.csv"), "--k", "5", "--query-block", "50",
                         "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3 groups holding 9 items (largest 4)" in out and "removes 6 items" in out
    g = pq.read_table(tmp_path / "g.parquet").to_pylist()
    by_group = {}
    for row in g:
        by_group.setdefault(row["group_id"], []).append(row)
    assert sorted(len(v) for v in by_group.values()) == [2, 3, 4]
    assert [r["id"] for r in by_group[0]] == [ids[0], ids[300], ids[301], ids[302]]
    assert {r["group_size"] for r in by_group[0]} == {4}
    assert [r["id"] for r in by_group[1]] == [ids[20], ids[304], ids[305]]
    assert {r["representative"] for r in by_group[1]} == {ids[304]}  # the chain's middle
    assert [r["id"] for r in by_group[2]] == [ids[10], ids[303]]
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id_a", "id_b", "score"]
    pairs = {(a, b) for a, b, _ in rows[1:]}
    assert (ids[20], ids[304]) in pairs and (ids[20], ids[305]) not in pairs
    assert all(a != b for a, b in pairs) and len(pairs) == len(rows) - 1  # self excluded, once each
    scores = [float(s) for _, _, s in rows[1:]]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.75


def test_dedup_with_exact_copies_beyond_k(tmp_path):
    """Ten identical items with k=2: every item's self may not be its first hit; all ten
    still form one group and no item pairs with itself."""
    base = random_set(50, 16, seed=13)
    emb = np.concatenate([base, np.repeat(base[:1], 9, axis=0)])
    ids = names("x", len(emb))
    assert dedup_cli.main(["--embeddings", write_npz(tmp_path / "x.npz", ids, emb),
                           "--k", "2", "--groups", str(tmp_path / "g.csv"),
                           "--pairs", str(tmp_path / "p.parquet"), "--quiet"]) == 0
    with open(tmp_path / "g.csv", newline="") as f:
        g = list(csv.DictReader(f))
    assert {r["id"] for r in g} == {ids[0], *ids[50:]} and {r["group_id"] for r in g} == {"0"}
    p = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert p and all(r["id_a"] != r["id_b"] for r in p)


def test_dedup_keeps_the_largest_by_default(tmp_path):
    """Four copies with equal pairs: --keep largest takes the largest resolution, then the
    largest file (a missing file counts as 0); --keep first the first; the output says."""
    from PIL import Image

    from sscd_triton import images

    photo = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 64, 3), np.uint8))
    ids = [str(tmp_path / n) for n in ("thumb.png", "low.jpg", "best.png", "gone.jpg")]
    Image.new("RGB", (20, 15)).save(ids[0])
    (tmp_path / "low.jpg").write_bytes(images.encode(photo, "JPEG", quality=20))
    photo.save(ids[2])  # same resolution as low.jpg, larger file
    assert os.path.getsize(ids[2]) > os.path.getsize(ids[1])
    base = random_set(20, 16, seed=5)
    emb = np.concatenate([np.repeat(base[:1], 4, axis=0), base[1:]])
    src = write_npz(tmp_path / "e.npz", ids + list(names("x", 19)), emb)

    def representative(*keep):
        r = run_cli("dedup", "--embeddings", src, "--groups", tmp_path / "g.csv", *keep)
        assert r.returncode == 0, r.stderr
        with open(tmp_path / "g.csv", newline="") as f:
            reps = {row["representative"] for row in csv.DictReader(f)}
        assert len(reps) == 1
        return reps.pop(), r.stdout

    rep, out = representative()
    assert rep == ids[2], out
    assert "1 group holding 4 items" in out  # not "1 groups"
    assert ("representatives (--keep largest): the largest resolution, then the largest "
            "file") in out and "1 of 4 members' files could not be read" in out
    rep, out = representative("--keep", "first")
    assert rep == ids[0] and "representatives (--keep first)" in out


def test_dedup_without_an_output_prints_the_pairs(copies):
    r = run_cli("dedup", "--embeddings", copies["q"], "--threshold", "0.5")
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(r.stdout.splitlines()))
    assert rows[0] == ["id_a", "id_b", "score"] and len(rows) > 1
    assert all(float(score) >= 0.5 for _, _, score in rows[1:])
    assert "near-duplicate pair" in r.stderr  # the summary, beside the pairs


def test_demo_weights_are_named_in_match_and_dedup(tmp_path, copies):
    demo = tmp_path / "demo.npz"
    np.savez(demo, ids=np.asarray(copies["qids"], dtype=str),
             embeddings=np.asarray(copies["qv"], np.float32),
             meta=np.array(json.dumps({"sscd_model": "demo-untrained"})))
    note = "demo-untrained weights: the descriptors mean nothing for copy detection"
    r = run_cli("match", "--queries", demo, "--references", copies["r"],
                "--output", tmp_path / "m.csv")
    assert r.returncode == 0 and f"note: --queries {demo} holds descriptors of {note}" \
        in r.stdout, r.stdout
    assert "--references" not in r.stdout  # the references are of a real model
    r = run_cli("dedup", "--embeddings", demo, "--groups", tmp_path / "g.csv")
    assert r.returncode == 0 and f"note: --embeddings {demo} holds" in r.stdout, r.stdout


def test_connected_groups_and_representative():
    a, b = np.array([0, 1, 5]), np.array([1, 2, 6])
    labels = dedup_lib.connected_groups(8, a, b)
    assert labels.tolist() == [0, 0, 0, -1, -1, 5, 5, -1]
    g = dedup_lib.groups_table(labels, a, b)
    assert g["group_id"].tolist() == [0, 0, 0, 1, 1]
    assert g["member"].tolist() == [0, 1, 2, 5, 6]
    assert g["representative"].tolist() == [1, 1, 1, 5, 5]  # most pairs; tie: first


# --- metrics ----------------------------------------------------------------------------

GT = {("Q1", "R1"), ("Q2", "R2"), ("Q3", "R3")}
PRED = [("Q1", "R1", .9), ("Q2", "R9", .8), ("Q2", "R2", .7), ("Q3", "R7", .6), ("Q1", "R5", .5)]


def ev(pred, gt):
    return metrics.evaluate([p[0] for p in pred], [p[1] for p in pred], [p[2] for p in pred], gt)


def test_facts_test_vector():
    m = ev(PRED, GT)
    assert m.uap == pytest.approx(5 / 9) and round(m.uap, 4) == 0.5556
    assert m.recall_p90 == pytest.approx(1 / 3) and m.threshold_p90 == pytest.approx(0.9)
    assert m.acc1 == pytest.approx(1 / 3)
    assert set(m.summary()) >= {"uAP", "acc@1", "recall@P90", "threshold@P90"}
    assert ev(list(reversed(PRED)), GT).uap == m.uap  # input order does not matter


def test_facts_ties_vector_is_pessimistic():
    m = ev([("Q1", "R1", .5), ("Q2", "R2", .5)], {("Q1", "R1")})
    assert m.uap == pytest.approx(0.5)
    assert m.recall_p90 == 0 and m.threshold_p90 is None


def test_ties_at_the_top_count_against_acc1():
    gt = {("Q1", "R1"), ("Q2", "R2")}
    m = ev([("Q1", "R1", .8), ("Q1", "R4", .8), ("Q2", "R2", .7), ("Q2", "R3", .6)], gt)
    assert m.acc1 == pytest.approx(0.5)  # Q1's top is a tie: wrong; Q2 right


def test_no_predictions_and_never_retrieved_pairs():
    m = ev([], GT)
    assert (m.uap, m.acc1, m.recall_p90, m.threshold_p90) == (0.0, 0.0, 0.0, None)
    m = ev([("Q1", "R1", .9)], GT)  # perfect precision, 1 of 3 retrieved
    assert m.uap == pytest.approx(1 / 3) and m.recall_p90 == pytest.approx(1 / 3)


def test_queries_without_ground_truth_are_false_positives():
    m = ev([("Q1", "R1", .9), ("D1", "R5", .95), ("D2", "R6", .1)], {("Q1", "R1")})
    assert m.uap == pytest.approx(0.5)  # the distractor outranks the true pair
    assert m.acc1 == 1.0 and m.recall_p90 == 0.0


def test_recall_at_p90_takes_the_largest_recall():
    gt = {(f"Q{i}", "R") for i in range(10)}
    pred = [(f"Q{i}", "R", 1 - i / 100) for i in range(9)] + [("X", "R", 0.905), ("Q9", "R", .5)]
    m = ev(pred, gt)
    # 9 true, then one false (P=0.9 at recall 0.9), then the tenth true (P=10/11 >= 0.9)
    assert m.recall_p90 == pytest.approx(1.0) and m.threshold_p90 == pytest.approx(0.5)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="more than once"):
        ev([("Q1", "R1", .9), ("Q1", "R1", .8)], GT)
    with pytest.raises(ValueError, match="empty"):
        ev(PRED, set())


# --- the commands -----------------------------------------------------------------------

@pytest.fixture
def copies(tmp_path):
    """References; queries = edited copies of the first 40 and 20 unrelated; background."""
    rng = np.random.default_rng(20)
    r = random_set(400, 32, seed=21)
    q = unit(np.concatenate([r[:40] + 0.1 * rng.standard_normal((40, 32)),
                             random_set(20, 32, seed=22)]))
    qids, rids = names("q", 60), names("r", 400)
    gt = tmp_path / "gt.csv"
    gt.write_text("query_id,reference_id\n" +
                  "".join(f"Q{i:05d},R{i:05d}\n" for i in range(40)) +
                  "".join(f"Q{i:05d},\n" for i in range(40, 60)))
    return {"q": write_npz(tmp_path / "q.npz", qids, q),
            "r": write_folder(tmp_path / "refs", rids, r, shard_size=128),
            "b": write_npz(tmp_path / "b.npz", names("b", 100), random_set(100, 32, seed=23)),
            "gt": str(gt), "qids": qids, "rids": rids, "qv": q, "rv": r}


def test_match_then_evaluate(tmp_path, copies):
    out = tmp_path / "m.csv"
    r = run_cli("match", "--queries", copies["q"], "--references", copies["r"], "--k", 5,
                "--output", out)
    assert r.returncode == 0, r.stderr
    assert "60 queries x 400 references (32-d), k=5, exact search" in r.stdout
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["query_id", "reference_id", "score"] and len(rows) == 1 + 60 * 5
    _, want_i = brute_force(copies["qv"], copies["rv"], 5)
    assert [row[1] for row in rows[1:6]] == list(copies["rids"][want_i[0]])
    r = run_cli("evaluate", "--matches", out, "--ground-truth", copies["gt"], "--stem-ids",
                "--json", tmp_path / "e.json", "--plot", tmp_path / "pr.png")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "e.json").read_text())
    assert {"uAP", "acc@1", "recall@P90", "threshold@P90"} <= set(doc)
    assert doc["ground_truth_pairs"] == 40 and doc["uAP"] > 0.5
    assert (tmp_path / "pr.png").read_bytes()[:4] == b"\x89PNG"
    assert "uAP " in r.stdout and "never retrieved" in r.stdout


def test_match_threshold_and_score_norm(tmp_path, copies, capsys):
    out = tmp_path / "t.csv"
    assert match_cli.main(["--queries", copies["q"], "--references", copies["r"],
                           "--threshold", "0.75", "--output", str(out), "--quiet"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    s = copies["qv"] @ copies["rv"].T
    assert len(rows) == int((np.sort(s, axis=1)[:, -10:] >= 0.75).sum())
    assert all(float(row["score"]) >= 0.75 for row in rows)
    assert match_cli.main(["--queries", copies["q"], "--references", copies["r"],
                           "--background", copies["b"], "--score-norm", "1.0[0,2]",
                           "--output", str(out), "--quiet"]) == 0
    assert "score normalisation 1.0[0,2]" in capsys.readouterr().out
    with open(out, newline="") as f:
        first = next(csv.DictReader(f))
    _, b = load_embeddings(copies["b"])
    qe, re = postprocess.score_normalization(copies["qv"][:1], copies["rv"], b)
    assert float(first["score"]) == pytest.approx(float((qe @ re.T).max()), abs=1e-5)


def test_match_approximate_prints_recall(tmp_path, copies):
    r = run_cli("match", "--queries", copies["q"], "--references", copies["r"], "--index",
                "hnsw", "--output", tmp_path / "a.csv")
    assert r.returncode == 0, r.stderr
    assert "hnsw index (efSearch 128), recall@10 against exact search" in r.stdout


@pytest.mark.parametrize("case", ["missing", "dims", "empty", "output", "norm", "k"])
def test_match_bad_input_exit_2(tmp_path, copies, case):
    out = tmp_path / "m.csv"
    q, refs = copies["q"], copies["r"]
    extra = []
    if case == "missing":
        refs = str(tmp_path / "nope.npz")
    elif case == "dims":
        refs = write_npz(tmp_path / "r16.npz", names("r", 5), random_set(5, 16))
    elif case == "empty":
        q = write_npz(tmp_path / "e.npz", np.zeros(0, str), np.zeros((0, 32)))
    elif case == "output":
        out = tmp_path / "no" / "m.csv"
    elif case == "norm":
        extra = ["--background", copies["b"], "--score-norm", "1.0(0,2)"]
    elif case == "k":
        extra = ["--k", "0"]
    r = run_cli("match", "--queries", q, "--references", refs, "--output", out, *extra)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert not out.exists()
    expect = {"missing": "nope.npz: no such file", "dims": "dimensions differ",
              "empty": "empty", "output": "does not exist", "norm": "BETA[FIRST,LAST]",
              "k": "--k must be at least 1"}[case]
    assert expect in lines[0]


def test_dedup_bad_input_exit_2(tmp_path, copies):
    r = run_cli("dedup", "--embeddings", tmp_path / "missing", "--groups", tmp_path / "g.csv")
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("dedup", "--embeddings", copies["q"], "--groups", tmp_path / "g.txt")
    assert r.returncode == 2 and ".csv or .parquet" in r.stderr
    r = run_cli("dedup", "--embeddings", copies["q"], "--background", copies["b"],
                "--groups", tmp_path / "g.csv")
    assert r.returncode == 2 and "--threshold" in r.stderr


def test_evaluate_bad_input_exit_2(tmp_path, copies):
    m = tmp_path / "m.csv"
    m.write_text("query_id,reference_id,score\nQ1,R1,0.9\nQ1,R2,high\n")
    r = run_cli("evaluate", "--matches", m, "--ground-truth", copies["gt"])
    assert r.returncode == 2 and "line 3" in r.stderr and "Traceback" not in r.stderr
    m.write_text("query,ref\nQ1,R1\n")
    r = run_cli("evaluate", "--matches", m, "--ground-truth", copies["gt"])
    assert r.returncode == 2 and "no column" in r.stderr
    m.write_text("query_id,reference_id,score\nQ1,R1,0.9\nQ1,R1,0.8\n")
    r = run_cli("evaluate", "--matches", m, "--ground-truth", copies["gt"])
    assert r.returncode == 2 and "more than once" in r.stderr
    r = run_cli("evaluate", "--matches", tmp_path / "none.csv", "--ground-truth", copies["gt"])
    assert r.returncode == 2 and "no such file" in r.stderr
    empty = tmp_path / "gt0.csv"
    empty.write_text("query_id,reference_id\nQ1,\n")
    m.write_text("query_id,reference_id,score\nQ1,R1,0.9\n")
    r = run_cli("evaluate", "--matches", m, "--ground-truth", empty)
    assert r.returncode == 2 and "no (query, reference) pairs" in r.stderr


def test_evaluate_cli_on_facts_vector(tmp_path, capsys):
    m, gt = tmp_path / "m.csv", tmp_path / "gt.csv"
    m.write_text("query_id,reference_id,score\n" + "".join(f"{a},{b},{s}\n" for a, b, s in PRED))
    gt.write_text("query_id,reference_id\nQ1,R1\nQ2,R2\nQ3,R3\nQ4,\n")
    assert evaluate_cli.main(["--matches", str(m), "--ground-truth", str(gt),
                              "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "uAP 0.5556  acc@1 0.3333  recall@P90 0.3333 at score >= 0.9" in out
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["uAP"] == pytest.approx(5 / 9) and doc["threshold@P90"] == 0.9


def test_help_shows_defaults():
    r = run_cli("match", "--help")
    assert r.returncode == 0 and "(default: 10)" in r.stdout and "0.75" in r.stdout
    assert "FACTS" not in r.stdout  # no internal notes
    r = run_cli("dedup", "--help")
    assert r.returncode == 0 and "(default: 20)" in r.stdout
    assert r.stdout.startswith("usage: python client/dedup.py ")


@pytest.mark.parametrize("name", ["dedup", "match", "evaluate", "postprocess"])
def test_help_names_the_installed_command(name):
    """`sscd-dedup --help` says sscd-dedup, not dedup.py."""
    code = (f"import sys; sys.argv[0] = '/venv/bin/sscd-{name}'; "
            f"from sscd_triton.cli.{name} import main; main(['--help'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith(f"usage: sscd-{name} "), r.stdout[:200]
