"""benchmarks/reliability.py --short against the real local tritonserver (issue 10).

One run (about 1 min of scenarios after a 1 min repository build on 2 cores) checks the
behaviours: zero failed requests in the soak, nothing lost or duplicated by sscd-embed
across a server SIGKILL and restart, queue-full refusals that arrive at once, a server
still ready after hostile traffic, restricted APIs refused without the key and a server
bound to 127.0.0.1. Latency figures are printed, never asserted against a fixed number.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "reliability.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "reliability.py"), "--short",
         "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:])
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def _checks(result, prefix):
    found = [c for c in result["checks"] if c["name"].startswith(prefix)]
    assert found, f"no {prefix} checks"
    return found


def test_every_check_passes_and_the_table_is_printed(short_run):
    proc, result = short_run
    failed = [f"{c['name']}: {c['detail']}" for c in result["checks"] if c["ok"] is False]
    assert proc.returncode == 0 and not failed, failed
    table = proc.stdout[proc.stdout.index("| scenario |"):]
    for scenario in ("soak", "hostile", "sigterm", "faults", "overload", "security"):
        assert f"| {scenario} |" in table
    assert result["mode"] == "short" and result["machine"]["cpus_usable"] >= 1


def test_soak_has_no_failures_and_reports_memory(short_run):
    _, result = short_run
    soak = result["scenarios"]["soak"]
    assert soak["requests"] > 0 and soak["failures"] == 0
    for key in ("server_rss_mb_start", "server_rss_mb_end", "client_rss_mb_start",
                "client_rss_mb_end", "p50_ms_start", "p50_ms_end", "p99_ms_end"):
        assert soak[key] is not None and soak[key] > 0, key
    assert soak["max_abs_diff_vs_first_answer"] <= 1e-5


def test_sigkill_restart_loses_and_duplicates_nothing(short_run):
    _, result = short_run
    faults = result["scenarios"]["faults"]
    assert faults["kills"] >= 1 and faults["client_exit"] == 0
    assert faults["embedded"] == faults["inputs"]
    assert faults["lost"] == faults["duplicated"] == faults["failures"] == 0


def test_sigterm_answers_in_flight_and_exits_in_time(short_run):
    _, result = short_run
    s = result["scenarios"]["sigterm"]
    # Triton 2.51's ensemble does not drain: a request between its steps gets UNAVAILABLE
    # "Server is stopping" (retryable), so completion is reported, not asserted.
    assert s["in_flight_at_sigterm"] > 0 and s["hung"] == 0
    assert s["in_flight_completed"] + s["in_flight_refused_server_stopping"] == s["in_flight_at_sigterm"]
    assert s["exit_code"] == 0 and s["exit_s"] <= s["exit_timeout_s"] + 5


def test_overload_refuses_at_once_and_embed_completes(short_run):
    _, result = short_run
    o = result["scenarios"]["overload"]
    assert o["refused_queue_full"] > 0 and o["other_errors"] == 0
    assert o["refusal_ms_p50"] < 0.25 * o["answer_ms_p50"]
    assert o["embed_exit"] == 0 and o["embed_embedded"] == o["embed_inputs"]
    assert o["embed_duplicated"] == o["embed_lost"] == 0


def test_hostile_traffic_leaves_the_server_ready(short_run):
    _, result = short_run
    h = result["scenarios"]["hostile"]
    assert h["bad_requests"] > 0 and h["unexpected"] == 0
    assert h["readiness_polls"] > 0 and h["not_ready"] == 0


def test_loopback_only_and_restricted_apis_need_the_key(short_run):
    _, result = short_run
    sec = result["scenarios"]["security"]
    for addrs in sec["bound"].values():
        assert addrs and set(addrs) <= {"127.0.0.1", "::ffff:127.0.0.1"}, sec["bound"]
    assert all(r["without key"] == "restricted" for r in sec["grpc"].values()), sec["grpc"]
    assert all(r["with key"] != "restricted" for r in sec["grpc"].values()), sec["grpc"]
    assert sec["http_model_config"]["without key"].startswith("403")
    assert all(c["ok"] for c in _checks(result, "security:"))


def test_bad_arguments_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "reliability.py"),
                           "--repository", str(tmp_path / "none")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no such folder" in proc.stderr
