"""benchmarks/copy_detection.py end to end on the demo weights: real photographs and
edited copies through a local cpu tritonserver and through PyTorch, the DISC metrics of
both, and the served-minus-reference difference within the bound (the cpu path is
bit-exact up to float rounding). Needs tritonserver (about a minute on 2 cores)."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from sscd_triton.copydetect import copyset
from sscd_triton.cli import copy_detection

BIN = os.path.dirname(sys.executable)
pytestmark = pytest.mark.skipif(
    shutil.which("tritonserver", path=BIN + os.pathsep + os.environ.get("PATH", "")) is None,
    reason="tritonserver not installed")


def test_dataset_is_honest():
    data = copyset.dataset()
    refs = [r for r, _ in data["references"]]
    assert len(refs) == 16 and len(data["queries"]) == 8 * len(copyset.EDITS)
    assert set(data["originals"]) | set(data["distractors"]) == set(refs)
    assert not set(data["originals"]) & set(data["distractors"])
    # every query's one ground-truth reference is its original, never a distractor
    assert {r for _, r in data["ground_truth"]} == set(data["originals"])
    assert len(data["ground_truth"]) == len(data["queries"])
    assert all(b[:2] == b"\xff\xd8" for _, b in data["queries"])  # JPEG bytes


def test_bad_arguments(capsys):
    assert copy_detection.main(["--edits", "nope"]) == 2
    assert copy_detection.main(["--repository", "/nonexistent"]) == 2
    assert "error" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo checkpoint goes to ./runs here
    out = tmp_path / "out.json"
    rc = copy_detection.main(["--edits", "jpeg30,crop70,gray,combo", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads(out.read_text())
    assert {"paths", "difference", "dedup", "passed", "bound", "edits"} <= set(res)
    assert res["passed"] is True and res["queries"] == 4 * 8
    for path in ("served", "reference"):
        m = res["paths"][path]
        assert {"uAP", "acc@1", "recall@P90", "threshold@P90"} <= set(m)
        assert m["ground_truth_pairs"] == 32
        assert {"groups", "pairs", "members"} <= set(res["dedup"][path])
    for key in copy_detection.METRICS:
        assert abs(res["difference"][key]) <= res["bound"]
    assert res["descriptor_max_abs_diff"] < 1e-4
    assert "served - reference" in printed and "PASS" in printed


def test_served_difference_fails(tmp_path, monkeypatch, capsys):
    """A served path that ranks differently (descriptors rolled by one image) exits 1."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    real = copy_detection.served_descriptors
    monkeypatch.setattr(copy_detection, "served_descriptors",
                        lambda url, encoded: np.roll(real(url, encoded), 1, axis=0))
    out = tmp_path / "out.json"
    assert copy_detection.main(["--edits", "crop70", "--json", str(out)]) == 1
    res = json.loads(out.read_text())
    assert res["passed"] is False
    assert max(abs(v) for v in res["difference"].values()) > res["bound"]
    assert "FAIL" in capsys.readouterr().out
