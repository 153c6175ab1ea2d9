"""deploy/: Kubernetes manifests, docker/compose.yaml, the Grafana dashboard, Prometheus files.

- Every Kubernetes manifest is validated offline against the API schemas that
  kubernetes-validate bundles (strict: unknown fields fail), for the oldest Kubernetes these
  manifests support (1.30: the preStop `sleep` action is on by default) and the newest bundled.
- docker/compose.yaml is validated against the Compose Specification's JSON schema, vendored
  as tests/data/compose-spec.json (github.com/compose-spec/compose-spec, schema/compose-spec.json
  at 170098ba07d9, Apache-2.0), after the same ${VAR...} interpolation compose does; and with
  `docker compose config` / `docker-compose config` where one is installed (no daemon needed).
- Every metric the dashboard, the HPA's adapter rule and its panels' template name is checked
  against what a real tritonserver (the cpu repository, after a few requests) exports on
  /metrics; only GPU metrics, which a CPU-only server does not export, are exempt (GPU_ONLY).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "sscd-triton.json"
SCRAPE = ROOT / "deploy" / "prometheus" / "scrape.yaml"
ADAPTER = ROOT / "deploy" / "prometheus" / "adapter-rules.yaml"
COMPOSE = ROOT / "docker" / "compose.yaml"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
ENTRYPOINT = (ROOT / "docker" / "entrypoint.sh").read_text()
MANIFESTS = sorted(K8S.glob("*.yaml"))
K8S_VERSIONS = ("1.30.0", "latest")

# Exported only by a server that sees a GPU (DCGM), so the cpu server here lacks them. Source:
# Triton server docs/user_guide/metrics.md, "GPU Metrics" (GPU Utilization: nv_gpu_utilization;
# GPU Memory: nv_gpu_memory_total_bytes, nv_gpu_memory_used_bytes), registered in
# triton-inference-server/core src/metrics.cc.
GPU_ONLY = {"nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes"}


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind() -> dict[str, dict]:
    found = {}
    for path in MANIFESTS:
        for d in docs(path):
            assert d["kind"] not in found, f"two {d['kind']}s"
            found[d["kind"]] = d
    return found


# --- Kubernetes schemas ----------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schemas(path, version):
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    resources = docs(path)
    assert resources, f"{path} holds no resource"
    for resource in resources:
        kubernetes_validate.validate(resource, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field():
    """The validator really runs offline and catches the mistakes it is here for."""
    import kubernetes_validate

    dep = by_kind()["Deployment"]
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = \
        bad["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30.0", strict=True)


def test_manifests_agree_with_the_image_and_each_other():
    k = by_kind()
    assert set(k) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                      "PersistentVolumeClaim"}
    dep, svc, hpa, pdb = k["Deployment"], k["Service"], k["HorizontalPodAutoscaler"], k["PodDisruptionBudget"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for selector in (dep["spec"]["selector"]["matchLabels"], pdb["spec"]["selector"]["matchLabels"],
                     svc["spec"]["selector"]):
        assert selector.items() <= labels.items()
    assert "replicas" not in dep["spec"], "the HPA owns replicas"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}

    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert set(ports.values()) == {int(p) for p in re.search(r"^EXPOSE (.*)$", DOCKERFILE, re.M)[1].split()}
    # Headless: DNS lists every ready pod, the client balances gRPC over them.
    assert svc["spec"]["clusterIP"] == "None"
    assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} >= {("grpc", 8001)}
    assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])

    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    env = {e["name"]: e for e in c["env"]}
    assert "secretKeyRef" in env["SSCD_ADMIN_KEY"]["valueFrom"]

    uid = int(re.search(r"^USER (\d+)", DOCKERFILE, re.M)[1])
    psc, csc = pod["spec"]["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == uid
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]

    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = c["startupProbe"]
    start_period = int(re.search(r"--start-period=(\d+)s", DOCKERFILE)[1])
    assert startup["periodSeconds"] * startup["failureThreshold"] >= max(1800, start_period)
    exit_timeout = int(re.search(r"--exit-timeout-secs=(\d+)", ENTRYPOINT)[1])
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > exit_timeout + pre_stop

    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    cache = re.search(r"SSCD_TRT_CACHE=(\S+)", DOCKERFILE)[1]
    claim = volumes[mounts[cache]]["persistentVolumeClaim"]["claimName"]
    assert claim == k["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"

    # The HPA scales on the metric the adapter rule publishes.
    (metric,) = hpa["spec"]["metrics"]
    (rule,) = yaml.safe_load(ADAPTER.read_text())["rules"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_scrape_config_finds_the_pods():
    jobs = {j["job_name"]: j for j in yaml.safe_load(SCRAPE.read_text())["scrape_configs"]}
    pod = by_kind()["Deployment"]["spec"]["template"]
    keep = {r["source_labels"][0]: r["regex"] for r in jobs["sscd-triton"]["relabel_configs"]
            if r.get("action") == "keep"}
    assert keep["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == \
        pod["metadata"]["labels"]["app.kubernetes.io/name"]
    assert keep["__meta_kubernetes_pod_container_port_name"] in \
        {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    # The adapter maps series to pods through these labels.
    targets = {r.get("target_label") for r in jobs["sscd-triton"]["relabel_configs"]}
    assert {"namespace", "pod"} <= targets


# --- docker/compose.yaml ---------------------------------------------------------------
_VAR = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(value, env: dict):
    """Compose's variable interpolation: $$, ${V}, $V, ${V:-d}, ${V-d}, ${V:?e}, ${V?e}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m):
        if m[0] == "$$":
            return "$"
        name, op, arg = m[1] or m[4], m[2], m[3]
        val = env.get(name)
        unset = val is None or (op is not None and op.startswith(":") and val == "")
        if op and op.endswith("?") and unset:
            raise ValueError(f"required variable {name} is missing: {arg}")
        if op and op.endswith("-") and unset:
            return arg
        return val or ""
    return _VAR.sub(one, value)


