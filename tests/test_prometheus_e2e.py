"""Scraping by a real Prometheus: every PromQL expression of the Grafana dashboard, on a real two-worker run.

Debian's `prometheus` binary runs on loopback with cluster/prometheus/prometheus.yml and its rule file,
changed only in its scrape and rule intervals (1 s) and in where Ray's service-discovery file is: the
training subprocess gets a private Ray temp dir (RAY_TMPDIR), so it neither joins nor is confused with other local clusters, and
its Ray exports metrics every second (RAY_metrics_report_interval_ms) instead of every ten.
The assertions go through Prometheus' HTTP API, at a moment when the workers were still training.

The run is also the one that checks where a local cluster listens: it is started as a user's program that imports
Ray before noprop_dist, with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER absent, and every listener of its process tree is
sampled while it runs.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import yaml
from conftest import stop_process_tree

from noprop_dist.observability import metrics as M

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "cluster" / "grafana" / "dashboards" / "noprop-blocks.json"
PROMETHEUS_CONFIG = REPO / "cluster" / "prometheus" / "prometheus.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
EPOCHS, SHARDS, WORKERS = 8, ("1", "2", "3", "4"), ("0", "1")
# ~720 steps per shard (all 1,437 training digits): over ten seconds of training, so several 1 s scrapes of every
# worker even on an idle machine, where Ray exports a worker's first values some seconds after it starts.
# A quarter of that once left one sample per shard, too few for rate().
RUN = ["data.test_limit=100", "model.num_blocks=4", "cluster.num_workers=2",
       f"train.epochs={EPOCHS}", "train.batch_size=16", "metrics.write_every_seconds=1"]

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not os.path.exists(PROMETHEUS),
                       reason="Debian's prometheus binary is not installed (scripts/setup.sh installs it)"),
]

# What a value of each metric must look like at the end of the run, beyond being finite.
PLAUSIBLE = {
    M.SHARD_SAMPLES: lambda v: v > 0,
    M.SHARD_STEP_SECONDS: lambda v: 0 < v < 60,
    M.SHARD_LOSS: lambda v: v > 0,
    M.SHARD_EPOCHS_DONE: lambda v: 0 < v <= EPOCHS,
    M.SHARD_PROGRESS: lambda v: 0 < v <= 1,
    M.PS_PUSH_SECONDS: lambda v: 0 < v < 10,
    M.PS_PULL_SECONDS: lambda v: 0 < v < 10,
    M.PS_APPLY_SECONDS: lambda v: v > 0,
    M.EMBEDDING_LAG: lambda v: v >= 0,  # 0 at an epoch's first pull when no worker pushed since
    M.WORKER_RESTARTS: lambda v: v == 0,
}


@dataclass
class Scraped:
    url: str
    run: str
    started: float  # when the training subprocess started
    at: float  # a moment when every worker was still training
    run_dir: Path
    output: str
    listeners: set[str]  # every listener seen while the run went on, as "process name=address:port"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, **params: str) -> object:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:  # Prometheus explains a bad query in the body
        raise AssertionError(f"{params}: {e.read().decode()}") from None
    assert body["status"] == "success", body
    return body["data"]


def _listeners(root: psutil.Process) -> set[str]:
    """Listening TCP addresses of a process and all its descendants (Ray's daemons and workers). One read of the
    machine's socket tables: a process's own ``net_connections`` reads them whole too, once per process."""
    try:
        tree = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        return set()
    out = set()
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in tree:
            try:
                out.add(f"{tree[c.pid].name()}={c.laddr.ip}:{c.laddr.port}")
            except psutil.NoSuchProcess:
                pass
    return out


def _start_prometheus(temp: Path) -> tuple[subprocess.Popen, str]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]  # config moves
    sd = config["scrape_configs"][0]["file_sd_configs"][0]
    sd["files"] = [str(temp / "ray" / Path(f).name) for f in sd["files"]]  # same file, this test's Ray temp dir
    sd["refresh_interval"] = "1s"
    (temp / "ray").mkdir()
    (temp / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{_free_port()}"
    with open(temp / "prometheus.log", "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={temp / 'prometheus.yml'}", f"--web.listen-address={url[7:]}",
             f"--storage.tsdb.path={temp / 'tsdb'}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=2)
            return proc, url
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (temp / "prometheus.log").read_text()
            time.sleep(0.3)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> Iterator[Scraped]:
    """The module's one run, scraped by Prometheus while it trains. Slow (some 25 s alone): a local cluster of its
    own with the dashboard (service discovery), and 8 epochs of all the digits at batch 16, so that the 1 s scrapes
    see every worker several times."""
    # Short: Ray's Unix sockets live under it and their paths must stay below ~107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="npm", dir="/tmp"))
    prom, url = _start_prometheus(temp)
    run_dir = tmp_path_factory.mktemp("run")
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_metrics_report_interval_ms": "1000", "PYTHONUNBUFFERED": "1"}
    # Bug seen: without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 exported before Python started, Ray (imported before the
    # run set it) rewrote 127.0.0.1 to the routable address: GCS, raylet, workers and the parameter server
    # listened on every interface. So the variable is absent and Ray is imported first, as a user's program may.
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    program = "import ray, sys; from noprop_dist.run import main; sys.exit(main(sys.argv[1:]))"
    log = open(temp / "run.log", "w+")
    started = time.time()
    train = subprocess.Popen([sys.executable, "-c", program, *sum((["--set", s] for s in RUN), []),
                              "--set", f"run.dir={run_dir}"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        listeners: set[str] = set()
        root = psutil.Process(train.pid)
        deadline = time.monotonic() + 300
        while train.poll() is None:
            assert time.monotonic() < deadline, "training did not finish in 300 s"
            listeners |= _listeners(root)  # each of Ray's processes listens from its start to its end
            time.sleep(1.0)
        log.seek(0)
        output = log.read()
        assert train.returncode == 0, output[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        at = max(r["time"] for r in rows if r["event"] == "epoch")  # the last epoch's end; actors still alive
        yield Scraped(url, summary["run_id"], started, at, run_dir, output, listeners)
    finally:
        stop_process_tree(train, timeout=15)
        stop_process_tree(prom, timeout=15)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _whole_run(s: Scraped) -> str:
    """A PromQL range from the training subprocess' start to the query time."""
    return f"{int(s.at - s.started) + 1}s"


def _scrapes(s: Scraped) -> str:
    """How the scrapes of Ray's nodes went during the run, for failure messages."""
    window = f"[{_whole_run(s)}]"
    out = {}
    for name, q in (("scrapes", f"count_over_time(up{{job='ray'}}{window})"),
                    ("failed", f"count_over_time(up{{job='ray'}}{window}) - sum_over_time(up{{job='ray'}}{window})"),
                    ("slowest_s", f"max_over_time(scrape_duration_seconds{{job='ray'}}{window})"),
                    ("sample_counts", f'count_over_time(ray_noprop_shard_samples_total{{run="{s.run}"}}{window})')):
        result = _api(s.url, "query", query=q, time=str(s.at))["result"]
        out[name] = sorted(r["value"][1] for r in result)
    return f"scrapes during the run: {out}"


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _targets() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _dashboard()["panels"] for t in p["targets"]]


