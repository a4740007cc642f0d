"""infra/ is hardened: every Ray process on Kubernetes runs with token authentication from a
Secret, as a non-root user without privileges on a read-only root filesystem (with somewhere to
write), the head's 8265 / 10001 / 6379 sit behind a NetworkPolicy, the AWS cluster admits them
from the VPC only with token auth on, and the image runs as that same non-root user and installs
the locked versions. Schema-level checks of the same files: tests/unit/test_infra.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
TOKEN_SECRET = ("vgen-ray-token", "auth_token")
RAY_API_PORTS = {8265, 10001, 6379}
UID = 1000
#: where Ray, vgen and DeepSpeed write inside a container
WRITABLE = ("/tmp", "/tmp/ray", "/dev/shm", "/home/vgen", "/opt/torch_extensions")


def docs(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / rel).read_text()) if d]


def k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted((INFRA / "k8s").glob("*.yaml"))
            for d in docs(p.relative_to(INFRA).as_posix())]


def ray_clusters() -> list[tuple[str, dict, dict]]:
    """(name, RayCluster spec, the owning manifest) for the RayCluster and the RayJob's."""
    out = []
    for _, d in k8s_docs():
        if d.get("kind") == "RayCluster":
            out.append((d["metadata"]["name"], d["spec"], d))
        elif d.get("kind") == "RayJob":
            out.append((d["metadata"]["name"], d["spec"]["rayClusterSpec"], d))
    assert {n for n, _, _ in out} == {"vgen", "vgen-demo"}
    return out


def pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) of every pod the manifests make: heads, workers, submitters."""
    out = []
    for name, spec, owner in ray_clusters():
        out.append((f"{name} head", spec["headGroupSpec"]["template"]))
        out += [(f"{name} {g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
        if "submitterPodTemplate" in owner.get("spec", {}):
            out.append((f"{name} submitter", owner["spec"]["submitterPodTemplate"]))
    return out


def containers() -> list[tuple[str, dict, dict]]:
    """(where, container, its pod spec); the autoscaler sidecar counts as a head container."""
    out = []
    for where, tpl in pod_templates():
        spec = tpl["spec"]
        out += [(f"{where}/{c['name']}", c, spec)
                for c in spec.get("containers", []) + spec.get("initContainers", [])]
    for name, spec, _ in ray_clusters():
        if spec.get("enableInTreeAutoscaling"):
            opts = spec.get("autoscalerOptions") or {}
            out.append((f"{name} autoscaler", opts, spec["headGroupSpec"]["template"]["spec"]))
    return out


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def effective(c: dict, pod: dict) -> dict:
    """A container's security context with the pod's defaults under it."""
    return {**(pod.get("securityContext") or {}), **(c.get("securityContext") or {})}


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------


def test_every_k8s_file_is_a_list_of_typed_objects():
    for fname, d in k8s_docs():
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), fname


@pytest.mark.parametrize("where,c,pod", containers(), ids=lambda x: x if isinstance(x, str) else "")
def test_token_auth_on_every_ray_process(where, c, pod):
    env = env_of(c)
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
    tok = env.get("RAY_AUTH_TOKEN")
    assert tok and "value" not in tok, f"{where}: RAY_AUTH_TOKEN must come from a Secret"
    ref = tok["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == TOKEN_SECRET and not ref.get("optional"), where


@pytest.mark.parametrize("where,c,pod", containers(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_container_is_non_root_and_unprivileged(where, c, pod):
    sc = effective(c, pod)
    assert sc.get("runAsNonRoot") is True and sc.get("runAsUser") == UID, where
    assert sc.get("privileged") is not True, f"{where} runs privileged"
    assert sc.get("allowPrivilegeEscalation") is False, where
    caps = sc.get("capabilities") or {}
    assert caps.get("drop") == ["ALL"] and not caps.get("add"), where
    assert sc.get("readOnlyRootFilesystem") is True, where
    # somewhere to write: every mount names a volume of the pod, and /tmp and $HOME are mounted
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    assert set(mounts.values()) <= set(vols), where
    assert {"/tmp", "/home/vgen"} <= set(mounts), where
    assert all("emptyDir" in vols[n] for n in mounts.values()), f"{where}: emptyDirs only"


@pytest.mark.parametrize("where,tpl", pod_templates(),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_pods_share_nothing_with_the_node(where, tpl):
    spec = tpl["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True, where
    assert spec["securityContext"]["runAsUser"] == UID, where
    assert spec["securityContext"].get("seccompProfile") == {"type": "RuntimeDefault"}, where
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key), f"{where}: {key}"
    assert not any("hostPath" in v for v in spec.get("volumes", [])), where


def test_ray_containers_can_write_where_ray_writes():
    for where, c, _ in containers():
        if "autoscaler" in where or "submitter" in where:
            continue
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert set(WRITABLE) <= mounts, (where, set(WRITABLE) - mounts)


def test_the_head_is_not_published_outside_the_cluster():
    for name, spec, _ in ray_clusters():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", name
    kinds = {d["kind"] for _, d in k8s_docs()}
    assert not kinds & {"Ingress", "Service", "Route", "Gateway", "HTTPRoute"}


def _selects(selector: dict, labels: dict) -> bool:
    want = selector.get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in want.items()) and not selector.get(
        "matchExpressions")


def _admits(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port for p in ports)


def test_network_policies_guard_the_ray_api_ports():
    policies = [d for _, d in k8s_docs() if d["kind"] == "NetworkPolicy"]
    assert policies, "no NetworkPolicy in infra/k8s"
    for name, spec, _ in ray_clusters():
        # KubeRay adds ray.io/is-ray-node to every Ray pod
        head = {**spec["headGroupSpec"]["template"]["metadata"]["labels"],
                "ray.io/is-ray-node": "yes"}
        mine = [p for p in policies if _selects(p["spec"]["podSelector"], head)]
        assert mine, f"{name}: no NetworkPolicy selects the head"
        assert all("Ingress" in p["spec"]["policyTypes"] for p in mine)
        for port in RAY_API_PORTS:
            rules = [r for p in mine for r in p["spec"].get("ingress", []) if _admits(r, port)]
            assert rules, f"{name}: nothing may reach {port} (the runbook needs it)"
            for r in rules:
                sources = r.get("from")
                assert sources, f"{name}: a rule admits {port} from anywhere"
                for src in sources:
                    assert "ipBlock" not in src, f"{name}: {port} open to an IP block"
                    ns = src.get("namespaceSelector")
                    assert ns is None or ns.get("matchLabels"), \
                        f"{name}: {port} open to every namespace"
                    pods = src.get("podSelector")
                    assert pods is None or pods.get("matchLabels"), \
                        f"{name}: {port} open to every pod of a namespace"
        # the cluster's own pods reach each other (Ray's many ports)
        worker = {**spec["workerGroupSpecs"][0]["template"]["metadata"]["labels"],
                  "ray.io/is-ray-node": "yes"}
        internal = [p for p in policies if _selects(p["spec"]["podSelector"], worker)]
        assert any(_selects(src.get("podSelector", {"matchLabels": {"-": "-"}}), head)
                   for p in internal for r in p["spec"]["ingress"] for src in r["from"]
                   if "ports" not in r), f"{name}: workers do not admit the head"


def test_rayjob_submitter_reaches_the_jobs_api_with_the_token():
    (job,) = [d for _, d in k8s_docs() if d["kind"] == "RayJob"]
    sub = job["spec"]["submitterPodTemplate"]
    assert sub["spec"]["restartPolicy"] == "Never"
    (c,) = sub["spec"]["containers"]
    assert "command" not in c, "KubeRay supplies the `ray job submit` command"
    labels = sub["metadata"]["labels"]
    policies = [d for _, d in k8s_docs() if d["kind"] == "NetworkPolicy"]
    assert any(_admits(r, 8265) and any(_selects(s.get("podSelector", {"matchLabels": {"-": "-"}}),
                                                 labels) for s in r["from"])
               for p in policies for r in p["spec"].get("ingress", []))


# ---------------------------------------------------------------------------------------------
# AWS (cluster launcher)
# ---------------------------------------------------------------------------------------------


def test_aws_nodes_run_ray_with_token_auth():
    (cfg,) = docs("aws/cluster.yaml")
    opts = " ".join(cfg["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in opts
    m = re.search(r"--env RAY_AUTH_TOKEN_PATH=(\S+)", opts)
    assert m and re.search(rf"--volume \S+:{re.escape(m.group(1))}:ro", opts)
    assert "RAY_AUTH_TOKEN=" not in opts  # never the token itself in the config
    init = " ".join(cfg["initialization_commands"])
    assert "aws ssm get-parameter" in init and "--with-decryption" in init and "-m 0400" in init


def test_aws_security_group_admits_the_ray_api_from_the_vpc_only():
    (cfg,) = docs("aws/cluster.yaml")
    perms = cfg["provider"]["security_group"]["IpPermissions"]
    ports = {p["FromPort"] for p in perms}
    assert ports == RAY_API_PORTS
    for p in perms:
        assert p["FromPort"] == p["ToPort"] and p["IpProtocol"] == "tcp"
        cidrs = [r["CidrIp"] for r in p.get("IpRanges", [])]
        assert cidrs or p.get("UserIdGroupPairs")
        for cidr in cidrs:
            assert not cidr.endswith("/0"), f"port {p['FromPort']} open to the internet"
            assert re.match(r"^(10\.|172\.(1[6-9]|2\d|3[01])\.|192\.168\.)", cidr), cidr
        assert not p.get("Ipv6Ranges")


# ---------------------------------------------------------------------------------------------
# the image and its build context
# ---------------------------------------------------------------------------------------------


def test_image_runs_as_the_manifests_user_and_installs_the_lock():
    text = (INFRA / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users, "the image never leaves root"
    assert users[-1] in (f"{UID}:{UID}", "${VGEN_UID}:${VGEN_UID}", str(UID))
    assert re.search(rf"^ARG VGEN_UID={UID}$", text, re.M)
    assert "useradd --uid ${VGEN_UID}" in text
    # the pinned versions: CUDA torch of the lock's version, the rest of the lock minus torch/triton
    assert "COPY requirements.lock" in text
    assert r"s/^torch==\([0-9.]*\)+cpu$/\1/p" in text
    assert "grep -v -e '^torch==' -e '^triton==' requirements.lock" in text
    assert "pip install -r /tmp/lock-gpu.txt" in text
    makefile = (ROOT / "Makefile").read_text()
    assert "grep -v -e '^torch==' -e '^triton==' $(LOCK)" in makefile  # the same recipe


SECRET_NAMES = [".env", "deploy/.env.prod", ".aws/credentials", "k8s/db-secret.yaml",
                "certs/tls.key", "certs/tls.pem", "keys/id_rsa", "keys/id_ed25519", "credentials",
                ".netrc", "sub/.pypirc"]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's matching, enough for these patterns: `**/` is any number of folders, a pattern
    excludes a path when it matches the path or one of its parent folders."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pat in patterns:
        rx = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(rx, p) for p in prefixes):
            return True
    return False


def test_build_context_leaves_out_credentials():
    lines = [ln.strip() for ln in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)  # nothing is let back in
    for name in SECRET_NAMES + [".git/config", ".venv/bin/python"]:
        assert _dockerignored(name, patterns), name
    for name in ("pipelines/cli.py", "requirements.lock", "pyproject.toml", "README.md",
                 "vgen_core/tokenizers/key_map.py"):
        assert not _dockerignored(name, patterns), name


def test_readme_says_what_is_exposed_and_how_to_make_the_token():
    text = (INFRA / "README.md").read_text()
    table = text[text.index("## What is exposed"):]
    for port in RAY_API_PORTS:
        assert re.search(rf"^\| {port} \|", table, re.M), port
    assert "kubectl create secret generic vgen-ray-token" in text
    assert "--from-literal=auth_token=" in text
    assert "infra/k8s/networkpolicy.yaml" in text
    assert "RAY_AUTH_TOKEN_PATH" in text and "~/.ray/auth_token" in text
