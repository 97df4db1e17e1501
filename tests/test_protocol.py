"""The shared-state protocol's guarantees (docs/parameter_server.md): what a replica holds when, every push
applied exactly once, sync runs that repeat bit for bit with several workers, on a real local Ray cluster."""
import pytest
import torch
from conftest import make_spec

from noprop_dist.config import TrainConfig, load_config
from noprop_dist.distributed.driver import run_training
from noprop_dist.storage.checkpoints import CheckpointStore
from noprop_dist.training.shared_state import (
    LocalClient,
    SharedReplica,
    SharedStateServer,
)

EXCHANGES = 6


def _replicas(mode: str) -> tuple[SharedStateServer, list[SharedReplica]]:
    spec = make_spec("learned", num_shards=2)
    server = SharedStateServer(spec, 0, sources=["w0", "w1"], mode=mode)
    server.flat.zero_()  # integer-valued updates on a zero state: every sum below is exact
    train = TrainConfig(sync_mode=mode)
    reps = [SharedReplica(spec, train, LocalClient(server, f"w{w}"), torch.device("cpu"), log=lambda s: None)
            for w in (0, 1)]
    for r in reps:
        r.begin_epoch()
    return server, reps


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_replica_holds_all_its_own_updates_and_the_others_up_to_two_exchanges_back(mode):
    """Two workers in lockstep (w0's exchange k, then w1's); worker w adds unit[w] between exchanges."""
    server, reps = _replicas(mode)
    unit = [torch.ones_like(server.flat), torch.full_like(server.flat, 100.0)]
    for k in range(1, EXCHANGES + 1):
        for w, rep in enumerate(reps):
            with torch.no_grad():
                rep.flat.add_(unit[w])  # what its shards' steps did since its last exchange
            rep.exchange((0, k), steps=w + 1, last=k == EXCHANGES)
            # sync: the state taken at exchange k holds the rounds up to k - 2 of every worker. async: the
            # state right after this worker's exchange k - 1, which holds what w1 had pushed by then (k - 2)
            # for w0, and w0's exchange k - 1 for w1, which pushes after it.
            seen = max(0, k - 2) if (mode == "sync" or w == 0) else k - 1
            assert torch.equal(rep.flat, k * unit[w] + seen * unit[1 - w]), (mode, k, w)
            if k > 2:
                assert rep.stats.lag == (1 - w) + 1  # the other's block steps of one exchange
    # Every delta applied exactly once: the server holds every update and counts every block step.
    assert torch.equal(server.flat, EXCHANGES * (unit[0] + unit[1]))
    assert server.version == EXCHANGES * (1 + 2) and server.pushes == 2 * EXCHANGES
    assert max(r.stats.max_stale_exchanges for r in reps) == (2 if mode == "sync" else 0)


def test_a_repeated_exchange_changes_nothing():
    server, reps = _replicas("sync")
    delta = torch.ones_like(server.flat)
    server.exchange(delta, 1, "w0", (0, 1), None)
    server.exchange(delta, 1, "w1", (0, 1), None)
    before = (server.flat.clone(), server.version)
    assert server.exchange(delta, 1, "w0", (0, 1), None) is None  # a retried call
    assert torch.equal(server.flat, before[0]) and server.version == before[1] and server.repeats == 1


@pytest.mark.ray
def test_two_worker_sync_runs_repeat_bit_for_bit_within_the_staleness_bound(ray_cluster, tmp_path):
    sets = ["data.train_limit=400", "data.test_limit=100", "train.batch_size=64", "model.num_blocks=4",
            "cluster.num_workers=2", "train.epochs=2", "train.sync_every=2", "train.sync_mode=sync",
            "metrics.enabled=false", "eval.every_epochs=0"]
    summaries = [run_training(load_config(None, [*sets, f"run.dir={tmp_path / name}"]), log=lambda s: None)
                 for name in ("a", "b")]
    a, b = (CheckpointStore(str(tmp_path / name)).load_resume(4) for name in ("a", "b"))
    for t in range(1, 5):
        for k, v in a.block_states[t]["block"].items():
            assert torch.equal(v, b.block_states[t]["block"][k]), f"block {t} {k} differs between two runs"
    for k, v in a.shared_state["shared"].items():
        assert torch.equal(v, b.shared_state["shared"][k]), f"shared {k} differs between two runs"
    s = summaries[0]
    assert s["test_accuracy"] == summaries[1]["test_accuracy"]
    assert s["shared_state_version"] == sum(b["steps"] for b in s["blocks"])  # exactly once
    for w in s["workers"]:
        assert w["sync_every"] == 2  # as set, reported per worker
        assert w["max_stale_exchanges"] == 2
        # A refresh brings one exchange of the other worker: 2 mini-batches of its 2 blocks.
        assert 0 < w["max_embedding_version_lag"] <= 2 * 2
