"""`embed.py --ray local` (sscd_triton/client/ray_embed.py) against the real local
tritonserver: the same descriptors and failure records as a plain embed.py run, nothing
lost or duplicated, a worker killed mid-partition recovered, resume across both forms.

It shares tests/conftest.py's server (one cpu repository, max batch 8, per session), and every run is `python client/embed.py` as a subprocess.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from sscd_triton import samples  # noqa: E402
from sscd_triton.client.io import load_embeddings, load_failures, read_manifest  # noqa: E402

from conftest import EMBED, ROOT, embed  # noqa: E402,F401  (and the shared fixture triton)
TOL = 1e-5
RAY = ("--ray", "local", "--ray-actors", "2", "--partition-size", "8", "--shard-size", "3",
       "--quiet")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 photographs (the 16 samples, copied under several names) and one bad file."""
    root = tmp_path_factory.mktemp("ray_photos")
    (root / "sub").mkdir()
    paths = samples.photograph_paths()
    for k in range(40):
        src = Path(paths[k % len(paths)])
        dest = root / ("sub" if k % 3 == 0 else ".") / f"{k:02d}_{src.name}"
        shutil.copy(src, dest)
    (root / "broken.jpg").write_bytes(b"<!doctype html><html>404 not found</html>")
    return root


@pytest.fixture(scope="module")
def reference(triton, folder, tmp_path_factory):
    """embed.py without Ray on the same folder: ({id: descriptor}, {id: reason})."""
    out = tmp_path_factory.mktemp("ray_ref") / "out"
    r = embed(folder, "--output", out, "--quiet", url=triton.server.grpc_url)
    assert r.returncode == 1, r.stderr  # completed, one failure
    assert "summary: embedded 40, failed 1" in r.stdout
    ids, emb = load_embeddings(str(out))
    fails = {f["id"]: f["reason"] for f in load_failures(str(out))}
    return dict(zip(ids.tolist(), emb)), fails


def assert_same(out: Path, reference) -> None:
    """Every id once, the same ids and descriptors, the same failure records."""
    descriptors, fails = reference
    ids, emb = load_embeddings(str(out))
    assert len(ids) == len(set(ids.tolist())), "duplicated ids"
    assert sorted(ids.tolist()) == sorted(descriptors)
    worst = max(float(np.abs(e - descriptors[i]).max()) for i, e in zip(ids.tolist(), emb))
    assert worst <= TOL, f"descriptors differ by {worst}"
    got = load_failures(str(out))
    assert len(got) == len(fails)
    assert {f["id"]: f["reason"] for f in got} == fails


def markers(out: Path) -> list[str]:
    return sorted(os.listdir(out / "partitions"))


def test_ray_matches_embed_and_resumes(triton, folder, reference, tmp_path):
    out = tmp_path / "out"
    r = embed(folder, "--output", out, *RAY, url=triton.server.grpc_url)
    assert r.returncode == 1, r.stdout + r.stderr  # embed.py's status: completed, failures
    assert "summary: embedded 40, failed 1" in r.stdout, r.stdout
    assert_same(out, reference)
    assert len(markers(out)) == 6  # 41 inputs in partitions of 8
    manifest = read_manifest(str(out))
    assert manifest["complete"] and manifest["count"] == 40 and manifest["failures"] == 1
    assert manifest["resume"] == "partitions"

    again = embed(folder, "--output", out, *RAY, url=triton.server.grpc_url)  # all done
    assert again.returncode == 1, again.stderr
    assert "summary: embedded 0, failed 0, skipped 41" in again.stdout, again.stdout
    assert_same(out, reference)

    # plain embed.py continues a Ray output (by ids: folder inputs), redoing nothing
    plain = embed(folder, "--output", out, "--quiet", url=triton.server.grpc_url)
    assert plain.returncode == 1, plain.stderr
    assert "summary: embedded 0, failed 0" in plain.stdout, plain.stdout
    assert_same(out, reference)


def test_ray_worker_killed_mid_partition_is_recovered(triton, folder, reference, tmp_path):
    out, crash = tmp_path / "out", tmp_path / "crashed"
    r = embed(folder, "--output", out, *RAY, url=triton.server.grpc_url,
              env={"SSCD_RAY_TEST_CRASH_ONCE": str(crash)})
    assert crash.exists(), "the test hook did not kill a worker"
    assert r.returncode == 1, r.stdout + r.stderr
    assert_same(out, reference)  # nothing lost, nothing duplicated
    # the retried partition read back the shard its dead attempt wrote, and skipped its ids
    summary = next(line for line in r.stdout.splitlines() if line.startswith("summary:"))
    assert "embedded 40, failed 1" in summary and " skipped 0 " not in summary, summary
    assert len(markers(out)) == 6
    assert read_manifest(str(out))["complete"]


def test_ray_list_file_partitions_are_embed_py_partitions(triton, folder, reference, tmp_path):
    listing = tmp_path / "list.txt"
    names = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    listing.write_text("\n".join(names) + "\n")
    ray_out, plain_out = tmp_path / "ray", tmp_path / "plain"
    r = embed(f"@{listing}", "--output", ray_out, *RAY, url=triton.server.grpc_url)
    assert r.returncode == 1, r.stdout + r.stderr
    assert_same(ray_out, reference)
    p = embed(f"@{listing}", "--output", plain_out, "--partition-size", "8", "--quiet",
              url=triton.server.grpc_url)
    assert p.returncode == 1, p.stderr
    assert markers(ray_out) == markers(plain_out)  # the same partitions, the same keys
    # embed.py resumes the Ray output: every partition is finished, skipped unread
    again = embed(f"@{listing}", "--output", ray_out, "--partition-size", "8", "--quiet",
                  url=triton.server.grpc_url)
    assert again.returncode == 1, again.stderr
    assert "summary: embedded 0, failed 0, skipped 41" in again.stdout, again.stdout


def test_ray_usage_errors_and_lazy_import(tmp_path):
    r = subprocess.run([sys.executable, EMBED, str(tmp_path), "--url", "127.0.0.1:1",
                        "--output", str(tmp_path / "x.npz"), "--ray", "local"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "folder output" in r.stderr, r.stderr
    down = subprocess.run([sys.executable, EMBED, str(tmp_path), "--url", "127.0.0.1:1",
                           "--output", str(tmp_path / "out"), "--ray", "local",
                           "--give-up-after", "2", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert down.returncode == 3 and "could not start" in down.stderr, down.stderr
    code = ("import sys; from sscd_triton.cli import embed; "
            "embed.parse_args(['x', '--url', 'h:8001', '--output', 'o']); "
            "assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