def _specs_in(expr: str) -> list[M.MetricSpec]:
    names = set(re.findall(r"ray_noprop_\w+", expr))
    specs = [s for s in M.ALL_METRICS if names & set(s.series_names())]
    assert len(specs) == len(names), f"unknown metric in {expr!r}"
    return specs


def _assert_aggregates(expr: str) -> None:
    """Ray labels every series with its WorkerId; a panel must aggregate it away (`by (run, shard)`) so
    that a restarted worker continues its line instead of starting another."""
    found = re.findall(r"\bby \(([^)]*)\)", expr)
    assert found, f"{expr!r} does not aggregate"
    assert "WorkerId" not in found[0], expr


def _promql(expr: str, s: Scraped) -> str:
    """The expression as Grafana sends it for this run and all shards (a single-valued variable goes in as
    it is; run ids have no regex characters but `.`, which matches itself too). $__rate_interval becomes
    the whole run: however few scrapes fell into the training, every one of them counts."""
    return expr.replace("$__rate_interval", _whole_run(s)).replace("$run", s.run).replace("$shard", ".*")


def test_the_local_cluster_listens_on_loopback_only(scraped):
    """The run imported Ray first, without the loopback variable (see the fixture): every listener of its process
    tree, sampled while it ran, must be on loopback."""
    names = {x.split("=")[0] for x in scraped.listeners}
    assert {"gcs_server", "raylet"} <= names and any("Worker" in n for n in names), scraped.listeners  # Ray was seen
    public = sorted(x for x in scraped.listeners if not re.search(r"=(127\.0\.0\.1|::ffff:127\.0\.0\.1|::1):", x))
    assert not public, f"listening beyond loopback: {public}"


