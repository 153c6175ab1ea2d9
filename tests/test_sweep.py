"""benchmarks/sweep.py end to end at its --quick size: perf_analyzer's CSV, the machine file,
the plot. No timing assertions (the machine is shared; the numbers are whatever they are).

The test installs perf_analyzer itself (scripts/install_perf_analyzer.py, idempotent, a
few seconds the first time) and is skipped, with the installer's reason, only when that
fails (no network, not linux x86_64).
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PA_COLUMNS = ("Inferences/Second", "Client Send", "Network+Server Send/Recv", "Server Queue",
              "Server Compute Input", "Server Compute Infer", "Server Compute Output",
              "Client Recv", "p50 latency", "p90 latency", "p95 latency", "p99 latency")


@pytest.fixture(scope="module")
def perf_analyzer():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "install_perf_analyzer.py")],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"perf_analyzer could not be installed: {proc.stderr.strip()[-300:]}")
    path = os.path.join(os.path.dirname(sys.executable), "perf_analyzer")
    assert os.access(path, os.X_OK), proc.stdout
    return path


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_sweep_writes_csv_machine_and_plot(perf_analyzer, tmp_path):
    """fp32 and int8 in one run, one after the other: each its CSVs, machine file and plot
    (int8's named -int8), and the served int8 / fp32 ratio printed."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "sweep.py"), "--quick",
         "--precision", "fp32", "int8", "--out", str(tmp_path), "--perf-analyzer", perf_analyzer],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ens = _rows(tmp_path / "perf-ensemble-cpu.csv")
    desc = _rows(tmp_path / "perf-descriptor-cpu.csv")
    for rows in (ens, desc):
        assert rows
        for col in PA_COLUMNS + ("Images/Second", "Load Average"):
            assert col in rows[0], f"{col} missing: {list(rows[0])}"
        assert all(float(r["Inferences/Second"]) > 0 for r in rows)
    conc = [r for r in ens if r["Mode"] == "concurrency"]
    assert [r["Concurrency"] for r in conc] == ["1", "2"]
    assert any(r["Mode"] == "request_rate" and float(r["Request Rate"]) > 0 for r in ens)
    # The composing models' breakdown is there: every ensemble request went through both.
    for r in ens:
        assert float(r["sscd_preprocess mean batch"]) >= 1
        assert float(r["sscd_descriptor compute infer us"]) > 0
    assert desc[0]["Batch"] == "2" and float(desc[0]["sscd_descriptor mean batch"]) >= 2
    inproc = {r["Path"] for r in _rows(tmp_path / "inprocess-cpu.csv")}
    assert {"pipeline-b1", "pipeline-b2", "ort-fp32-b1", "client-decode-1p"} <= inproc
    machine = (tmp_path / "machine-cpu.txt").read_text()
    for key in ("cpu_model", "memory", "load_average_at_start", "load_average_at_end",
                "tritonserver", "onnxruntime", "perf_analyzer"):
        assert key in machine, machine
    png = (tmp_path / "throughput-latency-cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "in-process pipeline" in proc.stdout and "= " in proc.stdout
    int8 = _rows(tmp_path / "perf-ensemble-cpu-int8.csv")
    assert [r["Concurrency"] for r in int8 if r["Mode"] == "concurrency"] == ["1", "2"]
    assert {"pipeline-b1", "ort-int8-b1"} <= {r["Path"] for r in _rows(tmp_path / "inprocess-cpu-int8.csv")}
    assert "precision" in (tmp_path / "machine-cpu-int8.txt").read_text()
    assert (tmp_path / "throughput-latency-cpu-int8.png").exists()
    assert "int8 speed-up, same run: served ensemble at its best concurrency" in proc.stdout


def test_a_users_sweep_leaves_the_committed_results_alone():
    """By default a run writes to a git-ignored folder; the committed reference results
    under benchmarks/results only with --reference."""
    from sscd_triton.cli import sweep as sweep_cli

    out = sweep_cli.parse_args([]).out
    assert os.path.commonpath([out, os.path.join(ROOT, "benchmarks")]) != os.path.join(
        ROOT, "benchmarks"), out
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(out, "x.csv")], cwd=ROOT)
    assert ignored.returncode == 0, f"{out} is not git-ignored"
    assert sweep_cli.parse_args(["--reference"]).out == os.path.join(ROOT, "benchmarks", "results")
    assert sweep_cli.parse_args(["--out", "/tmp/s"]).out == "/tmp/s"


def test_sweep_without_perf_analyzer_says_how_to_install(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "sweep.py"), "--quick",
         "--out", str(tmp_path), "--perf-analyzer", str(tmp_path / "missing")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "perf_analyzer not found" in proc.stderr and "scripts/setup.sh" in proc.stderr


