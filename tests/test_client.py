"""client/embed.py against the real local tritonserver (cpu repository, demo weights).

Folder outputs are Parquet (`embeddings/*.parquet`, `failures/*.parquet`); the kill -9
tests cover both resume designs: by ids (folders, globs, .npz) and by partitions
(list files, stdin).

One repository is built per session (max batch 8, to stay light) and served by one
server; the last test stops and restarts it. Every run goes through
`python client/embed.py` as a user would run it, as a subprocess.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sscd_triton.client.io import load_embeddings, load_failures, read_manifest
from sscd_triton import samples, spec
from conftest import EMBED, ROOT, embed  # noqa: F401  (the shared server fixture: triton)
from sscd_triton.serving.server import TritonServer, free_ports

TOL = 1e-5


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for path in samples.photograph_paths():
        shutil.copy(path, folder)
    return folder


def start_embed(*args, url) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, EMBED, *map(str, args), "--url", url], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def shards_in(folder: Path) -> int:
    """Embedding shards written so far (each one complete: written whole, renamed)."""
    try:
        names = os.listdir(folder / "embeddings")
    except FileNotFoundError:
        return 0
    return sum(1 for n in names if n.endswith(".parquet") and not n.startswith("."))


def wait_for_shards(folder: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while shards_in(folder) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {n} shards in {folder} after {timeout}s"
        time.sleep(0.05)


def assert_same(path, reference: dict, tol: float = TOL) -> None:
    """Every id once, the same ids as the reference, the same descriptors."""
    ids, emb = load_embeddings(str(path))
    assert len(ids) == len(set(ids.tolist())), "duplicated ids"
    assert sorted(ids.tolist()) == sorted(reference)
    worst = max(float(np.abs(e - reference[i]).max()) for i, e in zip(ids.tolist(), emb))
    assert worst <= tol, f"descriptors differ by {worst}"
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)


@pytest.fixture(scope="session")
def reference(triton, photos, tmp_path_factory):
    """The 16 photographs embedded by a plain uninterrupted run: {id: descriptor}."""
    out = tmp_path_factory.mktemp("ref") / "photos.npz"
    r = embed(photos, "--output", out, "--quiet", url=triton.server.grpc_url)
    assert r.returncode == 0, r.stderr
    assert "summary: embedded 16, failed 0" in r.stdout
    ids, emb = load_embeddings(str(out))
    return dict(zip(ids.tolist(), emb))


def _bad_png_bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)  # 900 Mpixel claimed
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_mixed_folder_every_input_accounted_once(triton, photos, reference, tmp_path):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    good = []
    for name in sorted(os.listdir(photos))[:5]:
        shutil.copy(photos / name, folder / name)
        good.append(str(folder / name))
    shutil.copy(photos / "coffee.jpg", folder / "sub" / "no_extension")  # found by signature
    good.append(str(folder / "sub" / "no_extension"))
    rocket = (photos / "rocket.jpg").read_bytes()
    hostile = {
        "empty.jpg": b"",
        "random.png": np.random.default_rng(0).bytes(5000),
        "page.jpg": b"<!doctype html><html><body>404 not found</body></html>",
        "truncated.jpg": rocket[: len(rocket) // 3],
        "fake.jpg": b"\xff\xd8\xff" + np.random.default_rng(1).bytes(700) + b"\xff\xd9",
        "bomb.png": _bad_png_bomb(),
        "sub/locked.jpg": b"secret text, not an image",
    }
    for name, data in hostile.items():
        (folder / name).write_bytes(data)
    os.chmod(folder / "sub" / "locked.jpg", 0)
    (folder / "x.jpg").mkdir()  # a directory named like an image
    os.symlink(folder / "nowhere.jpg", folder / "broken.jpg")
    (folder / "README.txt").write_text("not an image: recorded with its reason")
    from PIL import Image

    small = Image.new("RGB", (8, 8), (1, 2, 3))  # formats the server does not accept
    small.save(folder / "frame.ppm")
    small.save(folder / "shot.tga")
    (folder / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    unaccepted = ["README.txt", "frame.ppm", "shot.tga", "drawing.svg"]
    missing = str(tmp_path / "vanished.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text(f"{missing}\n{good[0]}\n{folder}/x.jpg\n")  # the last two: duplicates
    bad = {str(folder / n) for n in hostile} | {str(folder / "x.jpg"), str(folder / "broken.jpg"),
                                                missing} | {str(folder / n) for n in unaccepted}
    out = tmp_path / "mixed.npz"
    args = (folder, f"@{lst}", "--output", out, "--batch-size", "8", "--quiet")

    r = embed(*args, url=triton.server.grpc_url)
    assert r.returncode == 1, r.stderr  # completed, with failures
    ids = load_embeddings(str(out))[0].tolist()
    failures = load_failures(str(out))
    failed = [f["id"] for f in failures]
    assert len(ids) == len(set(ids)) and len(failed) == len(set(failed))
    assert set(ids) == set(good) and set(failed) == bad  # each exactly once, in one place
    assert_same(out, {i: reference[str(photos / os.path.basename(i))] for i in good
                      if os.path.basename(i) in os.listdir(photos)} | {
        good[-1]: reference[str(photos / "coffee.jpg")]}, tol=TOL)
    reasons = {os.path.relpath(f["id"], folder): f["reason"] for f in failures}
    assert all(len(reason.split()) >= 4 for reason in reasons.values()), reasons
    assert reasons["empty.jpg"] == "the file is empty (0 bytes)"
    assert reasons["x.jpg"] == "it is a directory, not an image file"
    assert reasons["broken.jpg"].startswith("broken symbolic link")
    assert reasons[os.path.relpath(missing, folder)].startswith("no such file")
    # refused before sending, with the reason the server's own check gives (issue 16)
    for name in ("random.png", "page.jpg"):
        assert reasons[name].startswith("not a usable image: not an image: "), reasons
    assert reasons["fake.jpg"].startswith("not a usable image: truncated JPEG: a segment"), reasons
    assert reasons["truncated.jpg"].startswith("not a usable image: truncated JPEG"), reasons
    assert "too large" in reasons["bomb.png"]
    if os.geteuid() != 0:  # root reads chmod 000 files: then the server rejects the text
        assert "permission denied" in reasons["sub/locked.jpg"]
    for name in unaccepted:  # nothing given is silently dropped
        kind = os.path.splitext(name)[1]
        assert reasons[name].startswith(f"not an accepted image type ({kind}): "), reasons
    summary = next(x for x in r.stdout.splitlines() if x.startswith("summary:"))
    assert summary.startswith("summary: embedded 6, failed 14 (4 not an accepted image type: ")
    assert all(f"{kind} 1" in summary for kind in (".txt", ".ppm", ".tga", ".svg")), summary
    # the first reasons are shown, and how many more
    lines = r.stdout.splitlines()
    at = lines.index(f"failures (first 5, 9 more; all in {tmp_path / 'mixed.failures.jsonl'}):")
    shown = [x.strip().split(": ", 1) for x in lines[at + 1:at + 6]]
    assert all(reasons[os.path.relpath(i, folder)] == why for i, why in shown), shown
    assert (tmp_path / "mixed.failures.jsonl").exists()
    assert not (tmp_path / "mixed.npz.partial").exists()

    again = embed(*args, url=triton.server.grpc_url)  # nothing new: same result, same status
    assert again.returncode == 1, again.stderr
    assert "summary: embedded 0, failed 0, skipped 22 (done before" in again.stdout
    assert "failures (first 5, 9 more" in again.stdout  # why the status is 1
    assert sorted(load_embeddings(str(out))[0].tolist()) == sorted(ids)
    assert sorted(f["id"] for f in load_failures(str(out))) == sorted(failed)


def test_one_id_per_file_however_named(triton, photos, reference, tmp_path):
    """dir, ./dir, /abs/dir and a symbolic link to it are the same 16 files: embedded
    once, ids their resolved paths; an output written with the old ids (as given,
    relative or through the link) is resumed without embedding anything again."""
    folder = tmp_path / "dir"
    shutil.copytree(photos, folder)
    os.symlink(folder, tmp_path / "link")
    names = sorted(os.listdir(folder))
    expected = {str(folder / n): reference[str(photos / n)] for n in names}
    out = tmp_path / "out"
    r = embed("dir", "./dir", "--output", out, "--quiet", url=triton.server.grpc_url,
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "summary: embedded 16, failed 0, skipped 16 " in r.stdout, r.stdout
    r = embed(folder, "link", "link/", "--output", out, "--quiet", url=triton.server.grpc_url,
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "summary: embedded 0, failed 0, skipped 48 " in r.stdout, r.stdout
    assert_same(out, expected)

    # an output of an older embed.py: ids as given (relative, or through the link)
    old = tmp_path / "old"
    listing = tmp_path / "old.txt"
    listing.write_text("".join(f"{'dir' if k % 2 else 'link'}/{n}\n"
                               for k, n in enumerate(names)))
    r = embed(f"@{listing}", "--output", old, "--partition-size", "0", "--quiet",
              url=triton.server.grpc_url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(str(old))
    del manifest["ids"]  # as an older embed.py wrote it
    (old / "manifest.json").write_text(json.dumps(manifest))
    r = embed("link", "--output", old, "--quiet", url=triton.server.grpc_url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "summary: embedded 0, failed 0, skipped 16 " in r.stdout, r.stdout
    assert read_manifest(str(old))["ids"] == "as given"  # kept: its shards still hold them


def test_parquet_output_from_stdin(triton, photos, reference, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "sharded"
    paths = "".join(f"{photos / n}\n" for n in sorted(os.listdir(photos)))
    r = embed("-", "--output", out, "--shard-size", "5", "--batch-size", "4", "--quiet",
              url=triton.server.grpc_url, stdin=paths)
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(str(out))
    assert manifest["complete"] and manifest["count"] == 16 and manifest["failures"] == 0
    assert manifest["dims"] == 512 and manifest["model"] == "sscd"
    assert manifest["preprocess"] == "square320" and manifest["urls"] == [triton.server.grpc_url]
    assert manifest["model_version"] == "1" and manifest["resume"] == "partitions"
    config = (triton.repo / "sscd" / "config.pbtxt").read_text()
    if "sscd_weights_sha256" in config:  # the repository records its weights
        assert len(manifest["weights_sha256"]) == 64 and manifest["weights_sha256"] in config
        assert manifest["sscd_model"] in config
    assert shards_in(out) >= 2 and load_failures(str(out)) == []
    table = pq.read_table(out / "embeddings")  # a plain Parquet dataset
    assert table.num_rows == 16 and table.column_names == ["id", "embedding"]
    assert table.schema.field("embedding").type.list_size == 512
    meta = table.schema.metadata
    assert meta[b"model"] == b"sscd" and meta[b"preprocess"] == b"square320"
    assert meta[b"weights_sha256"].decode() == str(manifest["weights_sha256"] or "unknown")
    assert_same(out, reference)
    assert f"note: the server serves {spec.DEMO_NOTE}" in r.stdout  # the demo repository


def test_kill_9_then_resume(triton, photos, reference, tmp_path):
    out = tmp_path / "killed.npz"
    args = (photos, "--output", out, "--batch-size", "2", "--shard-size", "2",
            "--concurrency", "1", "--quiet")
    proc = start_embed(*args, url=triton.server.grpc_url)
    wait_for_shards(tmp_path / "killed.npz.partial", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and shards_in(tmp_path / "killed.npz.partial") < 8

    r = embed(*args, url=triton.server.grpc_url)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "skipped 0 " not in r.stdout
    assert_same(out, reference)
    assert load_failures(str(out)) == []


def test_kill_9_then_resume_partitioned(triton, photos, reference, tmp_path):
    """A list file cut into partitions of 4 lines: killed mid-run, the rerun skips the
    finished partitions (their markers) and completes with every input once."""
    lst = tmp_path / "photos.txt"
    lst.write_text("".join(f"{photos / n}\n" for n in sorted(os.listdir(photos))))
    out = tmp_path / "parts"
    args = (f"@{lst}", "--output", out, "--batch-size", "2", "--shard-size", "2",
            "--partition-size", "4", "--concurrency", "1", "--quiet")
    proc = start_embed(*args, url=triton.server.grpc_url)
    wait_for_shards(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(os.listdir(out / "partitions"))
    assert done_before < 4 and shards_in(out) < 8

    r = embed(*args, url=triton.server.grpc_url)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "skipped 0 " not in r.stdout
    assert_same(out, reference)
    assert load_failures(str(out)) == []
    assert len([n for n in os.listdir(out / "partitions") if n.endswith(".json")]) == 4
    again = embed(*args, url=triton.server.grpc_url)
    assert again.returncode == 0 and "skipped 16 (done before" in again.stdout


def test_resume_with_another_model_is_refused(triton, photos, reference, tmp_path):
    """The same repository with another weights fingerprint in its configs (as a rebuild
    from another checkpoint writes): resuming an output of the first is refused, in one
    line naming both."""
    import re

    repo = tmp_path / "repo2"
    shutil.copytree(triton.repo, repo, symlinks=True)
    for config in repo.glob("*/config.pbtxt"):
        text = config.read_text()
        param = ('parameters {\n  key: "sscd_weights_sha256"\n  value {\n    string_value: "'
                 + "f" * 64 + '"\n  }\n}\n')
        text, n = re.subn(r'parameters \{\s*key: "sscd_weights_sha256"\s*value \{\s*'
                          r'string_value: "[0-9a-f]*"\s*\}\s*\}\n?', param, text)
        config.write_text(text if n else text + param)
    some = [str(photos / n) for n in sorted(os.listdir(photos))[:3]]
    out = tmp_path / "out"
    r = embed(*some[:2], "--output", out, "--quiet", url=triton.server.grpc_url)
    assert r.returncode == 0, r.stderr
    server = TritonServer(repo, log_path=tmp_path / "other.log").start()
    try:
        r = embed(*some, "--output", out, "--quiet", url=server.grpc_url)
        assert r.returncode == 2, r.stderr
        lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and "use another --output" in lines[0], r.stderr
        assert "ffffffffffff" in lines[0] and "holds descriptors of sscd v1" in lines[0]
        assert read_manifest(str(out))["weights_sha256"] != "f" * 64
        assert_same(out, {i: reference[i] for i in some[:2]})  # nothing mixed in
    finally:
        server.stop()


def test_http_port_and_missing_inputs_say_so(triton, photos, tmp_path):
    http = f"127.0.0.1:{triton.server.http_port}"
    start = time.monotonic()
    r = embed(photos, "--output", tmp_path / "h", "--quiet", url=http)  # fast at start too
    assert time.monotonic() - start < 20
    assert r.returncode == 3, r.stderr
    assert f"{http} looks like Triton's HTTP port; gRPC is usually 8001" in r.stderr.splitlines()[-1]
    r = embed(photos, tmp_path / "nowhere.jpg", "--output", tmp_path / "m", "--quiet",
              url=triton.server.grpc_url)
    assert r.returncode == 2 and f"error: {tmp_path / 'nowhere.jpg'}: no such file or directory" \
        in r.stderr
    assert not (tmp_path / "m").exists()  # before anything ran


@pytest.mark.parametrize("where", ["refused", "unknown host"])
def test_wrong_address_fails_fast(photos, tmp_path, where):
    """A server that is not there at start is one error line within seconds (exit 3),
    not the patient --give-up-after (120 s) meant for servers lost mid-run."""
    url = (f"127.0.0.1:{free_ports(1)[0]}" if where == "refused"
           else "no-such-host.invalid:8001")
    start = time.monotonic()
    r = embed(photos, "--output", tmp_path / "none", "--quiet", url=url)
    assert time.monotonic() - start < 20
    assert r.returncode == 3, r.stderr
    errors = r.stderr.strip().splitlines()  # with --quiet: that one line, nothing else
    assert len(errors) == 1 and errors[0].startswith("error: could not start: "), r.stderr
    assert f"{url} (" in errors[0] and "Nothing was written" in errors[0], errors
    assert not (tmp_path / "none").exists()


def test_dead_endpoint_taken_out_of_rotation(triton, photos, reference, tmp_path):
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    out = tmp_path / "two.npz"
    r = embed(photos, "--output", out, "--batch-size", "2", "--concurrency", "4", "--url", dead,
              "--quiet", url=triton.server.grpc_url)
    assert r.returncode == 0, r.stderr
    assert f"{dead} out of rotation" in r.stderr
    assert_same(out, reference)


def test_client_side_preprocessing(triton, photos, reference, tmp_path):
    out = tmp_path / "client"
    r = embed(photos, "--output", out, "--preprocess", "client", "--quiet",
              url=triton.server.grpc_url)
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(str(out))
    assert manifest["model"] == "sscd_descriptor" and manifest["preprocess_on"] == "client"
    assert_same(out, reference)
    # descriptors of another pipeline never go into the same output
    mixed = embed(photos, "--output", out, "--quiet", url=triton.server.grpc_url)
    assert mixed.returncode == 2 and "use another --output" in mixed.stderr


def test_system_shared_memory(triton, photos, reference, tmp_path):
    before = set(os.listdir("/dev/shm"))
    out = tmp_path / "shm.npz"
    r = embed(photos, "--output", out, "--shared-memory", "system", "--batch-size", "4",
              "--quiet", url=triton.server.grpc_url)
    assert r.returncode == 0, r.stderr
    assert_same(out, reference)
    some = [str(photos / n) for n in sorted(os.listdir(photos))[:4]]
    out2 = tmp_path / "shm-client.npz"
    r = embed(*some, "--output", out2, "--shared-memory", "system", "--preprocess", "client",
              "--quiet", url=triton.server.grpc_url)
    assert r.returncode == 0, r.stderr
    assert_same(out2, {i: reference[i] for i in some})
    leaked = [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("sscd_embed_")]
    assert not leaked


def test_parity_table_and_bound(triton, photos, reference, tmp_path):
    out = tmp_path / "parity"
    some = [str(photos / n) for n in sorted(os.listdir(photos))[:6]]
    r = embed(*some, "--output", out, "--check-parity", "6", "--checkpoint", triton.checkpoint,
              "--quiet", url=triton.server.grpc_url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "centered cosine (min)" in r.stdout and "top-1 agreement" in r.stdout
    assert "all checks passed" in r.stdout and "FAIL" not in r.stdout

    from sscd_triton.export.demo import write_demo_checkpoint

    other = write_demo_checkpoint(str(tmp_path / "other.torchvision.pt"), seed=1)
    r = embed(*some, "--output", out, "--check-parity", "6", "--checkpoint", other, "--quiet",
              url=triton.server.grpc_url)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "FAIL" in r.stdout and "parity FAILED" in r.stdout


def test_client_is_torch_free_and_usage_errors(triton, photos, tmp_path):
    code = ("import sys; from client import embed; "
            f"rc = embed.main([{str(photos / 'coins.jpg')!r}, '--url', {triton.server.grpc_url!r},"
            f" '--output', {str(tmp_path / 'one.npz')!r}, '--quiet']); "
            "print('TORCH', 'torch' in sys.modules, rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert "TORCH False 0" in r.stdout, r.stdout + r.stderr
    url = triton.server.grpc_url
    for args, message in [
        ((photos, "--output", tmp_path / "x", "--batch-size", "0"), "--batch-size must be >= 1"),
        ((photos, "--output", tmp_path / "x", "--check-parity", "3"), "needs --checkpoint"),
        ((photos, "--output", tmp_path / "x", "--preprocess-mode", "short288"),
         "the server preprocesses with square320"),
    ]:
        r = embed(*args, url=url)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    r = embed("--help")
    assert r.returncode == 0 and "Exit status" in r.stdout and "130" in r.stdout
    assert "(default: 8)" in r.stdout and "(default: 10000)" in r.stdout


def test_restricted_admin_apis(triton, photos, reference, tmp_path):
    """docker/entrypoint.sh restricts model-config and shared-memory behind a header: the
    client still embeds without it (model metadata instead of config), and says which
    flag to add when --shared-memory needs it."""
    server = TritonServer(triton.repo, log_path=tmp_path / "restricted.log", extra_args=[
        "--grpc-restricted-protocol=shared-memory,model-config:sscd-admin-key=s3cret"]).start()
    try:
        some = [str(photos / n) for n in sorted(os.listdir(photos))[:3]]
        r = embed(*some, "--output", tmp_path / "plain.npz", "--quiet", url=server.grpc_url)
        assert r.returncode == 0, r.stderr
        assert_same(tmp_path / "plain.npz", {i: reference[i] for i in some})
        r = embed(*some, "--output", tmp_path / "shm.npz", "--shared-memory", "system", "--quiet",
                  url=server.grpc_url, timeout=60)
        assert r.returncode == 2 and "restricts this API" in r.stderr and "--header" in r.stderr
        r = embed(*some, "--output", tmp_path / "shm.npz", "--shared-memory", "system", "--quiet",
                  "--header", "triton-grpc-protocol-sscd-admin-key=s3cret", url=server.grpc_url)
        assert r.returncode == 0, r.stderr
        assert_same(tmp_path / "shm.npz", {i: reference[i] for i in some})
    finally:
        server.stop()


def test_server_restart_mid_run(triton, photos, reference, tmp_path):
    """Last: stops the session's server. Run A (default --give-up-after) must ride out the
    restart; run B (--give-up-after 3) must stop with exit 3, keep its shards, and finish
    when rerun. Both are frozen (SIGSTOP) while the server stops, so both are mid-run."""
    url = triton.server.grpc_url
    common = (photos, "--batch-size", "1", "--shard-size", "1", "--concurrency", "1", "--quiet")
    a_out, b_out = tmp_path / "a", tmp_path / "b"
    a = start_embed(*common, "--output", a_out, url=url)
    b = start_embed(*common, "--output", b_out, "--give-up-after", "3", url=url)
    for proc, out in ((a, a_out), (b, b_out)):  # freeze each mid-run, so that neither
        wait_for_shards(out, 1, proc)  # finishes before the outage, however fast it is
        proc.send_signal(signal.SIGSTOP)
    old = triton.server
    old.stop(timeout=3)  # SIGTERM, then SIGKILL: frozen clients would hold a graceful stop
    for proc in (a, b):
        proc.send_signal(signal.SIGCONT)
    _, b_err = b.communicate(timeout=120)
    assert b.returncode == 3, b_err
    assert "could not finish" in b_err and "rerun the same command to resume" in b_err
    kept = shards_in(b_out)
    assert 1 <= kept < 16
    triton.server = TritonServer(triton.repo, grpc_port=old.grpc_port, http_port=old.http_port,
                                 metrics_port=old.metrics_port,
                                 log_path=triton.work / "server2.log").start()
    a_stdout, a_err = a.communicate(timeout=240)
    assert a.returncode == 0, a_err
    assert "out of rotation" in a_err and "answers again" in a_err
    assert_same(a_out, reference)

    r = embed(*common, "--output", b_out, url=url)
    assert r.returncode == 0, r.stderr
    assert f"skipped {kept} (done before" in r.stdout
    assert_same(b_out, reference)
    assert json.loads((b_out / "manifest.json").read_text())["complete"] is True


def test_sigterm_mid_run_exits_3_promptly_then_resumes(triton, photos, reference, tmp_path):
    """A server stopped the way Docker and Kubernetes stop it (SIGTERM: it drains, answers
    UNAVAILABLE "Server is stopping..." and exits) in the middle of a run: embed.py exits 3
    within --give-up-after plus the drain, and does not hang at exit (it once did: a
    task left in Condition.wait); the rerun against the restarted server completes with
    every input once and the reference descriptors."""
    folder = tmp_path / "many"
    folder.mkdir()
    names = sorted(os.listdir(photos))
    expected = {}
    for k in range(192):
        name = names[k % len(names)]
        copy = folder / f"{k:03d}-{name}"  # copies: a symbolic link's id is its target
        shutil.copyfile(photos / name, copy)
        expected[str(copy)] = reference[str(photos / name)]
    server = TritonServer(triton.repo, log_path=tmp_path / "sigterm.log").start()
    out = tmp_path / "out"
    args = (folder, "--output", out, "--batch-size", "2", "--concurrency", "2",
            "--shard-size", "4", "--give-up-after", "5", "--quiet")
    try:
        proc = start_embed(*args, url=server.grpc_url)
        wait_for_shards(out, 2, proc)
        server.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - stopped
        assert proc.returncode == 3, err
        assert "could not finish" in err and "rerun the same command to resume" in err
        assert elapsed < 5 + 25, f"exit 3 took {elapsed:.0f}s after SIGTERM"
        kept = shards_in(out)
        assert 0 < kept * 4 < len(expected)
        server.process.wait(timeout=60)  # graceful stop done
        server.stop()
        server = TritonServer(triton.repo, grpc_port=server.grpc_port,
                              http_port=server.http_port, metrics_port=server.metrics_port,
                              log_path=tmp_path / "sigterm2.log").start()
        r = embed(*args, url=server.grpc_url)
        assert r.returncode == 0, r.stderr
        assert "resuming" in r.stderr
        assert_same(out, expected)
        assert load_failures(str(out)) == []
    finally:
        server.stop()


PREVIOUS = Path(__file__).parent / "data" / "embed-0.1.0"
FIRST = ["astronaut", "brick", "camera", "cell"]
ALL = FIRST + ["chelsea", "coffee", "coins", "rocket"]


@pytest.mark.parametrize("layout,partition", [("partitioned", "2"), ("ids", "0")])
def test_resumes_an_output_of_the_previous_version(triton, tmp_path, layout, partition):
    """Outputs written by sscd-triton 0.1.0 before the engine moved into the library
    (tests/data/embed-0.1.0: `photos/<name>.jpg` listed on stdin, the first four
    embedded): the current sscd-embed keeps them, embeds only the rest, and ends where
    one uninterrupted run of the current version ends."""
    (tmp_path / "photos").mkdir()
    for path in samples.photograph_paths():
        if Path(path).stem in ALL:
            shutil.copy(path, tmp_path / "photos")
    listing = "".join(f"photos/{n}.jpg\n" for n in ALL)
    assert (PREVIOUS / "first.txt").read_text() == "".join(f"photos/{n}.jpg\n" for n in FIRST)
    shutil.copytree(PREVIOUS / layout, tmp_path / "out")
    url = triton.server.grpc_url
    r = embed("-", "--partition-size", partition, "--output", "out", "--quiet", url=url,
              stdin=listing, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "embedded 4, failed 0, skipped 4" in r.stdout, r.stdout
    fresh = embed("-", "--partition-size", partition, "--output", "fresh", "--quiet", url=url,
                  stdin=listing, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    ids, emb = load_embeddings(str(tmp_path / "out"))
    ids2, emb2 = load_embeddings(str(tmp_path / "fresh"))
    assert sorted(ids) == sorted(ids2) == sorted(f"photos/{n}.jpg" for n in ALL)
    order, order2 = np.argsort(ids), np.argsort(ids2)
    cos = np.sum(emb[order] * emb2[order2], axis=1)
    assert cos.min() > 0.9999, cos


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_mid_run_says_so_and_resumes(triton, photos, reference, tmp_path, sig):
    """Ctrl-C or SIGTERM mid-run: exit 130, one line saying what is kept; the rerun
    finishes the job."""
    out = tmp_path / "stopped"
    args = (photos, "--output", out, "--batch-size", "1", "--shard-size", "1",
            "--concurrency", "1", "--quiet")
    proc = start_embed(*args, url=triton.server.grpc_url)
    wait_for_shards(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert re.search(r"^interrupted: \d+ embedded, 0 failed in .*stopped; rerun the same "
                     r"command to resume$", err, re.M), err
    assert "Traceback" not in err
    r = embed(*args, url=triton.server.grpc_url)
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr
    assert_same(out, reference)


def test_interrupted_while_starting_says_so(tmp_path):
    """Ctrl-C while the server is still being asked what it serves (here: a port that
    takes connections and never answers): exit 130 and the same one line."""
    import socket as _socket

    listener = _socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    url = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        proc = start_embed(ROOT / "sscd_triton" / "data" / "photos", "--output",
                           tmp_path / "out", "--quiet", url=url)
        time.sleep(2.5)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        listener.close()
    assert proc.returncode == 130, err
    assert err.strip() == ("interrupted: nothing was written; rerun the same command to "
                           "resume"), err
