"""Deployment files, checked without Docker or Kubernetes (neither exists here): every manifest in cluster/
parses and validates against the hand-written schemas in cluster/schemas/; image, Ray and Python versions
agree across docker/Dockerfile, the manifests and pyproject.toml; the RayJob's entrypoint is a valid run
whose GPU placement fits its worker group; the closed defaults (token as a read-only file, read-only root
filesystems, no Ray Client port, NetworkPolicies evaluated against the pods KubeRay makes); the hash lock
against pyproject.toml; and the Dockerfile's pip command for the package, run in a venv on the files its COPY
lines take."""
from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from referencing import Registry, Resource

from noprop_dist.config import config_names, load_config
from noprop_dist.run import parse_args

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
DOCKERFILE = REPO / "docker" / "Dockerfile"
LOCK = REPO / "docker" / "requirements.lock"
DEPLOYING = REPO / "docs" / "deploying.md"
SCHEMA_OF_KIND = {"RayJob": "rayjob", "RayCluster": "raycluster", "PodMonitor": "podmonitor",
                  "PrometheusRule": "prometheusrule",
                  "ConfigMap": "grafana-dashboard", "PersistentVolumeClaim": "persistentvolumeclaim",
                  "NetworkPolicy": "networkpolicy"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RAY_PIN = next(re.fullmatch(r"ray\[[a-z,]+\]==(\S+)", d).group(1) for d in PYPROJECT["project"]["dependencies"]
               if d.startswith("ray["))


def _docs() -> list[tuple[str, dict]]:
    return [(f.name, doc) for f in sorted(CLUSTER.glob("*.yaml")) for doc in yaml.safe_load_all(f.read_text()) if doc]


def _kind(kind: str) -> dict:
    (doc,) = [d for _, d in _docs() if d["kind"] == kind]
    return doc


def _schema_validator(name: str) -> Draft202012Validator:
    schemas = {p.name: json.loads(p.read_text()) for p in (CLUSTER / "schemas").glob("*.schema.json")}
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas.values())
    return Draft202012Validator(schemas[name], registry=registry)


def _cluster_specs() -> list[tuple[str, dict]]:
    return [("RayJob", _kind("RayJob")["spec"]["rayClusterSpec"]), ("RayCluster", _kind("RayCluster")["spec"])]


def _ray_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def _labels() -> dict[str, str]:
    args = " ".join(a for ins, a in _dockerfile() if ins == "LABEL")
    return dict(kv.split("=", 1) for kv in shlex.split(args))


def _base_image() -> tuple[str, str]:
    """The FROM image as written and as built by default (the ARG defaults declared before it substituted)."""
    args: dict[str, str] = {}
    for ins, a in _dockerfile():
        if ins == "ARG":
            name, _, default = a.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif ins == "FROM":
            written = a.split()[0]
            return written, re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], written)
    raise AssertionError("no FROM")


def _pip_runs() -> list[list[str]]:
    return [shlex.split(a) for ins, a in _dockerfile() if ins == "RUN" and "pip install" in a]


IMAGE = _kind("RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


# --- manifests: parse, schema ------------------------------------------------------------------------------

def test_every_manifest_parses_and_has_a_schema():
    docs = _docs()
    assert {name for name, _ in docs} == {f.name for f in CLUSTER.glob("*.yaml")}, "a manifest without a document"
    assert {d["kind"] for _, d in docs} == set(SCHEMA_OF_KIND), "a kind without a schema, or a schema unused"
    # Only the NetworkPolicies come several to a file; names are unique per kind (kubectl apply would merge them).
    assert all(len(list(yaml.safe_load_all(f.read_text()))) == 1 for f in CLUSTER.glob("*.yaml")
               if "networkpolicy" not in f.name)
    names = [(d["kind"], d["metadata"]["name"]) for _, d in docs]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("name,doc", _docs(), ids=[n for n, _ in _docs()])
def test_manifest_validates_against_its_schema(name, doc):
    schemas = {p.name: json.loads(p.read_text()) for p in (CLUSTER / "schemas").glob("*.schema.json")}
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas.values())
    schema = schemas[f"{SCHEMA_OF_KIND[doc['kind']]}.schema.json"]
    Draft202012Validator.check_schema(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in Draft202012Validator(schema, registry=registry).iter_errors(doc)]
    assert not errors, f"{name}: " + "; ".join(errors)


