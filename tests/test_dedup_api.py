"""The copy-detection library (`sscd_triton.find_copies`, `sscd_triton.dedup`) on small
synthetic descriptors with known scores, report.html, and `sscd-dedup INPUT ... --output
OUT` end to end: with a local server it starts itself, and with --url against the
session's server (which also embeds the folder examples/find_copies.py is run on)."""
from __future__ import annotations

import base64
import csv
import io as _io
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import sscd_triton
from sscd_triton import spec
from sscd_triton.client import io
from sscd_triton.copydetect import api, report, search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E = np.eye(4, dtype=np.float32)
V = np.array([0.8, 0.6, 0, 0], np.float32)  # V.e0 = 0.8, V.e1 = 0.6


def write_folder(path, ids, emb) -> str:
    store = io.ShardStore(str(path), {"model": "m", "sscd_model": "sscd_disc_mixup",
                                      "weights_sha256": "ab" * 32, "preprocess": "square320",
                                      "dims": emb.shape[1]}, shard_size=2).open()
    store.add(list(ids), emb)
    store.close(complete=True)
    return str(path)


# --- find_copies ------------------------------------------------------------------------

QUERIES = np.stack([E[0], E[2]])
REFS = np.stack([E[1], V, E[0], E[3]])


def test_find_copies_ids_scores_ranks():
    t = sscd_triton.find_copies((["q0", "q1"], QUERIES), (["r0", "r1", "r2", "r3"], REFS), k=3)
    assert t.column_names == ["query_id", "reference_id", "score", "rank"]
    assert str(t.schema.field("score").type) == "float" and str(t.schema.field("rank").type) == "int32"
    rows = [(r["query_id"], r["reference_id"], r["score"], r["rank"]) for r in t.to_pylist()]
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    # q0: itself (1.0), V (0.8), then the tie at 0 goes to the first reference; q1 ties all
    assert rows == [("q0", "r2", 1.0, 1), ("q0", "r1", f32(0.8), 2), ("q0", "r0", 0.0, 3),
                    ("q1", "r0", 0.0, 1), ("q1", "r1", 0.0, 2), ("q1", "r2", 0.0, 3)]
    t = sscd_triton.find_copies((["q0", "q1"], QUERIES), (["r0", "r1", "r2", "r3"], REFS),
                                k=3, threshold=0.5)
    assert t.to_pydict() == {"query_id": ["q0", "q0"], "reference_id": ["r2", "r1"],
                             "score": [1.0, f32(0.8)], "rank": [1, 2]}


def test_input_forms_agree(tmp_path):
    ids = np.array([f"img{i}.jpg" for i in range(4)], dtype=object)
    npz = tmp_path / "refs.npz"
    np.savez(npz, ids=ids.astype(str), embeddings=REFS)
    folder = write_folder(tmp_path / "refs", ids, REFS)
    want = sscd_triton.find_copies(QUERIES, (ids, REFS), k=2).to_pydict()
    assert want["query_id"] == ["0", "0", "1", "1"]  # bare arrays: row numbers
    assert want["reference_id"] == ["img2.jpg", "img1.jpg", "img0.jpg", "img1.jpg"]
    for refs in (str(npz), npz, folder, api.as_embeddings(folder)):
        assert sscd_triton.find_copies(QUERIES, refs, k=2).to_pydict() == want
    assert sscd_triton.find_copies(QUERIES.tolist(), refs, k=2).to_pydict() == want


@pytest.mark.parametrize("call, message", [
    (lambda: sscd_triton.find_copies(E[0], REFS), r"queries: .*2-d array \[n, d\], got shape \(4,\)"),
    (lambda: sscd_triton.find_copies(np.zeros((2, 2, 2)), REFS), "queries: .*got shape"),
    (lambda: sscd_triton.find_copies(QUERIES, np.array([["a", "b"]])), "references: .*numbers"),
    (lambda: sscd_triton.find_copies(np.array([[np.nan, 1, 0, 0]]), REFS),
     "queries: 1 of 1 rows hold NaN"),
    (lambda: sscd_triton.find_copies((["a"], QUERIES), REFS), "queries: 1 ids for 2 embeddings"),
    (lambda: sscd_triton.find_copies((1, 2, 3), REFS), "queries: a tuple must be"),
    (lambda: sscd_triton.find_copies(5, REFS), "queries: expected a path .* got int"),
    (lambda: sscd_triton.find_copies("/nonexistent/q", REFS), "queries /nonexistent/q: no such"),
    (lambda: sscd_triton.find_copies(QUERIES, np.ones((3, 5))), "dimensions differ"),
    (lambda: sscd_triton.find_copies(QUERIES, REFS, k=0), "k must be at least 1"),
    (lambda: sscd_triton.find_copies(QUERIES, REFS, threshold=float("nan")), "threshold must"),
    (lambda: sscd_triton.find_copies(QUERIES, np.zeros((0, 4))), "references: empty"),
    (lambda: sscd_triton.dedup(REFS, keep="biggest"), "keep='biggest': one of largest"),
    (lambda: sscd_triton.dedup(REFS, threshold=None), "threshold: dedup needs one"),
])
def test_bad_input_is_a_value_error_naming_it(call, message):
    with pytest.raises(search.SearchInputError, match=message) as e:
        call()
    assert isinstance(e.value, ValueError)


