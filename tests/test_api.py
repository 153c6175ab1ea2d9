"""The Python client API (sscd_triton.Client / AsyncClient) against the session's real
tritonserver (cpu repository, demo weights, max batch 8): the same descriptors as
sscd-embed for every input form, order, per-item errors, typed server errors, the
embed_files job, and the examples."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import sscd_triton
from sscd_triton import AsyncClient, BadImage, Client, samples
from sscd_triton.client import api, exceptions, model_info, transport
from sscd_triton.serving.server import free_ports
from conftest import ROOT, embed  # noqa: F401  (the shared server fixture: triton)

TOL = 1e-5
PNG_BOMB_REASON = "the server rejected it as a bad image"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api_photos")
    for path in samples.photograph_paths()[:6]:
        shutil.copy(path, folder)
    return sorted(str(p) for p in folder.iterdir())


@pytest.fixture(scope="module")
def reference(triton, photos, tmp_path_factory):
    """sscd-embed's descriptors of the photos: {path: descriptor}."""
    out = tmp_path_factory.mktemp("api_ref") / "ref.npz"
    r = embed(os.path.dirname(photos[0]), "--output", out, "--quiet", url=triton.server.grpc_url)
    assert r.returncode == 0, r.stderr
    ids, emb = sscd_triton.load_embeddings(str(out))
    return dict(zip(ids.tolist(), emb))


@pytest.fixture(scope="module")
def client(triton):
    with Client(triton.server.grpc_url, batch_size=3, concurrency=4) as c:
        yield c


def png_bomb() -> bytes:
    """A complete PNG claiming 900 Mpixel: passes the client's check, the server refuses."""
    import struct
    import zlib

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_every_form_gives_sscd_embeds_descriptor(client, photos, reference):
    info = client.model_info
    assert info.model == "sscd" and info.dims == client.dims == 512 and info.max_batch == 8
    assert info.sscd_model == "demo-untrained" and len(info.weights_sha256) == 64
    from pathlib import Path

    path = photos[0]
    img = Image.open(path)
    rgb = np.asarray(img.convert("RGB"))
    gray = img.convert("L")
    forms = [path, Path(path), open(path, "rb").read(), bytearray(open(path, "rb").read()),
             img, rgb, gray, np.asarray(gray), np.asarray(gray)[:, :, None]]
    emb = client.embed(forms)
    assert emb.shape == (len(forms), 512) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    assert np.abs(emb[0] - reference[path]).max() <= TOL  # sscd-embed's descriptor
    for row in emb[1:6]:  # the same pixels, whichever form
        assert float(row @ emb[0]) >= 0.9999
    # grayscale: the server converts L to RGB as PIL does, whichever form
    grays = client.embed([images_file(gray)])
    for row in emb[6:]:
        assert float(row @ grays[0]) >= 0.9999
    assert client.last_errors == {}


def images_file(img: Image.Image) -> bytes:
    from sscd_triton import images

    return images.encode(img, "PNG")


def test_order_kept_across_batches_and_forms(client, photos, reference):
    items, want = [], []
    for k in range(20):  # batch size 3: several requests in flight, mixed forms
        path = photos[k % len(photos)]
        items.append([path, open(path, "rb").read()][k % 2])
        want.append(reference[path])
    emb = client.embed(items)
    assert np.abs(emb - np.stack(want)).max() <= TOL


def test_bad_items_raise_after_the_good_ones(client, photos, reference, tmp_path):
    missing = str(tmp_path / "missing.jpg")
    items = [photos[0], b"not an image", photos[1], missing, png_bomb(), photos[2]]
    with pytest.raises(BadImage) as caught:
        client.embed(items)
    e = caught.value
    assert isinstance(e, ValueError) and isinstance(e, exceptions.SSCDError)
    assert e.index == 1 and e.reason.startswith("not a usable image: not an image")
    assert sorted(e.errors) == [1, 3, 4] and "no such file" in e.errors[3]
    assert e.errors[4].startswith(PNG_BOMB_REASON), e.errors[4]
    assert str(e).startswith("item 1: not a usable image") and "2 more" in str(e)
    assert client.last_errors == e.errors
    good = [0, 2, 5]
    clean = client.embed([items[i] for i in good])
    assert np.abs(e.embeddings[good] - clean).max() <= 1e-6  # the good rows, as if alone
    assert np.isnan(e.embeddings[[1, 3, 4]]).all()
    for i, row in zip(good, clean):
        assert np.abs(row - reference[items[i]]).max() <= TOL

    emb = client.embed(items, errors="nan")
    assert np.array_equal(emb, e.embeddings, equal_nan=True)
    assert client.last_errors == e.errors
    assert client.embed([photos[0]]).shape == (1, 512) and client.last_errors == {}
    assert client.embed([]).shape == (0, 512)


