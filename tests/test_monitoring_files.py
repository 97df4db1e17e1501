"""The monitoring files as files: dashboard JSON, Grafana provisioning, Prometheus config, compose file.

What they do with live data is tests/test_prometheus_e2e.py; here, what can be checked without a server
(there is no Grafana and no Docker engine on this machine).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from noprop_dist.observability import metrics as M

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "cluster" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "noprop-blocks.json"
PROMETHEUS_CONFIG = REPO / "cluster" / "prometheus" / "prometheus.yml"
COMPOSE = REPO / "docker" / "compose.yaml"


def test_dashboard_uses_the_datasource_variable_and_defined_metrics_only():
    d = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for v in ("run", "shard"):
        assert variables[v]["datasource"]["uid"] == "${datasource}"
    known = {n for s in M.ALL_METRICS for n in s.series_names()}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert set(re.findall(r"ray_noprop_\w+", t["expr"])) <= known, t["expr"]
            assert 'run=~"$run"' in t["expr"], t["expr"]  # every panel follows the run variable


def test_the_legacy_rule_files_are_the_ones_metrics_defines():
    """cluster/prometheus/rules.yml (local Prometheus) and cluster/prometheusrule.yaml (prometheus-operator)
    hold exactly legacy_recording_rules(): regenerate both from it when a per-shard metric changes."""
    rules = M.legacy_recording_rules()
    assert yaml.safe_load((PROMETHEUS_CONFIG.parent / "rules.yml").read_text()) == rules
    assert yaml.safe_load((REPO / "cluster" / "prometheusrule.yaml").read_text())["spec"] == rules
    assert yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"] == ["rules.yml"]
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "../cluster/prometheus/rules.yml:/etc/prometheus/rules.yml:ro" in mounts


def test_grafana_provisioning_points_at_the_dashboards():
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "noprop.yaml").read_text())
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = {v.split(":")[0]: v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]}
    # The provider's path is where compose mounts cluster/grafana/dashboards.
    assert mounts["../cluster/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert mounts["../cluster/grafana/provisioning"] == "/etc/grafana/provisioning"


def test_compose_mounts_existing_files_and_stays_on_loopback():
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, svc in compose["services"].items():
        assert svc["network_mode"] == "host", name  # Ray listens on 127.0.0.1: only the host network reaches it
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith(".."):
                assert (COMPOSE.parent / src).exists(), (name, src)
    prom = compose["services"]["prometheus"]
    assert "--web.listen-address=127.0.0.1:9090" in prom["command"]
    assert "../cluster/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert compose["services"]["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    # Prometheus reads the discovery file through the /tmp/ray mount.
    sd_files = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert all(f.startswith("/tmp/ray/") for f in sd_files) and "/tmp/ray:/tmp/ray:ro" in prom["volumes"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) not installed")
def test_prometheus_config_is_valid():
    p = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