def _failing_point(tmp_path, says: str):
    """run_point against a fake perf_analyzer that runs the shell line `says` and exits 1:
    the point, and each try's command line."""
    from sscd_triton.bench import sweep

    calls = tmp_path / "calls"
    fake = tmp_path / "perf_analyzer"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n{says}\nexit 1\n")
    fake.chmod(0o755)
    point = sweep.run_point(str(fake), "127.0.0.1:1", "sscd",
                            sweep.Point("ensemble", "concurrency", 1, 1), [], 1500,
                            str(tmp_path), 30, 4)
    return point, calls.read_text().splitlines()


def test_a_point_that_never_measures_is_tried_three_times_and_says_why(tmp_path):
    """perf_analyzer's own failure lines (perf_analyzer/inference_profiler.cc) end each try;
    the last try doubles the window, and the point keeps every try's reason."""
    point, tries = _failing_point(tmp_path, "echo 'Failed to obtain stable measurement within 4 "
                                  "measurement windows for concurrency 1. Please try to increase "
                                  "the --measurement-interval.'")
    assert not point.row
    assert len(tries) == 3
    assert ["--stability-percentage 25", "--stability-percentage 100", "--stability-percentage 100"] == [
        t[t.index("--stability-percentage"):].split(" --")[0] for t in tries]
    assert "--measurement-interval 3000" in tries[2]
    assert point.error.count("Failed to obtain stable measurement") == 3
    assert "[100%, 3000 ms]" in point.error


def test_sweep_measures_a_server_restricted_as_in_production(perf_analyzer, triton, tmp_path):
    """docker/entrypoint.sh restricts model-config and statistics: perf_analyzer cannot
    read the model's config without the admin key, so every point fails; with
    --admin-key (or $SSCD_ADMIN_KEY) it measures."""
    from sscd_triton.bench.reliability import production_flags
    from sscd_triton.serving.server import TritonServer

    flags, _ = production_flags("k3y")
    server = TritonServer(triton.repo, extra_args=flags, log_path=tmp_path / "server.log").start()
    try:
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "sweep.py"), "--quick",
               "--no-inprocess", "--concurrency", "1", "--rates", "1", "--descriptor-concurrency", "1",
               "--url", server.grpc_url, "--perf-analyzer", perf_analyzer]
        env = {k: v for k, v in os.environ.items() if k != "SSCD_ADMIN_KEY"}
        without = subprocess.run(cmd + ["--out", str(tmp_path / "without")], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=540)
        assert without.returncode == 1, without.stdout[-3000:] + without.stderr[-3000:]
        assert "restricted" in without.stdout and "could not be measured" in without.stderr
        with_key = subprocess.run(cmd + ["--out", str(tmp_path / "with")], cwd=ROOT,
                                  env={**env, "SSCD_ADMIN_KEY": "k3y"},
                                  capture_output=True, text=True, timeout=540)
        # the key is what is under test, not the shared machine's stability (the quick test
        # above asserts a full sweep): nothing refused, and points measured
        said = with_key.stdout[-3000:] + with_key.stderr[-3000:]
        assert with_key.returncode in (0, 1) and "restricted" not in said, said
        measured = [f for f in ("perf-ensemble-cpu.csv", "perf-descriptor-cpu.csv")
                    if (tmp_path / "with" / f).exists() and _rows(tmp_path / "with" / f)]
        assert measured, said
    finally:
        server.stop()


def test_a_point_refused_for_good_is_not_tried_again(tmp_path):
    """A restricted protocol (core's words, through perf_analyzer) is not cured by a
    longer window: one try, its reason kept."""
    point, tries = _failing_point(tmp_path, "echo \"error: failed to get model config: This "
                                  "protocol is restricted, expecting header "
                                  "'triton-grpc-protocol-sscd-admin-key'\" >&2")
    assert not point.row and len(tries) == 1
    assert "This protocol is restricted" in point.error


def test_quick_takes_any_stability_last(tmp_path):
    """--quick (the test's size on a shared machine) adds a last try that accepts any
    stability, so a busy CI machine still gets every point (Stability % says so)."""
    from sscd_triton.bench import sweep

    calls = tmp_path / "calls"
    fake = tmp_path / "perf_analyzer"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                    "echo 'Failed to obtain stable measurement within 4 measurement windows'\n"
                    "exit 1\n")
    fake.chmod(0o755)
    point = sweep.run_point(str(fake), "127.0.0.1:1", "sscd",
                            sweep.Point("ensemble", "concurrency", 1, 1), [], 1500,
                            str(tmp_path), 30, 4, sweep.QUICK_ATTEMPTS)
    tries = calls.read_text().splitlines()
    assert len(tries) == 4 and "--stability-percentage 10000" in tries[-1]
    assert "--measurement-interval 3000" in tries[-1] and not point.row