def test_mistakes_in_the_call_are_not_bad_images(client, photos):
    with pytest.raises(TypeError, match=r"\[item\]"):
        client.embed(photos[0])  # a lone path, not a list
    with pytest.raises(TypeError, match="item 1: embed takes"):
        client.embed([photos[0], 3])
    with pytest.raises(TypeError, match="item 0: a numpy image must be uint8"):
        client.embed([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(sscd_triton.UsageError):
        client.embed([photos[0]], errors="ignore")


def test_client_side_preprocessing(triton, photos, reference):
    with Client(triton.server.grpc_url, preprocess="client") as c:
        assert c.model_info.model == "sscd_descriptor"
        emb = c.embed([photos[0], Image.open(photos[1]), b"junk"], errors="nan")
    assert float(emb[0] @ reference[photos[0]]) >= 0.9999
    assert float(emb[1] @ reference[photos[1]]) >= 0.9999
    assert np.isnan(emb[2]).all() and c.last_errors[2].startswith("not a usable image")


def test_async_client_with_a_dead_url(triton, photos, reference):
    dead = f"127.0.0.1:{free_ports(1)[0]}"

    async def go():
        async with AsyncClient([dead, triton.server.grpc_url], batch_size=2) as c:
            one, two = await asyncio.gather(c.embed(photos), c.embed(photos[::-1]))
            return one, two, c.model_info

    one, two, info = asyncio.run(go())
    want = np.stack([reference[p] for p in photos])
    assert np.abs(one - want).max() <= TOL and np.abs(two - want[::-1]).max() <= TOL
    assert info.dims == 512


def test_no_server_is_server_unavailable_quickly():
    url = f"127.0.0.1:{free_ports(1)[0]}"
    start = time.monotonic()
    with pytest.raises(sscd_triton.ServerUnavailable, match=f"no server within .*{url}"):
        Client(url).__enter__()
    assert time.monotonic() - start < model_info.START_TIMEOUT + 3
    with pytest.raises(sscd_triton.ServerUnavailable):
        asyncio.run(AsyncClient(url).embed([b"x"]))


def test_unknown_model_is_a_usage_error(triton):
    with pytest.raises(sscd_triton.UsageError, match="does not serve model 'nope'"):
        with Client(triton.server.grpc_url, model="nope"):
            pass


def test_requests_that_keep_timing_out(triton, photos):
    with Client(triton.server.grpc_url, timeout=0.001, give_up_after=1.0) as c:
        c._async.last_errors = {0: "an earlier call's"}
        start = time.monotonic()
        with pytest.raises(sscd_triton.RequestTimeout) as caught:
            c.embed(photos[:2])
        assert time.monotonic() - start < 15
        assert c.last_errors == {}  # not the earlier call's
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, sscd_triton.ServerUnavailable)  # sscd-embed: exit 3


def test_give_up_kinds_map_to_typed_errors():
    assert isinstance(api.typed(transport.Overloaded("full"), ["a:1"]),
                      sscd_triton.ServerOverloaded)
    assert isinstance(api.typed(transport.TimedOut("slow"), ["a:1"]), sscd_triton.RequestTimeout)
    assert type(api.typed(transport.NoAnswer("gone"), ["a:1"])) is sscd_triton.ServerUnavailable
    assert isinstance(api.typed(transport.Fatal("no model"), ["a:1"]), sscd_triton.UsageError)
    for kind in (transport.Overloaded, transport.TimedOut, transport.NoAnswer):
        assert issubclass(kind, transport.GiveUp)


def test_embed_files_is_sscd_embeds_job(triton, photos, reference, tmp_path):
    out = tmp_path / "out"
    seen = []
    with Client(triton.server.grpc_url) as c:
        summary = c.embed_files(os.path.dirname(photos[0]), output=out,
                                progress=lambda *a: seen.append(a))
        assert summary.new_embedded == len(photos) and summary.failed == 0
        assert seen[-1][:2] == (len(photos), 0) and seen[-1][2] in (None, len(photos))
        ids, emb = sscd_triton.load_embeddings(str(out))
        assert sorted(ids.tolist()) == sorted(reference)
        for i, e in zip(ids.tolist(), emb):
            assert np.abs(e - reference[i]).max() <= TOL
        again = c.embed_files([os.path.dirname(photos[0])], output=out, shard_size=2)
        assert again.new_embedded == 0 and again.skipped == len(photos)
        with pytest.raises(sscd_triton.UsageError, match="no such file"):
            c.embed_files([str(tmp_path / "nowhere")], output=tmp_path / "x")
    # the output is sscd-embed's: the CLI resumes it, with nothing left to do
    r = embed(os.path.dirname(photos[0]), "--output", out, "--quiet",
              url=triton.server.grpc_url)
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr


def test_importing_the_package_stays_light():
    code = ("import sys, sscd_triton; sscd_triton.__all__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tritonclient', 'pyarrow', 'torch', 'numpy')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def run_example(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_examples(triton, photos, tmp_path):
    url = triton.server.grpc_url
    r = run_example("embed_folder.py", os.path.dirname(photos[0]), tmp_path / "ex", "--url", url)
    assert r.returncode == 0, r.stderr
    assert f"embedded {len(photos)}" in r.stdout, r.stdout
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    r = run_example("async_many_servers.py", *photos[:3], "--url", url, "--url", dead)
    assert r.returncode == 0, r.stderr
    assert "(3, 512)" in r.stdout, r.stdout


def test_bad_settings_are_one_usage_error_before_anything_is_sent():
    from sscd_triton import AsyncClient, Client, UsageError

    for kwargs in ({"batch_size": 0}, {"timeout": 0}, {"concurrency": -1},
                   {"preprocess": "gpu"}):
        with pytest.raises(UsageError, match=next(iter(kwargs))):
            Client("127.0.0.1:1", **kwargs)
    with pytest.raises(UsageError, match="url"):
        AsyncClient("http://127.0.0.1:8001")
