"""Descriptor postprocessing (issue 9): centering and PCA whitening fitted and applied by
`sscd-postprocess`, equal to faiss's own transforms, and appended to the served graph
(`build_repository.py --postprocess`) so that the real server returns what the client
computes."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sscd_triton import load_embeddings, spec
from sscd_triton.cli import postprocess as cli
from sscd_triton.client import io
from sscd_triton.copydetect import postprocess as pp

faiss = pytest.importorskip("faiss")

META = {"model": "sscd", "model_version": "1", "sscd_model": "sscd_disc_mixup",
        "weights_sha256": "ab" * 32, "preprocess": "square320", "preprocess_on": "server"}


def descriptors(n: int, d: int, seed: int = 0) -> np.ndarray:
    """L2-normalised vectors with a well separated covariance spectrum (so eigenvectors
    are determined up to sign) and a common offset (as SSCD descriptors have)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    x = (rng.standard_normal((n, d)) * np.geomspace(3.0, 0.3, d)) @ q.T + rng.standard_normal(d)
    return pp.l2_normalize(x)


def write_npz(path, emb: np.ndarray, meta: dict = META) -> str:
    ids = np.array([f"img/{i:05d}.jpg" for i in range(len(emb))], dtype=str)
    np.savez(path, ids=ids, embeddings=emb.astype(np.float32),
             meta=np.array(json.dumps({**meta, "dims": emb.shape[1]})))
    return str(path)


def write_folder(path, emb: np.ndarray, shard_size: int, meta: dict = META) -> str:
    store = io.ShardStore(str(path), {**meta, "dims": emb.shape[1]}, shard_size=shard_size).open()
    for start in range(0, len(emb), 37):
        rows = range(start, min(start + 37, len(emb)))
        store.add([f"img/{i:05d}.jpg" for i in rows], emb[start:start + len(rows)])
    store.close(complete=True)
    return str(path)