def test_package_import_stays_lazy():
    code = ("import sys, sscd_triton; heavy = [m for m in ('pyarrow', 'faiss', 'tritonclient', "
            "'torch') if m in sys.modules]; assert not heavy, heavy; "
            "from sscd_triton import find_copies, dedup, Duplicates; "
            "from sscd_triton.copydetect import api; assert dedup is api.dedup")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {"find_copies", "dedup", "Duplicates"} <= set(sscd_triton.__all__)


# --- dedup ------------------------------------------------------------------------------

def collection(tmp_path):
    """a = e0, b = V (0.8 with a and c), c = e0 (an exact copy of a), d = e1 (0.6 with b),
    e = e3; files: b is the largest image, x<i>&"q'.png is d."""
    names = ["a.png", "b.png", "c.png", "x<i>&\"q'.png", "e.png"]
    sizes = [(10, 10), (40, 30), (10, 10), (12, 12), (8, 8)]
    ids = []
    for i, (name, size) in enumerate(zip(names, sizes)):
        path = str(tmp_path / name)
        Image.new("RGB", size, (40 * i, 100, 200)).save(path)
        ids.append(path)
    return ids, np.stack([E[0], V, E[0], E[1], E[3]])


def test_dedup_pairs_groups_and_representatives(tmp_path):
    ids, emb = collection(tmp_path)
    a, b, c, d, e = ids
    f32 = float(np.float32(0.8))
    for keep, rep in (("largest", b), ("first", a), ("most-pairs", a)):
        dups = sscd_triton.dedup((ids, emb), keep=keep)
        assert isinstance(dups, sscd_triton.Duplicates)
        assert dups.pairs.to_pydict() == {"id_a": [a, a, b], "id_b": [c, b, c],
                                          "score": [1.0, f32, f32]}
        assert dups.groups.to_pydict() == {"group_id": [0, 0, 0], "id": [a, b, c],
                                           "representative": [rep] * 3, "group_size": [3] * 3}
        assert (dups.threshold, dups.k, dups.keep, dups.items, dups.unread, dups.n_groups) == \
            (0.75, 20, keep, 5, 0, 1)
        assert dups.removable() == [x for x in (a, b, c) if x != rep]
    lower = sscd_triton.dedup(emb, threshold=0.5, keep="most-pairs")  # d joins through b
    g = lower.groups.to_pydict()
    assert g["id"] == ["0", "1", "2", "3"] and g["representative"] == ["1"] * 4
    assert sscd_triton.dedup(emb, threshold=1.5).groups.num_rows == 0
    unread = sscd_triton.dedup(emb)  # ids "0".."4" are no files: counted
    assert unread.unread == 3


# --- report.html ------------------------------------------------------------------------

def test_report_html(tmp_path):
    ids, emb = collection(tmp_path)
    emb = np.concatenate([emb, [E[3], E[3]]])  # e and two copies: a group of 3
    ids = ids + [str(tmp_path / f"e{i}.png") for i in range(2)]
    for path in ids[5:]:
        shutil.copy(ids[4], path)
    dups = sscd_triton.dedup((ids, emb), threshold=0.5)  # d joins a, b, c through b
    manifest = {"sscd_model": spec.DEMO_MODEL_NAME, "model": "sscd", "weights_sha256": "f" * 64,
                "preprocess": "square320", "dims": 4}
    failures = [{"id": "/p/<script>alert(1)</script>.jpg", "reason": "not an image & bad"}]
    path = report.write_report(str(tmp_path / "report.html"), dups, manifest, failures)
    page = open(path, encoding="utf-8").read()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "not an image &amp; bad" in page and "1 input failed to embed" in page
    assert "x&lt;i&gt;&amp;&quot;q&#x27;.png" in page and "x<i>" not in page
    assert not re.search(r"https?://", page) and "<link" not in page
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(uris) == 7  # every member of both groups has a thumbnail
    with Image.open(_io.BytesIO(base64.b64decode(uris[0]))) as img:
        assert img.format == "JPEG" and max(img.size) <= report.THUMB
    assert page.index("Group 0: 4 images") < page.index("Group 1: 3 images")
    assert page.count("representative (kept)") == 2
    assert "Warning" in page and spec.DEMO_MODEL_NAME in page and "&ge; 0.5," in page
    assert "7 embedded, 1 failed" in page and "2 holding 7 images" in page
    capped = report.render(dups, None, max_groups=1, max_members=2,
                           thumbnails=lambda i, s: None)
    assert "and 1 more group (all in groups.parquet)" in capped
    assert "and 2 more images in this group" in capped and "no preview" in capped
    assert "Warning" not in capped and "unknown (no manifest" in capped


