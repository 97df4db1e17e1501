"""A lost node on a real multi-node local Ray cluster: a head and 1-CPU worker nodes on loopback
(``ray.cluster_utils.Cluster``), the node that holds a worker's bundle killed (raylet and workers) after
the first epoch's checkpoint. The scenarios run in a process of their own (the tests' session cluster is
single-node, and a process holds one Ray connection), one after the other on one cluster: the first starts with
a head and 2 nodes and loses one, which leaves the second's cluster, a head and 1 node."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from ray.cluster_utils import Cluster

pytestmark = pytest.mark.ray

# 600 images, batch 64: 10 steps an epoch; 4 blocks, 3 epochs.
STEPS = 3 * 4 * 10


@pytest.fixture(scope="module")
def scenarios() -> list[dict]:
    """What happened in each scenario, in order, with the restarts its driver blamed on a hang. Slow: a cluster of
    three nodes starts, and the second scenario waits out its cluster.placement_timeout_s."""
    # The GCS takes a node for dead after 5 missed health checks, one every 3 s by default: one a second here, so
    # the loss is noticed in seconds rather than in some 15 s.
    # Its own Ray temp dir (short: it holds sockets): ray.cluster_utils.Cluster records its head in the temp dir's
    # ray_current_cluster, and in the default one (/tmp/ray) a test beside this one that starts a cluster of its
    # own would find it and join it instead.
    with tempfile.TemporaryDirectory(prefix="ln", dir="/tmp") as ray_tmp:
        proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=480,
                              env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": ray_tmp,
                                   "RAY_health_check_period_ms": "1000"})
    # The driver's messages (restarts and why) reach the process's stdout, each scenario's before its result.
    outputs, results = [], []
    for part in proc.stdout.split("\nRESULT "):
        result, _, output = part.partition("\n")
        results.append(result)
        outputs.append(output)
    assert len(results) == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(r) | {"hung_restarts": output.count("made no step")}
            for r, output in zip(results[1:], [f"{results[0]}\n{outputs[0]}", outputs[1]])]


def test_lost_node_with_room_left_finishes_with_every_block(scenarios):
    """Head + 2 nodes (3 CPUs) for 2 one-CPU workers: after the loss Ray places the bundle on the node
    left, the worker restarts from its checkpoint, and the run ends with every block step applied once."""
    r = scenarios[0]
    assert r["error"] is None, r
    assert r["blocks"] == [1, 2, 3, 4] and r["version"] == STEPS
    assert r["restarts"] and all(e["kind"] == "worker" for e in r["restarts"])


def test_lost_node_without_room_fails_with_one_line_naming_what_is_left(scenarios):
    """Head + 1 node (2 CPUs) for 2 one-CPU workers: after the loss the bundle has no node to go to. The run
    must not restart the waiting worker as hung until its budget is spent (a message that blames a hang);
    after cluster.placement_timeout_s it fails with one line: the worker, its blocks, what the cluster has
    left, and the number of workers that fit."""
    r = scenarios[1]
    error = r["error"] or ""
    assert re.match(r"TrainingFailed: worker (0 \(blocks 1-2\)|1 \(blocks 3-4\)) lost its node in epoch 2", error), r
    assert "found no room" in error and "1 CPU left" in error and "cluster.num_workers=1" in error, error
    assert "\n" not in error and "made no step" not in error, error
    assert r["hung_restarts"] == 0, r


def _run(cluster: Cluster, nodes: list) -> dict:
    """Train in a thread, kill the node of ``nodes`` that holds a bundle after epoch 1 (and take it from
    ``nodes``); what happened."""
    from ray.util import placement_group_table

    from noprop_dist.config import load_config
    from noprop_dist.distributed.driver import run_training

    run_dir = tempfile.mkdtemp()
    cfg = load_config(None, ["model.num_blocks=4", "cluster.num_workers=2", "train.epochs=3", "data.train_limit=600",
                             "data.test_limit=200", "train.batch_size=64", "metrics.enabled=false",
                             "eval.every_epochs=0", "cluster.hang_timeout_s=20", "cluster.placement_timeout_s=8",
                             f"run.dir={run_dir}"])
    out: dict = {"error": None}

    def train() -> None:
        try:
            s = run_training(cfg, log=print)
            out.update(blocks=[b["block"] for b in s["blocks"]], version=s["shared_state_version"],
                       restarts=s["restarts"])
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=train)
    thread.start()
    manifest = os.path.join(run_dir, "manifest.json")
    while thread.is_alive() and not (os.path.exists(manifest) and json.load(open(manifest))["epochs_done"] >= 1):
        time.sleep(0.2)
    held = {n for pg in placement_group_table().values() for n in pg["bundles_to_node_id"].values()}
    victim = next(n for n in nodes if n.node_id in held)
    nodes.remove(victim)
    cluster.remove_node(victim, allow_graceful=False)
    lost = time.monotonic()
    thread.join()
    out["seconds_after_loss"] = round(time.monotonic() - lost, 1)
    return out


if __name__ == "__main__":
    import ray

    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                         "include_dashboard": False})
    extra = [head.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
    ray.init(address=head.address)
    for _ in range(2):  # with room left after the loss, then (a node fewer) without
        print("\nRESULT " + json.dumps(_run(head, extra)), flush=True)