def test_every_dashboard_expression_gives_one_series_per_shard_or_worker(scraped):
    for title, raw in _targets():
        specs = _specs_in(raw)
        result = _api(scraped.url, "query", query=_promql(raw, scraped), time=str(scraped.at))["result"]
        if any(s.gpu_only for s in specs):  # the run asks for no GPU (cluster.gpus_per_worker = 0)
            assert result == [], f"{title}: GPU series from CPU workers"
            continue
        _assert_aggregates(raw)
        # One line per shard for a per-shard metric, per worker for a per-worker one: from the definition,
        # so a panel that sums shards together fails here.
        labels = set(specs[0].labels)
        key = "shard" if "shard" in labels else "worker" if "worker" in labels else None
        expected = {"shard": SHARDS, "worker": WORKERS, None: ("",)}[key]
        got = sorted(r["metric"].get(key, "") if key else "" for r in result)
        assert got == sorted(expected), \
            f"{title}: {raw}\nseries: {[r['metric'] for r in result]}\n{_scrapes(scraped)}"
        for r in result:
            assert r["metric"].get("run") == scraped.run, r
            value = float(r["value"][1])
            assert math.isfinite(value), f"{title}: {r}"
            for spec in specs:
                if spec in PLAUSIBLE:
                    assert PLAUSIBLE[spec](value), f"{title}: implausible {value} for {spec.name} ({r['metric']})"


def test_the_embedding_lag_counts_the_updates_a_replica_missed(scraped):
    # Sync mode pulls after every push, so each refresh brings at least the worker's own push.
    q = f'max by (worker) (max_over_time(ray_noprop_worker_embedding_version_lag{{run="{scraped.run}"}}[5m]))'
    result = _api(scraped.url, "query", query=q, time=str(scraped.at))["result"]
    assert sorted(r["metric"]["worker"] for r in result) == list(WORKERS)
    assert all(float(r["value"][1]) >= 1 for r in result), result


def test_the_dashboard_references_only_exported_metrics_and_covers_them_all(scraped):
    series = _api(scraped.url, "series", **{"match[]": f'{{run="{scraped.run}"}}'},
                  start=str(scraped.at - 600), end=str(scraped.at))
    legacy = {r["record"] for r in M.legacy_recording_rules()["groups"][0]["rules"]}
    series = [s for s in series if s["__name__"] not in legacy]  # the rule file's, tested below
    exported = {s["__name__"] for s in series}
    dashboard = json.dumps(_dashboard())
    referenced = set(re.findall(r"ray_noprop_\w+", dashboard))
    gpu = {n for s in M.ALL_METRICS if s.gpu_only for n in s.series_names()}
    missing = referenced - exported - gpu  # a CPU run has no GPU series
    assert not missing, f"the dashboard uses metrics the run did not export: {missing}"
    unused = [s.name for s in M.ALL_METRICS if not referenced & set(s.series_names())]
    assert not unused, f"metrics no panel shows: {unused}"
    # Every exported series carries its definition's labels (and nothing defines Ray's worker id as one).
    for s in series:
        spec = next(x for x in M.ALL_METRICS if s["__name__"] in x.series_names())
        assert set(spec.labels) <= set(s), (spec.name, s)