def test_schemas_reject_what_they_should():
    schemas = {p.name: json.loads(p.read_text()) for p in (CLUSTER / "schemas").glob("*.schema.json")}
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas.values())
    validator = Draft202012Validator(schemas["rayjob.schema.json"], registry=registry)
    job = _kind("RayJob")
    assert validator.is_valid(job)
    typo = json.loads(json.dumps(job))
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    half_gpu = json.loads(json.dumps(job))
    half_gpu["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"]["nvidia.com/gpu"] = "0.5"  # Kubernetes has whole GPUs only; sharing is Ray's (gpus_per_worker)
    root = json.loads(json.dumps(job))
    root["spec"]["submitterPodTemplate"]["spec"]["securityContext"]["runAsNonRoot"] = False
    escalating = json.loads(json.dumps(job))
    escalating["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("securityContext")
    token = json.loads(json.dumps(job))
    token["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["automountServiceAccountToken"] = True
    ray_token_env = json.loads(json.dumps(job))  # the Ray token back in the environment every task inherits
    ray_token_env["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "noprop-ray-auth", "key": "auth_token"}}})
    env_from = json.loads(json.dumps(job))
    env_from["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": "x"}}]
    writable_root = json.loads(json.dumps(job))
    writable_root["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "securityContext"]["readOnlyRootFilesystem"] = False
    bad_digest = json.loads(json.dumps(job))
    bad_digest["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] += "@sha256:1234"
    for bad in (typo, half_gpu, root, escalating, token, ray_token_env, env_from, writable_root, bad_digest):
        assert not validator.is_valid(bad)
    pinned = json.loads(json.dumps(job))  # an image pinned by digest, as docs/deploying.md suggests after a push
    pinned["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] += "@sha256:" + "0" * 64
    assert validator.is_valid(pinned)

    policies = _schema_validator("networkpolicy.schema.json")
    policy = next(d for _, d in _docs() if d["kind"] == "NetworkPolicy" and d["spec"].get("ingress"))
    assert policies.is_valid(policy)
    open_rule = json.loads(json.dumps(policy))  # a rule without `from` admits everyone
    open_rule["spec"]["ingress"].append({"ports": [{"port": 6379, "protocol": "TCP"}]})
    ignored = json.loads(json.dumps(policy))  # rules of a kind not in policyTypes are ignored by Kubernetes
    ignored["spec"]["policyTypes"] = ["Egress"]
    mixed_peer = json.loads(json.dumps(policy))  # ipBlock goes alone
    mixed_peer["spec"]["ingress"][0]["from"][0]["ipBlock"] = {"cidr": "0.0.0.0/0"}
    for bad in (open_rule, ignored, mixed_peer):
        assert not policies.is_valid(bad)


# --- versions and names agree ------------------------------------------------------------------------------

def test_dockerfile_base_image_matches_pinned_ray_and_ci_python():
    assert len([a for ins, a in _dockerfile() if ins == "FROM"]) == 1
    written, base = _base_image()
    # A build argument, so that a build pins the base image by digest (no registry was reachable to look it up
    # for the default): --build-arg RAY_IMAGE=rayproject/ray:<tag>@sha256:<digest>, as docs/deploying.md says.
    assert written in ("${RAY_IMAGE}", "$RAY_IMAGE"), written
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)(@sha256:[0-9a-f]{64})?", base)
    assert m, base
    tag = base.split("@")[0]
    assert f"--build-arg RAY_IMAGE={tag}@sha256:" in DEPLOYING.read_text(), "docs/deploying.md: how to pin the digest"
    assert m.group(1) == RAY_PIN
    assert (int(m.group(2)), int(m.group(3))) == sys.version_info[:2], "image Python != the Python CI runs"
    lowest = tuple(map(int, re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).groups()))
    assert sys.version_info[:2] >= lowest


def test_image_name_and_versions_agree_everywhere():
    labels = _labels()
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    repo, tag = IMAGE.split("@")[0].rsplit(":", 1)  # a digest after the tag is allowed (the schema checks its form)
    assert repo.rsplit("/", 1)[1] == labels["org.opencontainers.image.title"] and tag == PYPROJECT["project"]["version"]
    job = _kind("RayJob")["spec"]
    images = {c["image"] for _, spec in _cluster_specs() for c in _ray_containers(spec)}
    images |= {c["image"] for c in job["submitterPodTemplate"]["spec"]["containers"]}
    assert images == {IMAGE}
    assert {spec["rayVersion"] for _, spec in _cluster_specs()} == {RAY_PIN}
    readme = (REPO / "README.md").read_text()
    assert f"docker build -f docker/Dockerfile -t {IMAGE.split('@')[0]} ." in readme


def _token_files() -> list[tuple[str, dict, dict, dict]]:
    """(owner, container, its token mount, the Secret volume behind it) for every Ray container and the submitter."""
    out = []
    for owner, pod in _pod_specs():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            path = {e["name"]: e for e in c["env"]}["RAY_AUTH_TOKEN_PATH"]["value"]
            (mount,) = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
            out.append((owner, c, mount, volumes[mount["name"]]))
    return out


def test_token_auth_is_on_for_every_ray_container_and_the_submitter():
    """Every container: RAY_AUTH_MODE=token and the token as a file from the Secret, mounted read-only, named by
    RAY_AUTH_TOKEN_PATH; no container gets the token (or any Secret) as an environment value, which every task
    and subprocess would inherit."""
    secrets, paths = set(), set()
    for owner, c, mount, volume in _token_files():
        where = f"{owner} {c['name']}"
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        assert "RAY_AUTH_TOKEN" not in env, f"{where}: the token as an environment variable"
        assert all("valueFrom" not in e for e in c["env"]) and "envFrom" not in c, f"{where}: a Secret in its env"
        assert mount.get("readOnly") is True, where
        secret = volume["secret"]
        path = env["RAY_AUTH_TOKEN_PATH"]["value"]
        (item,) = [i for i in secret["items"] if path == mount["mountPath"].rstrip("/") + "/" + i["path"]]
        assert secret.get("defaultMode", 0o644) & 0o007 == 0, f"{where}: the token file is world-readable"
        secrets.add((secret["secretName"], item["key"]))
        paths.add(path)
    assert secrets == {("noprop-ray-auth", "auth_token")}, "all containers must share one token: docs' Secret"
    assert len(paths) == 1


def test_ray_reads_the_token_from_the_file_the_manifests_name(tmp_path):
    """Ray 2.60 itself (its C++ token loader, which every Ray process uses) takes the token from the file named by
    RAY_AUTH_TOKEN_PATH when RAY_AUTH_TOKEN is not set: what the manifests rely on. No cluster is started."""
    ((_, c, _, _), *_) = _token_files()
    token = tmp_path / "auth_token"
    token.write_text("f" * 32 + "\n")  # a trailing newline, as `kubectl create secret --from-file` may leave
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), HOME=str(tmp_path))  # no ~/.ray/auth_token
    assert {e["name"] for e in c["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"}
    probe = ("from ray._raylet import AuthenticationTokenLoader as L; l = L.instance(); "
             "print(l.has_token(), l.get_raw_token())")
    p = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["True", "f" * 32], p.stdout


# --- no Ray Client port ------------------------------------------------------------------------------------

def test_no_ray_client_port_is_declared():
    """KubeRay's head Service exposes the ports the head container declares (its defaults, Ray Client's 10001
    among them, only when it declares none): so the head declares its ports, and 10001 is not among them."""
    for owner, spec in _cluster_specs():
        assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"], owner
        for c in _ray_containers(spec):
            for port in c.get("ports", []):
                assert port["containerPort"] != 10001 and port.get("name") != "client", f"{owner} {c['name']}: {port}"
            assert "ray-client-server-port" not in spec["headGroupSpec"]["rayStartParams"]


def test_ray_cannot_turn_its_client_server_off():
    """Why the manifests only hide the Ray Client server instead of turning it off (their comment, docs): Ray 2.60's
    `ray start` gives it port 10001 whenever grpc is importable (always, with ray[default]) and refuses a port
    outside 1024-65535, 0 included. If a later Ray offers a switch, this fails: use it in the manifests."""
    from ray._private.parameter import RayParams

    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    scripts = (ray_dir / "scripts" / "scripts.py").read_text()
    assert "if has_ray_client and ray_client_server_port is None:" in scripts
    assert "ray_client_server_port = 10001" in scripts
    with pytest.raises(ValueError, match="between 1024 and 65535"):
        RayParams(ray_client_server_port=0)


# --- GPU worker groups and placement -----------------------------------------------------------------------

@pytest.mark.parametrize("owner,spec", _cluster_specs(), ids=[owner for owner, _ in _cluster_specs()])
def test_gpu_worker_groups_request_and_tolerate_gpus(owner, spec):
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "worker bundles must not land on the head"
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        for c in pod["containers"]:
            r = c["resources"]
            assert int(r["requests"]["nvidia.com/gpu"]) == int(r["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def _cpus(q) -> float:
    s = str(q)
    return int(s[:-1]) / 1000 if s.endswith("m") else float(s)


def test_rayjob_entrypoint_is_a_valid_run_that_fits_its_worker_group():
    job = _kind("RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "noprop_dist.run"], argv
    args = parse_args(argv[3:])
    assert args.config in config_names(), f"{args.config}: not a packaged config (the image has no configs/ dir)"
    cfg = load_config(args.config, args.overrides)  # the project's own validation
    # Only the driver (on the head) touches run.dir and data.root: both absolute, on the head's volume.
    mounts = [m["mountPath"] for c in job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
              for m in c.get("volumeMounts", [])]
    for path in (cfg.run.dir, cfg.data.root):
        assert path and Path(path).is_absolute() and any(path.startswith(m + "/") for m in mounts), path
    # Placement: W bundles of {CPU: c, GPU: g}; a pod with k GPUs and C CPUs holds min(k // g, C // c) of them.
    W, g, c = cfg.cluster.num_workers, cfg.cluster.gpus_per_worker, cfg.cluster.cpus_per_worker
    assert 1 <= W <= cfg.model.num_blocks and g > 0
    gpus = fits = 0
    for group in job["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        k, cpus = int(limits["nvidia.com/gpu"]), _cpus(limits["cpu"])
        gpus += group["replicas"] * k
        fits += group["replicas"] * min(math.floor(k / g + 1e-9), math.floor(cpus / c + 1e-9))
    assert W * g <= gpus and W <= fits, f"{W} workers x {g} GPU need {W * g} GPUs; the group has {gpus}"


def test_rayjob_cleans_up_after_itself():
    job = _kind("RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    # A hung run or a lost node must not hold the GPUs forever, nor be retried forever.
    assert 3600 <= job["activeDeadlineSeconds"] <= 7 * 86400 and 0 <= job["backoffLimit"] <= 3


def _pod_specs() -> list[tuple[str, dict]]:
    job = _kind("RayJob")["spec"]
    pods = [("RayJob submitter", job["submitterPodTemplate"]["spec"])]
    for owner, spec in _cluster_specs():
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
        pods += [(f"{owner} {name}", g["template"]["spec"]) for name, g in groups]
    return pods


@pytest.mark.parametrize("owner,pod", _pod_specs(), ids=[o for o, _ in _pod_specs()])
def test_every_pod_runs_unprivileged(owner, pod):
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 1000, "the image's user is ray (uid 1000)"
    assert ctx["seccompProfile"]["type"] == "RuntimeDefault" and pod["automountServiceAccountToken"] is False
    user = [a for ins, a in _dockerfile() if ins == "USER"]
    assert user and user[-1] == "ray", "the pods run as uid 1000: the image must end as user ray"
    for c in pod["containers"]:
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                        "readOnlyRootFilesystem": True}, c["name"]


# Where Ray writes in a container whose root filesystem is read-only: /tmp (its temp dir /tmp/ray: session
# directories with logs, sockets, spilled objects, unpacked working_dirs and runtime envs; Python's tempfile), ~/.ray
# (Ray's per-user files: a generated token) and ~/.cache (pip for a runtime_env, torch, matplotlib). /dev/shm, the
# object store, is an emptyDir that KubeRay adds itself.
WRITABLE = ("/tmp", "/home/ray/.ray", "/home/ray/.cache")
# Mounting over these would hide the image's own files: Ray's Python (/home/ray/anaconda3) and the package's directory.
IMAGE_DIRS = ("/", "/home", "/home/ray", "/home/ray/anaconda3", "/home/ray/noprop_dist")


@pytest.mark.parametrize("owner,pod", _pod_specs(), ids=[o for o, _ in _pod_specs()])
def test_read_only_root_with_scratch_volumes_where_ray_writes(owner, pod):
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod["containers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
        assert not {"TMPDIR", "RAY_TMPDIR", "HOME"} & {e["name"] for e in c["env"]}, "Ray would write elsewhere"
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for path in WRITABLE:
            assert path in mounts, f"{c['name']}: nothing writable at {path}"
            assert not mounts[path].get("readOnly") and set(volumes[mounts[path]["name"]]) == {"name", "emptyDir"}, path
        assert not set(IMAGE_DIRS) & set(mounts), f"{c['name']}: a volume hides the image's files"


def test_rays_default_temp_dir_is_on_the_tmp_volume():
    """Ray's own default temp dir, in an environment as bare as the pods' (no TMPDIR): under WRITABLE's /tmp."""
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "RAY_TMPDIR")}
    probe = "from ray._common.utils import get_default_ray_temp_dir; print(get_default_ray_temp_dir())"
    p = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0 and p.stdout.strip() == "/tmp/ray", (p.stdout + p.stderr)[-2000:]


NAMESPACE = "noprop"  # where the manifests are applied (they name none)
PORTS = (53, 80, 443, 6379, 8000, 8080, 8265, 10001, 12345, 52365)  # Ray's fixed ports, a random one, web, DNS


@dataclasses.dataclass
class Endpoint:
    labels: dict
    namespace: str | None = NAMESPACE  # None: an address outside the cluster
    ip: str = "10.8.0.10"


def _matches(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()  # the schema allows matchLabels only


def _peer_matches(peer: dict, ep: Endpoint) -> bool:
    if "ipBlock" in peer:
        ip, block = ipaddress.ip_address(ep.ip), peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if ep.namespace is None:
        return False
    if "namespaceSelector" in peer:
        in_ns = _matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ep.namespace})
    else:
        in_ns = ep.namespace == NAMESPACE
    return in_ns and _matches(peer.get("podSelector", {}), ep.labels)


def _side_allows(policies: list[dict], ep: Endpoint, kind: str, other: Endpoint, port: int, protocol: str) -> bool:
    """Kubernetes' rule: a pod selected by no policy of this kind is open; else some rule of one must admit."""
    if ep.namespace != NAMESPACE:
        return True  # these policies govern the pods of their own namespace only
    rules, peers = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    selecting = [p["spec"] for p in policies
                 if kind in p["spec"]["policyTypes"] and _matches(p["spec"]["podSelector"], ep.labels)]

    def port_ok(rule: dict) -> bool:
        return "ports" not in rule or any(q["port"] == port and q.get("protocol", "TCP") == protocol
                                          for q in rule["ports"])

    return not selecting or any(any(_peer_matches(peer, other) for peer in rule[peers]) and port_ok(rule)
                                for spec in selecting for rule in spec.get(rules, []))


def _allowed(policies: list[dict], src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    return (_side_allows(policies, src, "Egress", dst, port, protocol)
            and _side_allows(policies, dst, "Ingress", src, port, protocol))


def _open_ports(policies, src, dst, protocol="TCP") -> set[int]:
    return {port for port in PORTS if _allowed(policies, src, dst, port, protocol)}


def _ingress_ports(policies, src, dst) -> set[int]:
    """What dst's ingress policies alone admit from src (the source's egress policies might hide a hole)."""
    return {port for port in PORTS if _side_allows(policies, dst, "Ingress", src, port, "TCP")}


def _kuberay_pods() -> dict[str, Endpoint]:
    """The pods KubeRay makes from the manifests: the template's labels with KubeRay's own (ray.io/node-type,
    ray.io/group and ray.io/cluster are KubeRay's whatever the template says; a RayJob's cluster name gets a random
    suffix), and the RayJob's submitter with its template's labels."""
    job, cluster = _kind("RayJob"), _kind("RayCluster")
    pods, ip = {}, 10
    for owner, spec, name in (("job", job["spec"]["rayClusterSpec"], job["metadata"]["name"] + "-x7k2p"),
                              ("cluster", cluster["spec"], cluster["metadata"]["name"])):
        groups = [("head", "headgroup", spec["headGroupSpec"])]
        groups += [("worker", g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for node_type, group, g in groups:
            labels = g["template"].get("metadata", {}).get("labels", {})
            # KubeRay's head Service selects the head by app.kubernetes.io/name=kuberay: a template must not change it.
            assert "app.kubernetes.io/name" not in labels, f"{owner} {group}"
            ip += 1
            pods[f"{owner} {node_type}"] = Endpoint(
                {"ray.io/is-ray-node": "yes", "app.kubernetes.io/name": "kuberay", **labels,
                 "ray.io/node-type": node_type, "ray.io/group": group, "ray.io/cluster": name}, ip=f"10.8.0.{ip}")
    pods["submitter"] = Endpoint(job["spec"]["submitterPodTemplate"]["metadata"]["labels"], ip="10.8.0.99")
    return pods


def _policies(*files: str) -> list[dict]:
    return [d for name, d in _docs() if d["kind"] == "NetworkPolicy" and name in files]


def test_network_policy_admits_the_ray_pods_and_the_submitter_to_the_head():
    """cluster/networkpolicy.yaml, evaluated by Kubernetes' rules against the pods KubeRay makes from the manifests:
    each cluster's Ray pods talk to each other on any port and to DNS; the RayJob's submitter reaches its head's
    dashboard only; the metrics port is open to the monitoring namespace and nothing else is open to anyone else,
    the other cluster in the namespace included; nothing leaves but DNS. cluster/networkpolicy-download.yaml adds
    HTTP(S) to public addresses for the RayJob's head only."""
    policies = _policies("networkpolicy.yaml")
    pods = _kuberay_pods()
    prometheus = Endpoint({"app.kubernetes.io/name": "prometheus"}, "monitoring", "10.9.0.5")
    neighbour = Endpoint({"app": "web"}, NAMESPACE, "10.8.1.5")          # another pod of the same namespace
    stranger = Endpoint({"ray.io/is-ray-node": "yes"}, "other", "10.8.2.5")  # a Ray pod of another namespace
    # A Ray pod of a third cluster in the same namespace, with no policy of its own to hold it back.
    foreign = Endpoint({"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker", "ray.io/cluster": "x"},
                       ip="10.8.3.5")
    dns = Endpoint({"k8s-app": "kube-dns"}, "kube-system", "10.9.1.5")
    internet, metadata = Endpoint({}, None, "203.0.113.7"), Endpoint({}, None, "169.254.169.254")
    everyone_else = (prometheus, neighbour, stranger, dns)

    for mine, theirs in (("job", "cluster"), ("cluster", "job")):
        head, worker = pods[f"{mine} head"], pods[f"{mine} worker"]
        for a, b in ((worker, head), (head, worker), (worker, worker), (head, head)):
            assert _open_ports(policies, a, b) == set(PORTS), f"{mine}: Ray pods of one cluster, any port"
        for pod in (head, worker):
            assert _open_ports(policies, prometheus, pod) == {8080}, f"{mine}: the metrics port, to monitoring only"
            for other in (neighbour, stranger, dns, foreign, pods[f"{theirs} head"], pods[f"{theirs} worker"]):
                assert not _open_ports(policies, other, pod), f"{mine}: {other} must not get in"
                assert not _ingress_ports(policies, other, pod), f"{mine}: its ingress policy admits {other}"
            assert _ingress_ports(policies, prometheus, pod) == {8080}
            assert _open_ports(policies, pod, dns, "UDP") == {53} and _open_ports(policies, pod, dns) == {53}
            for other in (prometheus, neighbour, stranger, internet, metadata,
                          pods[f"{theirs} head"], pods[f"{theirs} worker"], pods["submitter"]):
                assert not _open_ports(policies, pod, other), f"{mine}: egress to {other}"

    submitter, head = pods["submitter"], pods["job head"]
    assert _open_ports(policies, submitter, head) == {8265}, \
        "the submitter's labels must match the policy, or `ray job submit` cannot reach the head"
    assert _ingress_ports(policies, submitter, head) == {8265}, "the head admits the submitter on 8265 only"
    for pod in (pods["job worker"], pods["cluster head"], pods["cluster worker"]):
        assert not _ingress_ports(policies, submitter, pod), pod
    for other in (pods["job worker"], pods["cluster head"], pods["cluster worker"], internet, *everyone_else[:3]):
        assert not _open_ports(policies, submitter, other), f"submitter egress to {other}"
    assert _open_ports(policies, submitter, dns, "UDP") == {53}
    for other in (head, pods["job worker"], *everyone_else):
        assert not _open_ports(policies, other, submitter), "nothing connects to the submitter"

    # Closed by default: every pod of the manifests is selected by an Ingress and an Egress policy.
    for name, pod in pods.items():
        for kind in ("Ingress", "Egress"):
            assert any(kind in p["spec"]["policyTypes"] and _matches(p["spec"]["podSelector"], pod.labels)
                       for p in policies), f"{name}: no {kind} policy selects it"

    # The first run's dataset download, opt-in: the RayJob's head only, HTTP(S), public addresses only.
    with_download = policies + _policies("networkpolicy-download.yaml")
    assert _open_ports(with_download, head, internet) == {80, 443}
    assert not _open_ports(policies, head, internet)
    for pod in (pods["job worker"], pods["cluster head"], pods["cluster worker"], submitter):
        assert not _open_ports(with_download, pod, internet), pod
    for private in (metadata, neighbour, stranger):
        assert not _open_ports(with_download, head, private), private


def test_network_policy_monitoring_rules_say_where_to_change_the_namespace():
    rules = [rule for _, d in _docs() if d["kind"] == "NetworkPolicy" for rule in d["spec"].get("ingress", [])
             if any("namespaceSelector" in peer for peer in rule["from"])]
    assert rules and all(rule["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}] for rule in rules)
    text = (CLUSTER / "networkpolicy.yaml").read_text()
    assert "change `monitoring`" in text and text.count("# METRICS") == len(rules), "each monitoring rule is marked"


# --- metrics -----------------------------------------------------------------------------------------------

def test_podmonitor_selects_the_ray_pods_metrics_port():
    spec = _kind("PodMonitor")["spec"]
    assert spec["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}  # KubeRay's label on Ray pods
    (endpoint,) = spec["podMetricsEndpoints"]
    for _, cluster_spec in _cluster_specs():
        for c in _ray_containers(cluster_spec):
            assert {"name": endpoint["port"], "containerPort": 8080} in c["ports"], c["name"]


def test_grafana_dashboard_is_valid_json_over_ray_metrics():
    cm = _kind("ConfigMap")
    (text,) = cm["data"].values()
    dash = json.loads(text)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    reporter = (ray_dir / "dashboard" / "modules" / "reporter" / "reporter_agent.py").read_text()  # Ray's gauges
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["panels"]
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            metric = re.match(r"ray_([a-z_]+)", target["expr"]).group(1)
            assert f'"{metric}"' in reporter, f"ray_{metric} is not a metric of Ray {RAY_PIN}"


# --- the hash lock ------------------------------------------------------------------------------------------

def _lock() -> dict[str, tuple[Requirement, list[str]]]:
    """docker/requirements.lock: {canonical name: (requirement, its sha256 hashes)}; refuses anything else in it."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    entries: dict[str, tuple[Requirement, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # A line of options (--index-url, --find-links, -e ...) would point pip elsewhere than PyPI, or at no hash.
        assert not line.startswith("-"), f"requirements.lock: {line[:80]}"
        spec, *options = [part.strip() for part in line.split(" --")]
        hashes = [o.removeprefix("hash=sha256:") for o in options]
        assert all(o.startswith("hash=sha256:") for o in options), f"{spec}: an option other than --hash=sha256:"
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), f"{spec}: no sha256 hash"
        req = Requirement(spec)
        assert canonicalize_name(req.name) not in entries, f"{req.name} twice"
        entries[canonicalize_name(req.name)] = (req, hashes)
    return entries


def test_lock_pins_every_dependency_with_hashes():
    """The image installs exactly docker/requirements.lock: every requirement pinned (==) with its files' sha256
    hashes; every dependency of pyproject.toml and every build requirement (the package is built without build
    isolation) in it, at a version its specifier allows; Ray at the version pinned everywhere else."""
    lock = _lock()
    for name, (req, _) in lock.items():
        (spec,) = req.specifier
        assert spec.operator == "==" and "*" not in spec.version, f"{name}: not pinned ({req})"
        assert req.marker is None, f"{name}: a marker ({req.marker}); the lock is for one platform"
    for dep in PYPROJECT["project"]["dependencies"] + PYPROJECT["build-system"]["requires"]:
        req = Requirement(dep)
        assert canonicalize_name(req.name) in lock, f"{req.name}: in pyproject.toml, not in the lock"
        (pinned,) = lock[canonicalize_name(req.name)][0].specifier
        assert req.specifier.contains(pinned.version, prereleases=True), f"{req.name}: {pinned.version} vs {req}"
    assert next(iter(lock["ray"][0].specifier)).version == RAY_PIN
    assert {"torch", "torchvision"} <= lock.keys()


def test_lock_was_generated_by_a_tool_for_the_images_python():
    """pip-compile's header: the Python it resolved for (markers, wheels) is the base image's, and the command it
    records is the one docs/deploying.md gives for regenerating the lock."""
    text = LOCK.read_text()
    m = re.search(r"autogenerated by pip-compile with Python (\d+)\.(\d+)\n#.*command:\n#\n#    (pip-compile .*)\n",
                  text)
    assert m, "docker/requirements.lock: not pip-compile's output"
    base = re.fullmatch(r"rayproject/ray:[\d.]+-py(\d)(\d+)-.*", _base_image()[1])
    assert (m.group(1), m.group(2)) == base.groups(), "the lock was resolved for another Python than the image's"
    command = m.group(3)
    for option in ("--generate-hashes", "--output-file=docker/requirements.lock", "pyproject.toml"):
        assert option in command.split(), option
    assert command in DEPLOYING.read_text(), "docs/deploying.md must give the command that generated the lock"


# --- the Dockerfile's install, in a venv -------------------------------------------------------------------

def _dockerignore_rules() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _dockerignored(rel: str, rules: list[str]) -> bool:
    """Docker's .dockerignore: the last rule matching the path or one of its parents wins; ! re-includes."""
    def regex(p: str) -> re.Pattern:
        out = re.escape(p.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        return re.compile(out.replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "$")

    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for rule in rules:
        negate, pattern = rule.startswith("!"), rule.lstrip("!")
        if any(regex(pattern).match(p) for p in prefixes):
            ignored = not negate
    return ignored


def _build_context_into(root: Path) -> Path:
    """Does the Dockerfile's WORKDIR and COPY steps into root (the image's /); returns the WORKDIR there."""
    rules = _dockerignore_rules()
    workdir = root
    for ins, args in _dockerfile():
        if ins == "WORKDIR":
            workdir = root / args.strip().lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins == "COPY":
            *sources, dest = [a for a in shlex.split(args) if not a.startswith("--")]
            target = workdir / dest
            for src in sources:
                for f in [REPO / src] if (REPO / src).is_file() else sorted((REPO / src).rglob("*")):
                    rel = f.relative_to(REPO).as_posix()
                    if f.is_dir() or _dockerignored(rel, rules):
                        continue
                    # Docker: a lone file copied to a dest without a trailing / is named dest.
                    if (REPO / src).is_file():
                        out = target / f.name if dest.endswith("/") or len(sources) > 1 else target
                    else:
                        out = target / f.relative_to(REPO / src)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out)
        else:
            assert ins in {"FROM", "LABEL", "RUN", "ENV", "USER", "ARG", "CMD"}, f"{ins}: not mirrored by this test"
    return workdir


def test_dockerignore_keeps_the_context_to_the_copied_files():
    rules = _dockerignore_rules()
    assert not _dockerignored("noprop_dist/core/chain.py", rules)
    assert not _dockerignored("noprop_dist/configs/fashion_mnist.yaml", rules)
    assert not _dockerignored("docker/requirements.lock", rules)
    for path in ("runs/quickstart/chain.pt", "data/FashionMNIST/raw/x", ".git/HEAD", "tests/test_ray.py",
                 "noprop_dist/__pycache__/run.cpython-311.pyc", "docker/compose.yaml", "cluster/rayjob.yaml"):
        assert _dockerignored(path, rules), path


def test_package_installs_with_the_dockerfiles_command(tmp_path):
    """The Dockerfile's two installs: the lock (`pip install --require-hashes -r docker/requirements.lock`), then the
    package with `--no-deps --no-build-isolation`. The second runs here as written, in a fresh venv, on the files the
    COPY lines and .dockerignore let in, and the installed package imports and finds its configs.

    Not exercised any more: installing the lock itself. It downloads the CUDA build of torch with its nvidia-*
    libraries, several GB, too much for CI's 2-core runner and its ~15 minutes; so whether the locked set installs
    together and whether each file matches its hash is only checked when the image is built. What is checked of it
    here: the RUN line's form, that COPY brings in the very lock file, and (test_lock_*) the lock's content."""
    lock_run, package_run = _pip_runs()
    assert lock_run[:4] == ["python", "-m", "pip", "install"] and "--require-hashes" in lock_run, lock_run
    assert lock_run[lock_run.index("-r") + 1] == LOCK.relative_to(REPO).as_posix(), lock_run
    assert package_run[:4] == ["python", "-m", "pip", "install"] and package_run[-1] == ".", package_run
    assert {"--no-deps", "--no-build-isolation"} <= set(package_run), "nothing may come from outside the lock"
    workdir = _build_context_into(tmp_path / "image")
    assert (workdir / lock_run[lock_run.index("-r") + 1]).read_bytes() == LOCK.read_bytes()
    assert (workdir / "noprop_dist" / "run.py").is_file()
    assert (workdir / "noprop_dist" / "configs" / "fashion_mnist.yaml").is_file()
    venv = tmp_path / "venv"
    # System site packages hold pip, torch, ray, setuptools etc. already, as the image holds them after the lock's
    # install: with --no-deps and no build isolation nothing at all is fetched. --without-pip: no ensurepip, whose
    # bundled old setuptools would shadow those (in the image the lock's setuptools builds the package).
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = str(venv / "bin" / "python")
    probe = "import setuptools; print(setuptools.__version__)"
    p = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    (build_req,) = PYPROJECT["build-system"]["requires"]
    assert p.returncode == 0 and Requirement(build_req).specifier.contains(p.stdout.strip()), (p.stdout + p.stderr)
    p = subprocess.run([python, *package_run[1:]], cwd=workdir, capture_output=True, text=True, timeout=600,
                       check=False)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    probe = "import noprop_dist, noprop_dist.run, noprop_dist.distributed.driver; print(noprop_dist.__file__)"
    p = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert Path(p.stdout.strip()).is_relative_to(venv), f"imported {p.stdout.strip()}, not the venv's install"
    assert (venv / "bin" / "noprop-run").is_file()
    # The packaged configs come with the install: --config NAME works in the image from any directory.
    probe = "from noprop_dist.config import config_file; print(config_file('fashion_mnist'))"
    p = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0 and Path(p.stdout.strip()).is_relative_to(venv), (p.stdout + p.stderr)[-3000:]
