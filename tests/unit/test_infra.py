"""infra/: every YAML parses, and the schema-level facts hold: the cluster launcher config
validates against the installed Ray's own schema, the KubeRay manifests have the fields the
ray.io/v1 CRDs require, every file names the same image and a Ray version equal to the installed
ray's major.minor, resources have requests and limits with numeric GPU counts, and the RayJob
entrypoint is a `vgen run` of a DAG that exists in this repository and validates."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from pipelines.cli import build_parser
from pipelines.dag.spec import load_dag
from pipelines.submit import DEFAULT_EXCLUDES

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
RAY_MM = ".".join(ray.__version__.split(".")[:2])
IMAGE_RE = re.compile(r"^[a-z0-9.\-/:]+/vgen:[0-9.]+-ray(\d+\.\d+\.\d+)-cu(\d+)$")


def load(rel: str):
    return yaml.safe_load((INFRA / rel).read_text())


def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def docker_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", dockerfile(), re.M)
    assert m, f"infra/Dockerfile has no 'ARG {name}=...'"
    return m.group(1)


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def cluster_specs() -> list[tuple[str, dict]]:
    return [("raycluster.yaml", load("k8s/raycluster.yaml")["spec"]),
            ("rayjob.yaml", load("k8s/rayjob.yaml")["spec"]["rayClusterSpec"])]


def all_images() -> dict[str, set[str]]:
    images = {"aws/cluster.yaml": {load("aws/cluster.yaml")["docker"]["image"]}}
    for name, spec in cluster_specs():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        images[name] = {c["image"] for g in groups for c in containers(g["template"])}
    m = re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", dockerfile())
    assert m, "infra/Dockerfile's header shows no `docker build -f infra/Dockerfile -t IMAGE .`"
    images["Dockerfile"] = {m.group(1)}
    return images


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(p.relative_to(INFRA).as_posix()
                                        for p in INFRA.rglob("*.y*ml")))
def test_every_yaml_parses_to_a_mapping(path):
    docs = list(yaml.safe_load_all((INFRA / path).read_text()))
    assert docs and all(isinstance(d, dict) and d for d in docs)


def test_expected_files_exist():
    for rel in ("README.md", "Dockerfile", "Dockerfile.dockerignore", "runtime_env.yaml",
                "aws/cluster.yaml", "k8s/raycluster.yaml", "k8s/rayjob.yaml",
                "k8s/s3-secret.example.yaml"):
        assert (INFRA / rel).is_file(), rel


def test_one_image_everywhere_with_the_installed_ray():
    images = all_images()
    distinct = set().union(*images.values())
    assert len(distinct) == 1, images
    (image,) = distinct
    m = IMAGE_RE.match(image)
    assert m, f"image {image!r} should be REGISTRY/vgen:VERSION-rayX.Y.Z-cuNNN"
    ray_version, cuda = m.groups()
    assert ray_version == docker_arg("RAY_VERSION")
    assert ray_version.startswith(RAY_MM + "."), (ray_version, ray.__version__)
    # the torch CUDA build in the tag is the one the Dockerfile installs
    assert docker_arg("TORCH_INDEX").endswith(f"/cu{cuda}")


def test_ray_versions_match_the_installed_ray():
    for name, spec in cluster_specs():
        assert isinstance(spec["rayVersion"], str), name
        assert spec["rayVersion"].startswith(RAY_MM + "."), (name, spec["rayVersion"])
    cmds = " ".join(load("aws/cluster.yaml")["setup_commands"])
    assert f"startswith('{RAY_MM}.')" in cmds  # nodes refuse an image with another Ray


def test_dockerfile_builds_a_cuda_torch_image_of_the_project():
    text = dockerfile()
    base = docker_arg("BASE_IMAGE")
    m = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu\d+\.\d+$", base)
    assert m, base
    cu = int(m.group(1) + m.group(2))
    index = docker_arg("TORCH_INDEX")
    assert index.startswith("https://download.pytorch.org/whl/cu")
    assert int(index.rsplit("cu", 1)[1]) <= cu, "torch's CUDA build is newer than the base image"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert '"torch==${TORCH_VERSION}"' in text and "--index-url ${TORCH_INDEX}" in text
    assert '"ray[default,train,data]==${RAY_VERSION}"' in text  # the dashboard: the Jobs API
    assert re.search(r"^WORKDIR /app$", text, re.M) and "pip install --no-deps -e ." in text
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", ".vgen-demo", ".cache"} <= set(ignore)


# ---------------------------------------------------------------------------------------------
# the cluster launcher (AWS)
# ---------------------------------------------------------------------------------------------


def test_cluster_launcher_config_validates_against_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = load("aws/cluster.yaml")
    jsonschema.validate(cfg, schema)
    # what ray.autoscaler._private.util.validate_config checks beyond the schema
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]
    assert "cluster_synced_files" in cfg
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]


def test_cluster_launcher_node_types():
    cfg = load("aws/cluster.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs drivers, not stage work
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu, "no GPU worker node type"
    for t in gpu:
        assert isinstance(t["resources"]["GPU"], int) and t["resources"]["GPU"] > 0
        assert isinstance(t["resources"]["CPU"], int) and t["resources"]["CPU"] > 0
        assert t["node_config"]["InstanceType"]
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
    starts = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in starts and "--autoscaling-config" in starts
    assert all(v.startswith("./") for v in cfg["file_mounts"].values())
    for local in cfg["file_mounts"].values():
        assert (ROOT / local).exists(), local


# ---------------------------------------------------------------------------------------------
# KubeRay (ray.io/v1)
# ---------------------------------------------------------------------------------------------


def _check_container_resources(where: str, c: dict, gpu: bool) -> None:
    res = c.get("resources") or {}
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    for key in ("cpu", "memory"):
        assert key in req and key in lim, f"{where}: resources.requests/limits.{key}"
    if gpu:
        n = lim.get("nvidia.com/gpu")
        assert isinstance(n, int) and not isinstance(n, bool) and n > 0, f"{where}: GPU {n!r}"
        assert req.get("nvidia.com/gpu") == n, f"{where}: GPU requests must equal limits"
    else:
        assert "nvidia.com/gpu" not in lim, where


def _check_cluster_spec(name: str, spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), \
        f"{name}: rayStartParams values must be strings (map[string]string)"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (hc,) = containers(head["template"])
    _check_container_resources(f"{name} head", hc, gpu=False)
    assert {p["containerPort"] for p in hc["ports"]} >= {6379, 8265, 10001}
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    has_gpu = False
    for g in groups:
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        for k in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(g[k], int), f"{name} {g['groupName']}.{k}"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        for c in containers(g["template"]):
            gpu = "nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {})
            has_gpu |= gpu
            _check_container_resources(f"{name} {g['groupName']}", c, gpu=gpu)
            if gpu:
                tol = g["template"]["spec"].get("tolerations") or []
                assert any(t.get("key") == "nvidia.com/gpu" for t in tol), name
    assert has_gpu, f"{name}: no GPU worker group"


def test_raycluster_manifest():
    doc = load("k8s/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"] == "vgen"  # -> svc/vgen-head-svc in the docs and errors
    _check_cluster_spec("raycluster.yaml", doc["spec"])


def test_s3_credentials_come_from_the_secret():
    secret = load("k8s/s3-secret.example.yaml")
    assert (secret["apiVersion"], secret["kind"]) == ("v1", "Secret")
    keys = set(secret["stringData"])
    for name, spec in cluster_specs():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for g in groups:
            for c in containers(g["template"]):
                refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", [])
                        if "secretKeyRef" in e.get("valueFrom", {})}
                for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert refs[var]["name"] == secret["metadata"]["name"], (name, var)
                    assert refs[var]["key"] in keys
                # no literal credentials anywhere
                assert not any(e["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
                               and "value" in e for e in c.get("env", []))


def test_rayjob_runs_a_dag_of_this_repository():
    doc = load("k8s/rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    _check_cluster_spec("rayjob.yaml", spec["rayClusterSpec"])
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    assert isinstance(spec["shutdownAfterJobFinishes"], bool)
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    renv = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(renv, dict) and "pip" not in renv
    assert all(isinstance(v, str) for v in renv["env_vars"].values())

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["vgen", "run"]
    args = build_parser().parse_args(argv[1:])
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile(), re.M).group(1)
    assert args.dag.startswith(workdir + "/"), "the DAG path must be inside the image's /app"
    dag = ROOT / args.dag[len(workdir) + 1:]
    assert dag.is_file(), f"{args.dag} is not {dag.relative_to(ROOT)} in this repository"
    assert args.storage and args.storage.startswith("s3://")
    load_dag(dag, storage=args.storage)  # validates


def test_runtime_env_example_matches_vgen_submit():
    renv = load("runtime_env.yaml")
    assert renv["working_dir"] == "."
    assert renv["excludes"] == DEFAULT_EXCLUDES
    assert "pip" not in renv and "conda" not in renv
    assert all(isinstance(v, str) for v in renv["env_vars"].values())
    assert not any(re.search(r"SECRET|TOKEN|PASSWORD", k) for k in renv["env_vars"])


def test_readme_runbook_covers_the_lifecycle():
    text = (INFRA / "README.md").read_text()
    for needle in ("ray up infra/aws/cluster.yaml", "kubectl apply -f infra/k8s/raycluster.yaml",
                   "vgen submit", "vgen logs", "vgen status --job", "vgen stop", "vgen ui",
                   "ray down infra/aws/cluster.yaml", "kubectl delete", "docker build"):
        assert needle in text, needle
    for rel in ("aws/cluster.yaml", "k8s/raycluster.yaml", "k8s/rayjob.yaml", "Dockerfile",
                "runtime_env.yaml"):
        assert f"infra/{rel}" in text, rel
