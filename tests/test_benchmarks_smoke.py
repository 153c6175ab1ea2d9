"""benchmarks/bench.py end to end at a tiny size: every row runs and is printed.

No timing assertions: the numbers depend on the machine and on whatever else runs on it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("torch-eager", "ort-fp32", "ort-int8", "triton-descriptor", "triton-ensemble-1",
        "triton-ensemble-B", "triton-ensemble-B-int8", "client-decode-1p", "client-decode-Np")


def test_bench_runs_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--images", "4",
         "--batch", "2", "--concurrency", "2", "--precision", "fp32", "int8", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    table = text[text.index("ratio vs torch-eager"):]
    lines = table.splitlines()
    for row in ROWS:
        printed = [line for line in lines if line.startswith(row + " ")]
        assert printed, f"row {row} missing from the table:\n{table}"
        assert " x" in printed[0], f"row {row} has no ratio: {printed[0]}"
    assert "skipped" not in table, table
    # The device is named before any number, and the server-side batching is reported.
    assert text.index("cpu ") < text.index("ratio vs torch-eager")
    assert "tritonserver" in text and "mean batch" in text
    result = json.loads(out.read_text())
    assert [r["path"] for r in result["rows"]] == list(ROWS)
    assert all(r["ratio_vs_torch_eager"] is not None for r in result["rows"])
    assert result["device"]["cpu_model"]
    server = {r["path"]: r.get("server", {}) for r in result["rows"]}
    assert server["triton-descriptor"]["sscd_descriptor"]["inferences"] == 4
    assert server["triton-ensemble-B"]["sscd_preprocess"]["inferences"] == 4
    # int8 beside fp32, in the same run, as ratios (int8's own server, after fp32's stopped)
    assert server["triton-ensemble-B-int8"]["sscd_descriptor"]["inferences"] == 4
    assert set(result["int8_ratios"]) == {"ort-int8 / ort-fp32",
                                          "triton-ensemble-B-int8 / triton-ensemble-B"}
    assert "int8 speed-up, same run: triton-ensemble-B-int8 / triton-ensemble-B = x" in text


def test_isolation_benchmark_accounts_for_every_image():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "isolation.py"), "--images", "800",
         "--rates", "0.01", "--exec-ms", "0.2", "--row-ms", "0.01"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kinds = ("dynamic-batching", "per-request", "told-per-request")
    rows = {(r[0], r[1]): r for r in (line.split() for line in proc.stdout.splitlines())
            if r and r[0] in kinds}
    assert list(rows) == [(k, rate) for k in kinds for rate in ("0.00%", "1.00%")]
    for (kind, rate), r in rows.items():
        wrongly_failed, missed, switched = r[-3:]
        assert missed == "0"  # no corrupt image ever gets a descriptor
        if kind == "per-request":  # batching requests together can fail a good one too
            assert wrongly_failed == "0"
        assert switched == ("yes" if kind == "told-per-request" and rate != "0.00%" else "-")


def test_isolation_benchmark_refuses_bad_rates():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "isolation.py"),
                           "--rates", "1.5"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--rates" in proc.stderr.splitlines()[-1]


def test_fake_dali_resets_its_pipeline_after_each_failed_batch():
    """Every DALI error resets the pipeline (dali_backend dali_executor.cc `pipeline_.Reset()`):
    the fake spends `reset_s` of its instance on each failed batch, and only on those."""
    import asyncio

    import numpy as np

    from sscd_triton.bench.fake_dali import DaliServer
    from sscd_triton.bench import isolation

    class Inp:
        def __init__(self, k):
            self.arr = np.frombuffer(k.to_bytes(4, "little"), np.uint8).reshape(1, 4)

        def _get_content(self):
            return self.arr.tobytes()

        def shape(self):
            return [1, 4]

    async def go():
        server = DaliServer({1}, per_request=True, reset_s=0.01)
        got = await asyncio.gather(*(server.infer("sscd", [Inp(k)]) for k in (0, 1, 2)),
                                   return_exceptions=True)
        return server, got

    server, got = asyncio.run(go())
    assert server.resets == server.failed_batches == 1
    assert isinstance(got[1], Exception) and "DALI error" in got[1].message()
    assert [g.as_numpy("x")[0][0] for g in (got[0], got[2])] == [0.0, 2.0]
    r = isolation.run("per-request", 400, 0.02, 16, 8, 0.2, 0.01, 64, reset_ms=5.0)
    assert r.missed == 0 and r.wrongly_failed == 0  # every image accounted (run asserts it)