def test_prometheus_sees_the_defined_types_and_help(scraped):
    meta = _api(scraped.url, "metadata")
    for spec in M.ALL_METRICS:
        if spec.gpu_only:
            continue
        assert spec.family in meta, f"{spec.family} not scraped"
        assert meta[spec.family][0]["type"] == spec.kind, (spec.family, meta[spec.family])
        assert meta[spec.family][0]["help"] == spec.help, (spec.family, meta[spec.family])


def test_old_dashboards_still_find_the_per_shard_series_under_their_old_names(scraped):
    """The rule file gives every per-shard series again as ray_noprop_block_* with label block = shard: the
    queries of a dashboard written before the rename see every shard, with the new series' values."""
    run, window = scraped.run, _whole_run(scraped)
    old_panels = [
        f'max by (run, block) (ray_noprop_block_loss{{run=~"{run}", block=~".*"}})',
        f'sum by (run, block) (rate(ray_noprop_block_samples_total{{run=~"{run}", block=~".*"}}[{window}]))',
        "histogram_quantile(0.95, sum by (run, block, le) (rate(ray_noprop_block_step_seconds_bucket"
        f'{{run=~"{run}", block=~".*"}}[{window}])))',
    ]
    for q in old_panels:
        got = _api(scraped.url, "query", query=q, time=str(scraped.at))["result"]
        assert sorted(r["metric"]["block"] for r in got) == sorted(SHARDS), (q, got)
        assert all(math.isfinite(float(r["value"][1])) and float(r["value"][1]) > 0 for r in got), (q, got)
    # A recorded copy is the series itself, as of the rule's last evaluation (at most an interval behind).
    def samples(name: str, label: str) -> dict[str, float]:
        q = f'sum by ({label}) ({name}{{run="{run}"}})'
        return {r["metric"][label]: float(r["value"][1])
                for r in _api(scraped.url, "query", query=q, time=str(scraped.at))["result"]}
    old, new = samples("ray_noprop_block_samples_total", "block"), samples("ray_noprop_shard_samples_total", "shard")
    assert old.keys() == new.keys() and all(0 < old[k] <= new[k] for k in old), (old, new)


def test_the_dashboard_variables_find_the_run_and_its_shards(scraped):
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    for name, expected in (("run", {scraped.run}), ("shard", set(SHARDS))):
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", variables[name]["definition"])
        assert m and m.group(2) == name, variables[name]["definition"]
        values = _api(scraped.url, f"label/{name}/values", **{"match[]": _promql(m.group(1), scraped)},
                      start=str(scraped.at - 600), end=str(scraped.at))
        assert expected <= set(values), (name, values)


def test_the_run_wrote_metrics_over_time_and_a_report(scraped):
    rows = [json.loads(line) for line in (scraped.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == {scraped.run}
    epochs = [r for r in rows if r["event"] == "epoch"]
    assert sorted((r["block"], r["epoch"]) for r in epochs) == sorted(
        (b, float(e)) for b in range(1, 5) for e in range(1, EPOCHS + 1))
    for b in range(1, 5):
        mine = [r for r in rows if r["block"] == b]
        assert [r["time"] for r in mine] == sorted(r["time"] for r in mine)
        assert any((r["samples_per_second"] or 0) > 0 for r in mine), mine
        assert all(r["loss_ema"] is None or math.isfinite(r["loss_ema"]) for r in mine)
    report = (scraped.run_dir / "report.md").read_text()
    assert f'run="{scraped.run}"' in report and "Test accuracy" in report
    assert [ln.split("|")[1].strip() for ln in report.splitlines() if re.match(r"\| \d+ \| \d+ \| \d+ ", ln)] == \
        list(SHARDS)
    assert f'run="{scraped.run}"' in scraped.output  # the driver says which label to look for
