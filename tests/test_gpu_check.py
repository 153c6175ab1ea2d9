"""benchmarks/gpu_check.py on the CPU (its --device cpu --smoke mode) and docker/gpu_smoke.sh
without Docker: its pure-logic functions, and its whole flow against fake docker/curl/client.

Neither can do its real work here (no GPU, no Docker daemon); these tests hold the logic,
the JSON and the exit statuses, so a lent GPU machine's minutes go to measuring.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from argparse import Namespace

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
SMOKE_SH = os.path.join(ROOT, "docker", "gpu_smoke.sh")
KEYS = {"tool", "passed", "device", "weights", "photos", "options", "bounds", "checks",
        "decode", "model", "phases_s", "elapsed_s"}


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=240):
    # as on a GPU machine with a bare checkout: the project importable through PYTHONPATH
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cpu_smoke_runs_every_phase_and_parity_passes(tmp_path):
    out = tmp_path / "sub" / "gpu_check.json"
    t = time.perf_counter()
    proc = _run("--device", "cpu", "--smoke", "--out", str(out))
    took = time.perf_counter() - t
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc) >= KEYS
    assert doc["passed"] is True and doc["options"]["smoke"] is True
    assert doc["device"]["device"] == "cpu" and doc["device"]["name"].startswith("cpu")
    marks = {c["name"]: c["mark"] for c in doc["checks"]}
    assert all(m in ("PASS", "skip") for m in marks.values()), marks
    fp16 = [n for n in marks if n.startswith("fp16 trunk")]
    # validate.model_parity at --smoke's 64x64: square batches 1, 3, 16 pass, small_288 n/a
    assert [marks[n] for n in fp16] == ["PASS", "PASS", "PASS", "skip"], marks
    decode = [n for n in marks if "decode_jpeg" in n]
    assert len(decode) == 2 and all(marks[n] == "PASS" for n in decode), marks
    for c in doc["checks"]:
        if c["mark"] == "PASS" and "nearest_ratio_max" in (c.get("figures") or {}):
            assert c["figures"]["nearest_ratio_max"] <= doc["bounds"]["nearest_ratio_max"]
    assert [(r["kind"], r["batch"]) for r in doc["decode"][:4]] == [
        ("decode", 2), ("decode+resize+normalise", 2), ("decode", 4),
        ("decode+resize+normalise", 4)]
    large = doc["decode"][4:]  # within the time box, or said to be skipped for it
    assert [r["kind"] for r in large] == [f"decode {mp} {kind}" for mp in ("2MP", "12MP")
                                          for kind in ("baseline", "progressive")]
    assert all(r.get("megapixels_per_s", 0) > 0 or r.get("skipped") == "time box" for r in large)
    cut = [n for n in marks if n.startswith("JPEG ") and " cut at " in n]
    assert len(cut) == 8 and all(marks[n] == "PASS" for n in cut), marks
    assert [(r["kind"], r["batch"]) for r in doc["model"]] == [
        ("model fp16 eager", 2), ("model fp16 eager", 4)]
    assert all(r["images_per_s"] > 0 and r["iters"] >= 1 for r in doc["decode"][:4] + doc["model"])
    # One table, the device named above it, the verdict last.
    text = proc.stdout
    assert text.index("gpu_check on cpu") < text.index("PASS  fp16 trunk")
    assert "time  model fp16 eager, batch 4" in text
    assert text.rstrip().splitlines()[-1].startswith("all parity checks passed")
    assert took < 120, f"smoke mode took {took:.0f}s"  # ~25 s on 2 busy cores


def test_without_cuda_one_line_and_exit_3(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "g.json"
    proc = _run("--out", str(out), timeout=120)
    assert proc.returncode == 3
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("args", [["--max-photos", "2"], ["--batches", "0"],
                                  ["--device", "cpu", "--photos", "/nonexistent/photos"]])
def test_bad_arguments_one_line_and_exit_2(args):
    proc = _run(*args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in lines[0], lines


def test_photos_folder_fallback(tmp_path):
    """--photos DIR: images of any supported format, non-images ignored, broken ones skipped."""
    gc = _module()
    for i, fmt in enumerate(("JPEG", "PNG", "JPEG")):
        Image.new("RGB", (40 + i, 30), (10 * i, 20, 30)).save(tmp_path / f"p{i}.{fmt.lower()}", fmt)
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    source, photos, skipped = gc.load_photos(Namespace(photos=str(tmp_path), max_photos=16))
    assert source == str(tmp_path) and [n for n, _ in photos] == ["p0.jpeg", "p1.png", "p2.jpeg"]
    assert len(skipped) == 1 and skipped[0].startswith("broken.jpg: ")
    assert all(img.mode == "RGB" for _, img in photos)
    with pytest.raises(gc.UsageError, match="at least 3"):
        gc.load_photos(Namespace(photos=str(tmp_path), max_photos=2))


def test_time_loop_respects_its_deadline():
    gc = _module()
    t = time.perf_counter()
    times = gc.time_loop("cpu", lambda: time.sleep(0.02), iters=1000, warmup=2,
                         deadline=time.perf_counter() + 0.15)
    assert 1 <= len(times) <= 10 and time.perf_counter() - t < 1.0
    row = gc._row("decode", 8, times)
    assert row["iters"] == len(times) and row["images_per_s"] > 0


def test_a_crashing_phase_is_a_failed_check_and_the_run_goes_on(capsys):
    gc = _module()
    clock, checks = gc.Clock(60), []
    with clock.phase("decode throughput", checks):
        raise RuntimeError("nvjpeg: CUDA out of memory\nmore lines")
    with clock.phase("model throughput", checks):
        pass
    assert [(c.name, c.ok) for c in checks] == [("phase: decode throughput", False)]
    assert checks[0].detail == "crashed: RuntimeError: nvjpeg: CUDA out of memory"
    assert set(clock.phases) == {"decode throughput", "model throughput"}
    assert "Traceback" in capsys.readouterr().err


# --- docker/gpu_smoke.sh -------------------------------------------------------------------
def _bash(script: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'source "{SMOKE_SH}"; {script}'], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_gpu_smoke_sh_is_valid_bash():
    proc = subprocess.run(["bash", "-n", SMOKE_SH], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(SMOKE_SH, os.X_OK)
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        proc = subprocess.run([shellcheck, SMOKE_SH], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


METRICS = """# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="sscd",version="1"} 900
nv_inference_count{model="sscd_descriptor",version="1"} 640
nv_inference_count{model="sscd_preprocess",version="1"} 640
nv_inference_exec_count{model="sscd_descriptor",version="1"} 20
nv_inference_exec_count{model="sscd_descriptor",version="2"} 5
nv_inference_count_other{model="sscd_descriptor",version="1"} 7
"""


def test_gpu_smoke_sh_metrics_and_mean_batch(tmp_path):
    m = tmp_path / "metrics"
    m.write_text(METRICS)
    proc = _bash(f'metric_value nv_inference_count sscd_descriptor < "{m}"; '
                 f'metric_value nv_inference_exec_count sscd_descriptor < "{m}"; '
                 f'echo "[$(metric_value nv_inference_count missing < "{m}")]"; '
                 'mean_batch 640 25; mean_batch 5 0; mean_batch "" 3')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["640", "25", "[]", "25.60", "n/a", "n/a"]


@pytest.mark.parametrize("records,ok", [
    ([("/w/corrupt/bad.jpg", "bad image: truncated")], True),
    ([("/w/corrupt/good.jpg", "bad image: x")], False),
    ([("/w/corrupt/bad.jpg", "r"), ("/w/corrupt/a.jpg", "r")], False),
    ([], False),
])
def test_gpu_smoke_sh_only_failure(tmp_path, records, ok):
    """On an output written by the client's own store (Parquet failure shards)."""
    import numpy as np

    from sscd_triton.client import io as outio

    out = str(tmp_path / "out")
    meta = {"model": "sscd", "model_version": "1", "sscd_model": "sscd_disc_mixup",
            "weights_sha256": "ab" * 32, "dims": 4, "preprocess": "square320",
            "preprocess_on": "server", "urls": ["127.0.0.1:8001"]}
    store = outio.ShardStore(out, meta, shard_size=2).open()
    store.add(["/w/corrupt/ok.jpg"], np.ones((1, 4), np.float32) / 2)
    for id_, why in records:
        store.fail(id_, why)
    store.close(complete=True)
    proc = _bash(f'only_failure "{out}" bad.jpg')
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    if ok:
        assert proc.stdout.strip() == "bad image: truncated"