def matched_signs(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """`ours` with each component's sign flipped to agree with `theirs` (PCA eigenvector
    signs are arbitrary; a sign flip does not change the L2 norm)."""
    return ours * np.sign((ours * theirs).sum(axis=0))


def fit_cli(tmp_path, sample: str, *args: str) -> pp.Postprocess:
    out = str(tmp_path / "params.npz")
    assert cli.main(["fit", "--embeddings", sample, *args, "--output", out]) == 0
    return pp.load_params(out)


# --- equal to faiss ---------------------------------------------------------------------
@pytest.mark.parametrize("d_out", [16, 64])
def test_whitening_equals_faiss_pcaw_l2norm(tmp_path, d_out):
    d = 64
    train, test = descriptors(3000, d), descriptors(500, d, seed=1)
    params = fit_cli(tmp_path, write_npz(tmp_path / "sample.npz", train),
                     "--method", "whiten", "--dims", str(d_out))
    assert params.method == "whiten" and params.matrix.shape == (d, d_out)
    ours = params(test)

    # faiss PCAMatrix with eigen_power -0.5, then L2: what "PCAW<d>" builds.
    pca = faiss.PCAMatrix(d, d_out, -0.5)
    pca.train(train)
    theirs = pca.apply(test)
    faiss.normalize_L2(theirs)
    np.testing.assert_allclose(matched_signs(ours, theirs), theirs, atol=1e-4)

    # And through index_factory as upstream's eval builds it: the Flat index stores the
    # transformed vectors.
    index = faiss.index_factory(d, f"PCAW{d_out},L2norm,Flat")
    index.train(train)
    index.add(test)
    stored = faiss.downcast_index(index.index).reconstruct_n(0, len(test))
    np.testing.assert_allclose(matched_signs(ours, stored), stored, atol=1e-4)
    # The in-memory fit of the same data is the streamed one.
    np.testing.assert_allclose(pp.PCAWhitening.fit(train, d_out)(test), ours, atol=1e-5)


def test_centering_equals_mean_subtraction_and_l2(tmp_path):
    train, test = descriptors(1000, 32), descriptors(200, 32, seed=2)
    params = fit_cli(tmp_path, write_folder(tmp_path / "sample", train, shard_size=300),
                     "--method", "center")
    center = faiss.CenteringTransform(32)
    center.train(train)
    theirs = center.apply(test)
    faiss.normalize_L2(theirs)
    np.testing.assert_allclose(params(test), theirs, atol=1e-5)
    np.testing.assert_allclose(params(test), pp.Centering.fit(train)(test), atol=1e-6)
    assert params.provenance["samples"] == 1000
    assert params.provenance["sscd_model"] == "sscd_disc_mixup"
    assert params.provenance["weights_sha256"] == "ab" * 32


# --- apply ------------------------------------------------------------------------------
def test_apply_writes_the_client_forms_shard_by_shard(tmp_path, capsys):
    d = 32
    source = write_folder(tmp_path / "in", descriptors(250, d), shard_size=100)
    params = fit_cli(tmp_path, write_npz(tmp_path / "s.npz", descriptors(500, d, 3)),
                     "--method", "whiten", "--dims", "8")
    ids, emb = load_embeddings(source)
    for out in (tmp_path / "out", tmp_path / "out.npz"):
        assert cli.main(["apply", "--embeddings", source, "--params", str(tmp_path / "params.npz"),
                         "--output", str(out)]) == 0
        got_ids, got = load_embeddings(str(out))
        assert got_ids.tolist() == ids.tolist()
        assert got.shape == (250, 8) and got.dtype == np.float32
        np.testing.assert_allclose(got, params(emb), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert "applied PCA whitening to 8 dims" in capsys.readouterr().out
    # One output shard per input shard, each saying what made it.
    shards = sorted(os.listdir(tmp_path / "out" / io.EMBEDDINGS))
    assert len(shards) == len(os.listdir(os.path.join(source, io.EMBEDDINGS))) == 3
    meta = io.shard_metadata(str(tmp_path / "out" / io.EMBEDDINGS / shards[0]))
    record = json.loads(meta["postprocess"])
    assert record["method"] == "whiten" and record["dims_out"] == 8
    assert record["params_sha256"] == params.sha256()
    assert meta["dims"] == "8" and meta["weights_sha256"] == "ab" * 32
    manifest = io.read_manifest(str(tmp_path / "out"))
    assert manifest["complete"] and manifest["dims"] == 8 and manifest["count"] == 250
    assert manifest["postprocess"]["params_sha256"] == params.sha256()
    # Postprocessed descriptors are not fitted on or postprocessed again.
    code = cli.main(["apply", "--embeddings", str(tmp_path / "out"), "--params",
                     str(tmp_path / "params.npz"), "--output", str(tmp_path / "again")])
    assert code == 2 and "holds postprocessed descriptors already" in capsys.readouterr().err


def _one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err
    return lines[0]


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    sample = write_npz(tmp_path / "s.npz", descriptors(40, 16))
    params = str(tmp_path / "p.npz")
    fit = ["fit", "--embeddings", sample, "--output", params]
    assert "no such file" in _one_line_error(
        capsys, ["fit", "--embeddings", str(tmp_path / "nope"), "--method", "center", "--output", params])
    assert "between 1 and the input's 16" in _one_line_error(capsys, fit + ["--method", "whiten", "--dims", "17"])
    assert "needs more than 64 descriptors, got 64" in _one_line_error(
        capsys, ["fit", "--embeddings", write_npz(tmp_path / "t.npz", descriptors(64, 64)),
                 "--method", "whiten", "--output", params])
    assert "--dims is for --method whiten" in _one_line_error(capsys, fit + ["--method", "center", "--dims", "8"])
    assert "ending in .npz" in _one_line_error(capsys, ["fit", "--embeddings", sample, "--method",
                                                        "center", "--output", str(tmp_path / "p.txt")])
    assert not os.path.exists(params)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "not an embeddings output" in _one_line_error(
        capsys, ["fit", "--embeddings", str(tmp_path / "junk.npz"), "--method", "center", "--output", params])

    assert cli.main(fit + ["--method", "whiten", "--dims", "8"]) == 0
    other = write_npz(tmp_path / "wide.npz", descriptors(10, 32))
    assert "32-d descriptors; the params take 16-d" in _one_line_error(
        capsys, ["apply", "--embeddings", other, "--params", params, "--output", str(tmp_path / "o")])
    assert "not a postprocessing params file" in _one_line_error(
        capsys, ["apply", "--embeddings", sample, "--params", sample, "--output", str(tmp_path / "o")])
    assert "no such file" in _one_line_error(
        capsys, ["apply", "--embeddings", sample, "--params", str(tmp_path / "none.npz"),
                 "--output", str(tmp_path / "o")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "exists; give a new folder" in _one_line_error(
        capsys, ["apply", "--embeddings", sample, "--params", params, "--output", str(tmp_path / "full")])


def test_params_file_round_trip_and_fingerprint(tmp_path):
    train = descriptors(300, 16)
    a = pp.fit(pp.Moments().add(train), "whiten", 8, {"source": "x"})
    pp.save_params(str(tmp_path / "a.npz"), a)
    b = pp.load_params(str(tmp_path / "a.npz"))
    assert b.method == "whiten" and b.provenance["samples"] == 300
    np.testing.assert_array_equal(a.matrix, b.matrix)
    assert a.sha256() == b.sha256()  # of what it computes, not of the file's bytes
    assert pp.fit(pp.Moments().add(train), "center").sha256() != a.sha256()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:  # plain arrays, no pickles
        assert set(z.files) >= {"method", "mean", "matrix", "provenance"}


# --- the served graph -------------------------------------------------------------------
def _tiny_model(d: int, opset: int):
    """images [N, 3, H, W] -> descriptors [N, d]: any graph with the served names."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, d)).astype(np.float32), "w")
    if opset >= 18:
        axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
        pool = helper.make_node("ReduceMean", ["images", "axes"], ["pooled"], keepdims=0)
        inits = [w, axes]
    else:
        pool = helper.make_node("ReduceMean", ["images"], ["pooled"], axes=[2, 3], keepdims=0)
        inits = [w]
    graph = helper.make_graph(
        [pool, helper.make_node("MatMul", ["pooled", "w"], [spec.OUTPUT_NAME])], "tiny",
        [helper.make_tensor_value_info(spec.INPUT_NAME, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info(spec.OUTPUT_NAME, TensorProto.FLOAT, ["N", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("method", ["center", "whiten"])
def test_appended_graph_equals_client_side_apply(opset, method):
    import onnxruntime as ort

    from sscd_triton.serving import postprocess_graph

    d = 24
    params = pp.fit(pp.Moments().add(descriptors(400, d)), method, 10 if method == "whiten" else None)
    raw = _tiny_model(d, opset)
    served = postprocess_graph.append(raw, params)
    assert [o.name for o in served.graph.output] == [spec.OUTPUT_NAME]
    assert served.graph.output[0].type.tensor_type.shape.dim[1].dim_value == params.dims_out
    assert postprocess_graph.recorded(served)["params_sha256"] == params.sha256()
    ops = [n.op_type for n in served.graph.node[len(raw.graph.node):]]
    assert ops == ["Sub"] + (["MatMul"] if method == "whiten" else []) + ["ReduceL2", "Max", "Div"]
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) \
        .run([spec.OUTPUT_NAME], {spec.INPUT_NAME: x})[0]
    np.testing.assert_allclose(run(served), params(run(raw)), atol=1e-5)
    with pytest.raises(postprocess_graph.GraphError, match="postprocessed already"):
        postprocess_graph.append(served, params)
    with pytest.raises(postprocess_graph.GraphError, match="gives 25-d"):
        postprocess_graph.append(_tiny_model(d + 1, opset), params)


@pytest.fixture(scope="module")
def raw_onnx(tmp_path_factory):
    from sscd_triton.export import demo, onnx_export

    path = tmp_path_factory.mktemp("onnx") / "raw.onnx"
    path.write_bytes(onnx_export.to_onnx(demo.demo_model()).SerializeToString())
    return str(path)


def test_build_repository_refuses_bad_postprocess(raw_onnx, tmp_path, capsys):
    from sscd_triton.cli import build_repository

    wrong = str(tmp_path / "p64.npz")
    pp.save_params(wrong, pp.fit(pp.Moments().add(descriptors(100, 64)), "center"))
    for extra, message in ((["--postprocess", wrong], "takes 64-d descriptors; the model gives 512-d"),
                           (["--postprocess", str(tmp_path / "none.npz")], "no such file"),
                           (["--postprocess", wrong, "--configs-only"], "--configs-only")):
        args = ["--target", "cpu", "--output", str(tmp_path / "r"), *extra]
        if "--configs-only" not in extra:
            args += ["--onnx", raw_onnx]
        assert build_repository.main(args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "r" / spec.DESCRIPTOR_MODEL / "1" / "model.onnx")


def test_served_postprocessing_equals_client_side_apply(raw_onnx, tmp_path, capsys):
    """Build a cpu repository with --postprocess, serve it on the real tritonserver, and
    compare what it returns with `sscd-postprocess apply` on the raw descriptors."""
    import tritonclient.grpc as grpcclient

    from sscd_triton import images, runtime, samples
    from sscd_triton.cli import build_repository
    from sscd_triton.serving import build, repository
    from sscd_triton.serving.server import TritonServer

    pre = spec.PREPROCESS["square320"]
    photos = samples.photographs()[:6]
    x = np.stack([images.to_tensor(img, pre) for _, img in photos])
    raw = runtime.onnx_runner(runtime.onnx_session(raw_onnx))(x)
    # Fitted on descriptors of the right width (their meaning is irrelevant here).
    sample = write_npz(tmp_path / "sample.npz", descriptors(700, 512, seed=4))
    params_path = str(tmp_path / "params.npz")
    assert cli.main(["fit", "--embeddings", sample, "--method", "whiten", "--dims", "256",
                     "--output", params_path]) == 0
    params = pp.load_params(params_path)

    out = tmp_path / "repo"
    assert build_repository.main(["--onnx", raw_onnx, "--target", "cpu", "--output", str(out),
                                  "--max-batch", "8", "--postprocess", params_path]) == 0
    log = capsys.readouterr().out
    assert "appended PCA whitening to 256 dims" in log
    assert "postprocess: served graph vs client-side apply" in log and "FAIL" not in log
    served_onnx = out / spec.DESCRIPTOR_MODEL / "1" / repository.ONNX_FILE
    ens = repository.parse_pbtxt((out / spec.ENSEMBLE_NAME / "config.pbtxt").read_text())
    assert [list(o.dims) for o in ens.output] == [[256]]
    # The model identity is the served ONNX's sha256: it changes with the postprocessing.
    digest = ens.parameters[spec.PARAM_WEIGHTS_SHA256].string_value
    assert digest == build.sha256_file(str(served_onnx)) != build.sha256_file(raw_onnx)

    # The client-side result, through the CLI as users run it.
    write_npz(tmp_path / "raw.npz", raw)
    assert cli.main(["apply", "--embeddings", str(tmp_path / "raw.npz"), "--params", params_path,
                     "--output", str(tmp_path / "client.npz")]) == 0
    _, client_side = load_embeddings(str(tmp_path / "client.npz"))
    np.testing.assert_allclose(client_side, params(raw), atol=1e-6)

    with TritonServer(str(out)) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            inp = grpcclient.InferInput(spec.INPUT_NAME, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            by_model = client.infer(spec.DESCRIPTOR_MODEL, [inp]).as_numpy(spec.OUTPUT_NAME)
            rows = images.pack_rows([open(p, "rb").read() for p in samples.photograph_paths()[:6]])
            inp = grpcclient.InferInput(spec.ENSEMBLE_INPUT, list(rows.shape), "UINT8")
            inp.set_data_from_numpy(rows)
            by_ensemble = client.infer(spec.ENSEMBLE_NAME, [inp]).as_numpy(spec.OUTPUT_NAME)
            params_served = client.get_model_config(spec.ENSEMBLE_NAME, as_json=True)["config"]["parameters"]
        finally:
            client.close()
    assert by_model.shape == by_ensemble.shape == (6, 256)
    assert np.abs(by_model - client_side).max() <= 1e-5
    assert np.abs(by_ensemble - client_side).max() <= 1e-5
    assert params_served[spec.PARAM_WEIGHTS_SHA256]["string_value"] == digest


def test_gpu_repository_takes_the_postprocessing_and_says_how_to_serve_it(raw_onnx, tmp_path):
    from sscd_triton.serving import build, repository

    params = str(tmp_path / "c.npz")
    pp.save_params(params, pp.fit(pp.Moments().add(descriptors(100, 512)), "center"))
    built = build.build_repository(str(tmp_path / "g"), "gpu", onnx=raw_onnx, postprocess=params)
    assert built.passed and built.postprocess["method"] == "center"
    desc = repository.parse_pbtxt((tmp_path / "g" / spec.DESCRIPTOR_MODEL / "config.pbtxt").read_text())
    assert [list(o.dims) for o in desc.output] == [[512]]
    steps = build.next_steps(built)
    assert len(steps) == 1 and "docker/build_plan.sh" in steps[0] and "docker build" not in steps[0]


def test_raw_descriptors_never_join_a_postprocessed_output():
    from sscd_triton.client import io as outio

    raw = {"model": "sscd", "model_version": "1", "sscd_model": "m", "weights_sha256": "ab",
           "preprocess": "square320", "preprocess_on": "server", "dims": 512}
    applied = dict(raw, postprocess={"method": "center", "dims": 512})
    assert outio.identity_conflict(applied, raw)
    assert not outio.identity_conflict(raw, dict(raw))