def test_compose_file_validates_against_the_compose_spec():
    import jsonschema

    raw = yaml.safe_load(COMPOSE.read_text())
    with pytest.raises(ValueError, match="SSCD_ADMIN_KEY"):
        interpolate(raw, {})
    config = interpolate(raw, {"SSCD_ADMIN_KEY": "test"})
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/")
    validator = jsonschema.Draft7Validator(schema)
    validator.validate(config)
    bad = json.loads(json.dumps(config))
    bad["services"]["sscd"]["shm_sise"] = "1g"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)
    # It serves what the image exposes, with the cache where the image keeps it.
    (svc,) = config["services"].values()
    assert {p.split(":")[1] for p in svc["ports"]} <= set(re.search(r"^EXPOSE (.*)$", DOCKERFILE, re.M)[1].split())
    cache = re.search(r"SSCD_TRT_CACHE=(\S+)", DOCKERFILE)[1]
    assert any(v.split(":")[1] == cache for v in svc["volumes"])


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_with_the_compose_cli():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no `docker compose` plugin nor docker-compose here: validated against the "
                    "compose-spec schema only")
    env = {**os.environ, "SSCD_ADMIN_KEY": "test"}
    r = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    env.pop("SSCD_ADMIN_KEY")
    r = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode != 0 and "SSCD_ADMIN_KEY" in r.stderr