def _fake_host(tmp_path, embed_rc: int = 0, ckpt_in_runs: bool = False, batcher: str = ""):
    """A copy of the script in a fake repository, with docker, curl and the client faked:
    the script's whole flow runs, only the commands it calls are stand-ins."""
    repo = tmp_path / "repo"
    (repo / "docker").mkdir(parents=True)
    shutil.copy(SMOKE_SH, repo / "docker" / "gpu_smoke.sh")
    shutil.copy(os.path.join(ROOT, ".dockerignore"), repo / ".dockerignore")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    scripts = {
        "docker": f"""#!/usr/bin/env bash
echo "$*" >> "{state}/docker.log"
case "$1" in
  build) echo "parity report: all checks passed" ;;
  run) echo cid123 ;;
  inspect) echo true ;;
  logs) echo "server log" ;;
esac
""",
        "curl": f"""#!/usr/bin/env bash
case "$*" in
  *health/ready*) n=$(cat "{state}/polls" 2>/dev/null || echo 0); echo $((n + 1)) > "{state}/polls"
                  [ "$n" -ge 1 ] ;;
  *metrics*) if [ -e "{state}/metrics" ]; then c=74; e=12; else c=10; e=10; touch "{state}/metrics"; fi
             printf 'nv_inference_count{{model="sscd_descriptor",version="1"}} %s\\n' $c
             printf 'nv_inference_exec_count{{model="sscd_descriptor",version="1"}} %s\\n' $e ;;
  *sscd_preprocess/config*) [[ "$*" == *"sscd-admin-key: "* ]] || exit 22
             echo '{{"name":"sscd_preprocess","max_batch_size":64{batcher}}}' ;;
esac
""",
        "python-wrapper": f"""#!/usr/bin/env bash
if [ "$1" = client/embed.py ]; then
  echo "$*" >> "{state}/embed.log"
  case "$*" in
    *corrupt_out*) mkdir -p "$6"  # $2 the input folder, $6 the --output
      printf '{{"id": "%s/corrupt-truncated.jpg", "reason": "bad image: truncated"}}\\n' "$2" \\
        > "$6/failures.jsonl"; exit 1 ;;
    *) exit {embed_rc} ;;
  esac
elif [ "$1" = -c ]; then echo 4; exit 0
fi
exec "{sys.executable}" "$@"
""",
    }
    for name, text in scripts.items():
        p = bin_ / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 48), (60 * i, 20, 30)).save(photos / f"p{i}.jpg", quality=90)
    (photos / "README.txt").write_text("not a photograph")  # left out of the embed step
    ckpt = (repo / "runs" if ckpt_in_runs else tmp_path) / "m.torchvision.pt"
    ckpt.parent.mkdir(exist_ok=True)
    ckpt.write_bytes(b"weights")
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHON": str(bin_ / "python-wrapper"),
           "POLL_S": "0", "WORK": str(tmp_path / "work"), "SSCD_ADMIN_KEY": "k"}
    proc = subprocess.run(["bash", str(repo / "docker" / "gpu_smoke.sh"), str(ckpt), str(photos)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    return proc, repo, state


@pytest.mark.parametrize("ckpt_in_runs", [False, True], ids=["outside", "runs"])
def test_gpu_smoke_sh_flow_with_fakes(tmp_path, ckpt_in_runs):
    """A checkpoint outside the repository, or in runs/ (which .dockerignore leaves out of
    the build context), is copied to weights/ and built from there."""
    proc, repo, state = _fake_host(tmp_path, ckpt_in_runs=ckpt_in_runs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for step in ("preflight", "docker build", "ready", "embed + parity", "mean batch",
                 "DALI per request", "corrupt JPEG"):
        assert any(ln.startswith("PASS") and step in ln for ln in out.splitlines()), (step, out)
    assert "32.00 = 64 inferences / 2 executions" in out
    assert "sscd_preprocess's served config has no dynamic batcher" in out
    assert "only corrupt-truncated.jpg failed (bad image: truncated), 4/4 good" in out
    docker = (state / "docker.log").read_text()
    assert "--build-arg CHECKPOINT=weights/m.torchvision.pt" in docker  # copied into the context
    assert (repo / "weights" / "m.torchvision.pt").read_bytes() == b"weights"
    assert "--gpus all" in docker and "SSCD_ADMIN_KEY=k" in docker and "stop -t 30 cid123" in docker
    assert "sscd-trt-cache:/var/cache/sscd" in docker and "DESCRIPTOR" not in docker
    embed = (state / "embed.log").read_text()
    assert "--check-parity 4 --checkpoint" in embed
    # the photographs go as a list: embed.py would record the README as a failure (exit 1)
    listed = (tmp_path / "work" / "photos.lst").read_text().split()
    assert f"@{tmp_path / 'work' / 'photos.lst'}" in embed and len(listed) == 4
    assert all(p.endswith(".jpg") for p in listed)
    assert "--header triton-grpc-protocol-sscd-admin-key=k" in embed
    assert out.rstrip().splitlines()[-1].startswith("gpu smoke: all steps passed")


def test_gpu_smoke_sh_fails_and_still_stops_the_container(tmp_path):
    proc, _, state = _fake_host(tmp_path, embed_rc=4)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert any(ln.startswith("FAIL") and "embed + parity" in ln and "exit 4" in ln
               for ln in proc.stdout.splitlines()), proc.stdout
    assert "stop -t 30 cid123" in (state / "docker.log").read_text()
    assert "1 step(s) FAILED" in proc.stdout


def test_gpu_smoke_sh_python_snippets_import():
    """The script's inline `python -c` snippets import what the package really exports
    (the fake host above stands in for them, so a renamed module would pass unseen)."""
    text = open(SMOKE_SH).read()
    imports = {m for code in re.findall(r"-c '([^']*)'", text)
               for m in re.findall(r"(?:from \S+ )?import [\w, ]+", code)}
    assert any("load_embeddings" in i for i in imports), imports
    for statement in imports:
        proc = subprocess.run([sys.executable, "-c", statement], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, f"{statement}: {proc.stderr.strip()[-300:]}"


def test_gpu_smoke_sh_fails_when_dali_batches_requests_together(tmp_path):
    # what the DALI backend's auto-complete serves (dali_backend config_tools.cc, then core)
    proc, _, _ = _fake_host(tmp_path, batcher=',"dynamic_batching":{"preferred_batch_size":[64]}')
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert any(ln.startswith("FAIL") and "DALI per request" in ln and
               "--disable-auto-complete-config" in ln for ln in proc.stdout.splitlines()), proc.stdout


def test_cut_jpegs_must_be_caught_by_the_decoder_or_the_check():
    """The H200 finding (issue 16): nvJPEG returned cut JPEGs without an error. A decoder
    that never raises still passes the row when check_complete refuses the file; a cut
    file neither refuses would fail it. Corrupt scans are reported, not bounded."""
    from sscd_triton import images, samples

    gc = _module()
    img = samples.photographs()[0][1]
    good = images.encode(samples.photographs()[1][1], "JPEG")
    cases = gc.truncation_cases(img)
    assert {cut for _, _, cut in cases} == {True, False} and len(cases) == 10

    def silent(ts):  # returns an image for anything, as the hardware path did
        return [gc.torch.zeros(3, 8, 8, dtype=gc.torch.uint8) for _ in ts]

    checks = gc.truncation_checks(good, cases, silent)
    for (label, _, cut), c in zip(cases, checks):
        assert c.name == f"JPEG {label}"
        assert c.ok is (True if cut else None), c
        assert ("check: refused (truncated JPEG" in c.detail) == cut and "decoder: no error" in c.detail

    def raising(ts):
        raise RuntimeError("nvjpeg: bitstream error\ndetail")

    checks = gc.truncation_checks(good, [("whole", good, True)], raising)
    assert checks[0].ok is True and "decoder: raised (nvjpeg: bitstream error)" in checks[0].detail
    checks = gc.truncation_checks(good, [("whole", good, True)], silent)
    assert checks[0].ok is False  # a file both let through: the row fails


def test_benchmarks_readme_states_spec_bounds():
    """benchmarks/README.md's decode parity bounds are spec.py's (issue 16 found 0.993/0.15)."""
    from sscd_triton import spec

    text = open(os.path.join(ROOT, "benchmarks", "README.md")).read()
    row = next(line for line in text.splitlines() if line.startswith("| decode parity |"))
    assert f"centred cosine >= {spec.RESAMPLED_CENTERED_COSINE_MIN}" in row
    assert f"ratio <= {spec.RESAMPLED_NEAREST_RATIO_MAX}" in row