# --- sscd-dedup INPUT ... --output OUT ----------------------------------------------------

def photos(folder):
    """Three sample photographs, an exact copy and a half-size copy of the first, and a
    corrupt file."""
    from sscd_triton import samples

    folder.mkdir()
    paths = samples.photograph_paths()[:3]
    for p in paths:
        shutil.copy(p, folder)
    first = os.path.basename(paths[0])
    shutil.copy(paths[0], folder / ("copy_" + first))
    with Image.open(paths[0]) as img:
        img.convert("RGB").resize((img.width // 2, img.height // 2)).save(folder / "half.jpg",
                                                                            quality=90)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder, first


def run_dedup(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "client", "dedup.py"),
                           *map(str, args)], capture_output=True, text=True, timeout=900,
                          cwd=cwd)


def check_output(out, folder, first, r):
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # broken.jpg failed
    for name in ("pairs.csv", "groups.parquet", "report.html", "manifest.json"):
        assert (out / name).is_file(), name
    assert f"(everything in {out}, by this run or earlier ones)" in \
        (out / "report.html").read_text()
    ids, emb = sscd_triton.load_embeddings(str(out))
    assert len(ids) == 5 and emb.shape == (5, 512)
    groups = pq.read_table(out / "groups.parquet").to_pylist()
    group_of = {os.path.basename(g["id"]): g["group_id"] for g in groups}
    copies = [first, "copy_" + first, "half.jpg"]
    assert all(c in group_of for c in copies), group_of
    assert len({group_of[c] for c in copies}) == 1
    with open(out / "pairs.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id_a", "id_b", "score"]
    exact = [row for row in rows[1:] if {os.path.basename(row[0]), os.path.basename(row[1])}
             == {first, "copy_" + first}]
    assert exact and float(exact[0][2]) > 0.999
    page = (out / "report.html").read_text()
    assert "broken.jpg" in page and "1 input failed to embed" in page
    assert "Warning" in page  # demo weights
    assert not re.search(r"https?://", page)
    assert f"report: {out / 'report.html'}" in r.stdout
    assert "1 input failed to embed" in r.stdout and "exit status 1" in r.stdout


def test_dedup_images_with_a_local_server(tmp_path):
    folder, first = photos(tmp_path / "photos")
    out = tmp_path / "out"
    r = run_dedup(folder, "--output", out, "--quiet", cwd=tmp_path)
    check_output(out, folder, first, r)
    assert "building a cpu model repository" in r.stdout
    assert len(os.listdir(tmp_path / "runs" / "repositories")) == 1


def test_local_repository_is_built_once(tmp_path, monkeypatch):
    from sscd_triton.serving import build, local

    calls = []

    def fake_build(output, target, checkpoint):
        calls.append((target, checkpoint))
        os.makedirs(os.path.join(output, spec.ENSEMBLE_NAME))
        if checkpoint.endswith("bad.pt"):
            raise build.BuildError("bad checkpoint")
        return type("Built", (), {"passed": True})()

    monkeypatch.setattr(build, "build_repository", fake_build)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.pt").write_bytes(b"weights")
    (tmp_path / "bad.pt").write_bytes(b"other")
    # left by an older version of the project, another checkpoint, a build that died
    root = tmp_path / "runs" / "repositories"
    sha = build.sha256_file("m.pt")[:16]
    older, other = root / f"cpu-square320-{sha}-00000000", root / "cpu-square320-0123-00000000"
    died = root / f"cpu-square320-{sha}-00000000.partial-999999999"
    for folder in (older, other, died):
        folder.mkdir(parents=True)
    said = []
    first = local.cached_repository("m.pt", said.append)
    assert local.cached_repository("m.pt", said.append) == first and len(calls) == 1
    assert first.startswith(str(root)) and sha in first
    assert "built before" in said[-1]
    assert sorted(os.listdir(root)) == sorted([other.name, os.path.basename(first)])
    assert f"removing {older} (built from the same checkpoint by an older version)" in said
    with pytest.raises(build.BuildError):
        local.cached_repository("bad.pt", said.append)
    assert sorted(os.listdir(root)) == sorted([other.name, os.path.basename(first)])