# --- metric names ----------------------------------------------------------------------
_PROMQL_WORDS = {"sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk",
                 "quantile", "count_values", "group", "by", "without", "on", "ignoring",
                 "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana and prometheus-adapter templates allowed)."""
    e = re.sub(r"<<[^>]*>>", "", expr)                       # adapter <<.LabelMatchers>> ...
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', e)                # strings
    e = re.sub(r"\{[^}]*\}", " ", e)                         # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                        # ranges, $__rate_interval
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w$:.])([A-Za-z_:][\w:]*)\s*(\()?", e):
        if not m[2] and m[1].lower() not in _PROMQL_WORDS:
            names.add(m[1])
    return names


def test_promql_metric_extraction():
    assert promql_metrics('sum by (model) (rate(a_total{x=~"b|c",y!="d"}[$__rate_interval]))\n'
                          '/ clamp_min(sum without (le) (b:rec[5m] offset 1h), 1e-3) + on(pod) c') \
        == {"a_total", "b:rec", "c"}
    assert promql_metrics("max by (<<.GroupBy>>) (rate(q{<<.LabelMatchers>>,m=\"x\"}[2m]))") == {"q"}


def dashboard_queries() -> list[tuple[str, set[str]]]:
    """(where, metric names) for every panel target and every template variable query."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for t in panel["targets"]:
            out.append((f"{panel['title']} {t['refId']}", promql_metrics(t["expr"])))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q.strip())
            out.append((f"variable {var['name']}", promql_metrics(m[1] if m else q)))
    return out


def test_dashboard_shows_what_operators_need():
    dash = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for words in ("images/s", "batch size", "queue", "compute", "failed", "gpu utilisation", "gpu memory"):
        assert words in titles, words
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for where, names in dashboard_queries():
        assert names, f"{where}: no metric found in its query"


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
    """Metric names a real tritonserver exports after serving good and bad requests."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from sscd_triton import images, samples, spec
    from sscd_triton.cli import build_repository
    from sscd_triton.serving.server import TritonServer

    repo = tmp_path_factory.mktemp("deploy_repo") / "cpu"
    assert build_repository.main(["--checkpoint", ckpts[0]["torchvision"], "--target", "cpu",
                                  "--output", str(repo), "--max-batch", "8"]) == 0

    def infer(client, rows):
        arr = images.pack_rows(rows)
        inp = grpcclient.InferInput(spec.ENSEMBLE_INPUT, list(arr.shape), "UINT8")
        inp.set_data_from_numpy(arr)
        return client.infer(spec.ENSEMBLE_NAME, [inp])

    with TritonServer(str(repo)) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        jpeg = images.encode(samples.photographs()[0][1], "JPEG")
        with cf.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: infer(client, [jpeg]), range(8)))
        with pytest.raises(InferenceServerException):
            infer(client, [b"not an image"])
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        client.close()
    names = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+)", line) or re.match(r"([A-Za-z_:][\w:]*)[{ ]", line)
        if m:
            names.add(m[1])
    assert "nv_inference_count" in names, text[:2000]
    return names


def test_dashboard_metrics_are_exported_by_the_server(exported):
    assert not GPU_ONLY & exported or GPU_ONLY <= exported  # a CPU server: none of them
    for where, names in dashboard_queries():
        missing = names - exported - GPU_ONLY
        assert not missing, f"dashboard {where} names {sorted(missing)}, which tritonserver does not export"


def test_hpa_metric_comes_from_exported_metrics(exported):
    (rule,) = yaml.safe_load(ADAPTER.read_text())["rules"]
    named = promql_metrics(rule["seriesQuery"]) | promql_metrics(rule["metricsQuery"])
    assert named == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    assert named <= exported
    assert re.search(rule["name"]["matches"], "nv_inference_queue_duration_us")


def test_entrypoint_passes_the_flags_the_gpu_repository_needs():
    """Without --disable-auto-complete-config the DALI backend gives sscd_preprocess a
    dynamic batcher (dali_backend src/config_tools/config_tools.cc)."""
    from sscd_triton.serving.repository import GPU_SERVER_FLAGS

    text = (ROOT / "docker" / "entrypoint.sh").read_text()
    command = text[text.index("exec tritonserver"):]
    for flag in GPU_SERVER_FLAGS:
        assert f"  {flag} \\\n" in command, flag



def test_entrypoint_passes_the_sized_flags_of_the_repository(tmp_path):
    """docker/entrypoint.sh passes sscd/server.args (pools and gRPC threads sized for the
    repository it serves) to tritonserver: run it with fakes of the plan build and the server."""
    from sscd_triton import spec
    from sscd_triton.serving import repository

    serving = repository.ServingConfig(target="gpu", max_batch=32)
    repo = tmp_path / "models"
    repository.write_configs(str(repo), serving)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tritonserver").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (bin_dir / "tritonserver").chmod(0o755)
    script = ENTRYPOINT.replace("/usr/local/bin/sscd-build-plan", "true")
    (tmp_path / "entrypoint.sh").write_text(script)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SSCD_ADMIN_KEY="k",
               SSCD_MODEL_REPOSITORY=str(repo))
    out = subprocess.run(["bash", str(tmp_path / "entrypoint.sh"), "--log-verbose=1"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    flags = repository.gpu_server_flags(serving)
    assert all(f in out for f in flags), (flags, out)
    assert out[-1] == "--log-verbose=1"  # extra arguments still come last (and win)
    pool = int(next(f for f in flags if f.startswith("--cuda-memory")).split(":")[1])
    # in-flight intermediates: max_inflight_requests x max_batch x 3x320x320 float32
    assert pool >= serving.inflight * serving.max_batch * 3 * 320 * 320 * 4
    (repo / spec.ENSEMBLE_NAME / repository.SERVER_ARGS).unlink()  # an older repository: defaults
    out = subprocess.run(["bash", str(tmp_path / "entrypoint.sh")], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "--cuda-memory-pool-byte-size" not in out and "--disable-auto-complete-config" in out


def test_serving_image_knows_max_inflight_requests():
    """The gpu ensemble config sets max_inflight_requests, which Triton has from 25.11 on."""
    from sscd_triton.serving import repository

    version = re.search(r"^ARG TRITON_VERSION=(\d+)\.(\d+)$", DOCKERFILE, re.M)
    minimum = tuple(int(x) for x in repository.MIN_TRITON_RELEASE.split("."))
    assert (int(version.group(1)), int(version.group(2))) >= minimum


def test_pod_cpu_request_covers_the_decoder_threads():
    from sscd_triton import spec
    from sscd_triton.serving import repository

    serving = repository.ServingConfig(target="gpu")
    cfgs = {c.name: c for c in repository.configs(serving)}
    busy = sum(g.count for g in cfgs[spec.PREPROCESS_MODEL].instance_group) * serving.dali_threads \
        + sum(g.count for g in cfgs[spec.CHECK_MODEL].instance_group)
    (deployment,) = [d for d in yaml.safe_load_all((K8S / "deployment.yaml").read_text()) if d]
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert float(c["resources"]["requests"]["cpu"]) >= busy
