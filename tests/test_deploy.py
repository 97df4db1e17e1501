"""Deployment files, checked without Docker or Kubernetes (neither exists here): every manifest in cluster/
parses and validates against the hand-written schemas in cluster/schemas/; image, Ray and Python versions
agree across docker/Dockerfile, the manifests and pyproject.toml; the RayJob's entrypoint is a valid run
whose GPU placement fits its worker group; and the Dockerfile's pip command installs the package from the
files its COPY lines take (run in a venv)."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
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


IMAGE = _kind("RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


# --- manifests: parse, schema ------------------------------------------------------------------------------

def test_every_manifest_parses_and_has_a_schema():
    docs = _docs()
    assert len(docs) == len(list(CLUSTER.glob("*.yaml"))), "one document per file"
    assert sorted(d["kind"] for _, d in docs) == sorted(SCHEMA_OF_KIND)


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
    for bad in (typo, half_gpu, root, escalating, token):
        assert not validator.is_valid(bad)


# --- versions and names agree ------------------------------------------------------------------------------

def test_dockerfile_base_image_matches_pinned_ray_and_ci_python():
    (base,) = [a for ins, a in _dockerfile() if ins == "FROM"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", base)
    assert m, base
    assert m.group(1) == RAY_PIN
    assert (int(m.group(2)), int(m.group(3))) == sys.version_info[:2], "image Python != the Python CI runs"
    lowest = tuple(map(int, re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).groups()))
    assert sys.version_info[:2] >= lowest


def test_image_name_and_versions_agree_everywhere():
    labels = _labels()
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    repo, tag = IMAGE.rsplit(":", 1)
    assert repo.rsplit("/", 1)[1] == labels["org.opencontainers.image.title"] and tag == PYPROJECT["project"]["version"]
    job = _kind("RayJob")["spec"]
    images = {c["image"] for _, spec in _cluster_specs() for c in _ray_containers(spec)}
    images |= {c["image"] for c in job["submitterPodTemplate"]["spec"]["containers"]}
    assert images == {IMAGE}
    assert {spec["rayVersion"] for _, spec in _cluster_specs()} == {RAY_PIN}
    readme = (REPO / "README.md").read_text()
    assert f"docker build -f docker/Dockerfile -t {IMAGE} ." in readme


def test_token_auth_is_on_for_every_ray_container_and_the_submitter():
    job = _kind("RayJob")["spec"]
    containers = [c for _, spec in _cluster_specs() for c in _ray_containers(spec)]
    containers += job["submitterPodTemplate"]["spec"]["containers"]
    secrets = set()
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1, "all containers must share one token"


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
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}, c["name"]


def test_network_policy_admits_the_ray_pods_and_the_submitter_to_the_head():
    policy = _kind("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"} and policy["policyTypes"] == ["Ingress"]
    peers = [p["podSelector"]["matchLabels"] for rule in policy["ingress"] if "ports" not in rule
             for p in rule["from"]]
    submitter = _kind("RayJob")["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    assert {"ray.io/is-ray-node": "yes"} in peers
    assert any(p.items() <= submitter.items() for p in peers if "ray.io/is-ray-node" not in p), \
        "the submitter's labels must match the policy, or `ray job submit` cannot reach the head"
    open_ports = [port["port"] for rule in policy["ingress"] if "ports" in rule for port in rule["ports"]]
    assert open_ports == [8080], "only the metrics port is open to other namespaces"


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
                    out = target / (f.name if (REPO / src).is_file() else f.relative_to(REPO / src))
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out)
        else:
            assert ins in {"FROM", "LABEL", "RUN", "ENV", "USER", "ARG", "CMD"}, f"{ins}: not mirrored by this test"
    return workdir


def test_dockerignore_keeps_the_context_to_the_copied_files():
    rules = _dockerignore_rules()
    assert not _dockerignored("noprop_dist/core/chain.py", rules)
    assert not _dockerignored("noprop_dist/configs/fashion_mnist.yaml", rules)
    for path in ("runs/quickstart/chain.pt", "data/FashionMNIST/raw/x", ".git/HEAD", "tests/test_ray.py",
                 "noprop_dist/__pycache__/run.cpython-311.pyc"):
        assert _dockerignored(path, rules), path


def test_package_installs_with_the_dockerfiles_command(tmp_path):
    (run,) = [a for ins, a in _dockerfile() if ins == "RUN" and "pip install" in a]
    argv = shlex.split(run)
    assert argv[:4] == ["python", "-m", "pip", "install"] and argv[-1] == ".", argv
    workdir = _build_context_into(tmp_path / "image")
    assert (workdir / "noprop_dist" / "run.py").is_file()
    assert (workdir / "noprop_dist" / "configs" / "fashion_mnist.yaml").is_file()
    venv = tmp_path / "venv"
    # System site packages hold torch, ray etc. already (as the base image holds Ray): nothing big is fetched.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    p = subprocess.run([python, *argv[1:]], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    probe = "import noprop_dist, noprop_dist.run, noprop_dist.distributed.driver; print(noprop_dist.__file__)"
    p = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert Path(p.stdout.strip()).is_relative_to(venv), f"imported {p.stdout.strip()}, not the venv's install"
    assert (venv / "bin" / "noprop-run").is_file()
    # The packaged configs come with the install: --config NAME works in the image from any directory.
    probe = "from noprop_dist.config import config_file; print(config_file('fashion_mnist'))"
    p = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and Path(p.stdout.strip()).is_relative_to(venv), (p.stdout + p.stderr)[-3000:]