def test_dedup_images_usage_errors(tmp_path):
    r = run_dedup(tmp_path / "missing", "--output", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "missing: no such file or directory" in r.stderr and not (tmp_path / "out").exists()
    r = run_dedup(tmp_path, "--embeddings", tmp_path / "e.npz", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == \
        "error: give INPUT ... (images) or --embeddings (descriptors), not both"
    r = run_dedup(tmp_path, cwd=tmp_path)
    assert r.returncode == 2 and "needs --output OUT" in r.stderr


def test_dedup_bad_threshold_or_background_is_refused_before_anything_starts(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    out = tmp_path / "out"
    for flags, message in (
            (["--threshold", "nan"], "--threshold must be a finite number, got nan"),
            (["--threshold", "75"], "--threshold 75.0: the scores are cosines, in [-1, 1] "
                                    "without a background set (upstream's copy threshold "
                                    "is 0.75)"),
            (["--threshold", "0.5", "--background", tmp_path / "nope"],
             f"--background {tmp_path / 'nope'}: no such file or folder")):
        r = run_dedup(folder, "--output", out, *flags, cwd=tmp_path)
        assert (r.returncode, r.stderr.strip()) == (2, f"error: {message}"), r.stderr
        assert not out.exists() and not (tmp_path / "runs").exists()
    # sscd-match shares the checks
    r = subprocess.run([sys.executable, os.path.join(ROOT, "client", "match.py"), "--queries",
                        "q.npz", "--references", "r.npz", "--output", "m.csv",
                        "--threshold", "-2"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "--threshold -2.0: the scores are cosines" in r.stderr


def test_dedup_output_that_cannot_be_written_is_one_line(tmp_path):
    emb = write_folder(tmp_path / "emb", ["a", "b"], np.stack([E[0], E[0]]))
    r = run_dedup("--embeddings", emb, "--pairs", "/proc/no-such.csv", cwd=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last == "error: /proc/no-such.csv: No such file or directory"
    assert "Traceback" not in r.stderr, r.stderr


def test_dedup_sigterm_while_the_local_server_starts_stops_it(tmp_path):
    """SIGTERM (a timeout, systemd, Kubernetes) as the local server starts: exit 130 and
    no tritonserver left behind (it runs in a session of its own)."""
    import signal
    import time

    folder, _ = photos(tmp_path / "photos")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "client", "dedup.py"), folder,
                             "--output", tmp_path / "out"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("starting a local tritonserver"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + out + err
    assert "interrupted" in err and "Traceback" not in err, err

    def ours():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if str(tmp_path).encode() in f.read():
                        found.append(pid)
            except OSError:
                pass
        return found

    assert ours() == []


@pytest.fixture(scope="module")
def served_output(triton, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dedup_url")
    folder, first = photos(tmp / "photos")
    out = tmp / "out"
    r = run_dedup(folder, "--output", out, "--url", triton.server.grpc_url, "--quiet", cwd=tmp)
    return out, folder, first, r


def test_dedup_images_with_url(served_output, triton):
    out, folder, first, r = served_output
    check_output(out, folder, first, r)
    assert "tritonserver" not in r.stdout  # none started
    groups = pq.read_table(out / "groups.parquet")
    # a rerun resumes the descriptors (nothing embedded again) and rewrites the outputs
    again = run_dedup(folder, "--output", out, "--url", triton.server.grpc_url, "--quiet",
                      cwd=out.parent)
    check_output(out, folder, first, again)
    assert "embedded 0, failed 0" in again.stdout
    assert pq.read_table(out / "groups.parquet").equals(groups)


def test_example_find_copies(served_output):
    out, _, first, _ = served_output
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "find_copies.py"),
                        str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("5 images, ") and "group 0 (" in r.stdout
    assert f"copy_{first}" in r.stdout and "best match of " in r.stdout


def test_rows_of_one_id_are_one_item():
    """A path listed in two partitions of an sscd-embed output is embedded twice: its
    rows are one item, never a pair with itself nor two representatives."""
    rng = np.random.RandomState(0)
    v = rng.randn(3, 8).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    dups = sscd_triton.dedup((["a", "a", "b", "c"], np.vstack([v[0], v[0], v[1], v[1]])),
                             threshold=0.9, keep="first")
    assert dups.pairs.to_pylist() == [{"id_a": "b", "id_b": "c", "score": pytest.approx(1.0)}]
    assert dups.groups.column("id").to_pylist() == ["b", "c"]
