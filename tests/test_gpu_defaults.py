"""GPU defaults that follow the device: train.precision=auto picks bf16 only where the GPU computes it natively,
and train.sync_every=auto is 1 on a CPU and, on a GPU, derived from the measured block step time, one value
for the whole run (docs/parameter_server.md, "Choosing train.sync_every"). The GPU paths run here on the CPU:
the measurement is switched on by hand and the loop's device waits are counted instead of made."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import make_spec

from noprop_dist import run
from noprop_dist.config import ConfigError, TrainConfig, key_table, load_config
from noprop_dist.data import FASHION_MNIST_DEBIAN_DIR, load_dataset
from noprop_dist.training import ShardGroup, hardware, loop
from noprop_dist.training.hardware import (
    AUTO_EXCHANGE_INTERVAL_S,
    MAX_AUTO_SYNC_EVERY,
    auto_sync_every,
    native_bf16,
)
from noprop_dist.training.shared_state import LocalClient, SharedStateServer, Snapshot

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BATCHES = 20  # digits, 640 examples in batches of 32
HEAD = loop.AUTO_MEASURED_BATCHES


# --- the config ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given,expected", [("auto", "auto"), ("8", 8), ("1", 1), ("64.0", 64)])
def test_sync_every_takes_auto_or_a_positive_integer(given, expected):
    assert load_config(None).train.sync_every == "auto"  # the default
    assert load_config(None, [f"train.sync_every={given}"]).train.sync_every == expected
    assert load_config(None, values={"train.sync_every": expected}).train.sync_every == expected
    assert ("train.sync_every", "auto", "a positive integer or auto") in key_table()


@pytest.mark.parametrize("bad", ["0", "-1", "fast", "true", "2.5", "[1, 2]"])
def test_a_bad_sync_every_is_one_line_naming_the_key(bad, capsys):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"train.sync_every={bad}"])
    message = str(caught.value)
    assert message.startswith("train.sync_every: must be a positive integer or auto, got ") and "\n" not in message
    # The entry point: that line, exit 2.
    assert run.main(["--print-config", "--set", f"train.sync_every={bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.sync_every" in err[0], err


def test_the_packaged_configs_leave_sync_every_to_auto():
    from noprop_dist.config import config_names

    assert all(load_config(name).train.sync_every == "auto" for name in config_names())


# --- native bf16 ---------------------------------------------------------------------------------------------

def test_native_bf16_on_the_cpu_is_avx512_bf16_or_amx():
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    assert native_bf16(CPU) == bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def test_a_gpu_that_only_emulates_bf16_is_not_native(monkeypatch):
    """torch answers is_bf16_supported() True on a Volta or Turing GPU, where it only emulates bf16 (slower than
    fp32): auto must not pick bf16 there. Asked with including_emulation=False it says so."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert native_bf16(CUDA) is False
    assert hardware.resolve_precision("auto", CUDA) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert native_bf16(CUDA) is True and hardware.resolve_precision("auto", CUDA) == "bf16"


@pytest.mark.parametrize("capability,native", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_a_torch_without_including_emulation_decides_by_compute_capability(monkeypatch, capability, native):
    """Older torch: is_bf16_supported() takes no argument (and 2.3's answers True for emulated bf16 too)."""
    def old_signature() -> bool:
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", old_signature)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert native_bf16(CUDA) is native
    monkeypatch.setattr(torch.version, "hip", "6.0")  # ROCm GPUs compute bf16 natively
    assert native_bf16(CUDA) is True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert native_bf16(CUDA) is False


# --- the rule --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau,shards,expected", [
    (0.003, 1, 17),  # 17 x 3 ms = 51 ms >= 50 ms > 16 x 3 ms
    (0.005, 1, 10),  # exactly 50 ms: 10, not 11
    (0.003, 2, 9),  # 9 x 2 x 3 ms = 54 ms
    (0.0125, 4, 1),  # one mini-batch is already 50 ms
    (0.4, 5, 1),  # a CPU-speed step on a GPU worker: at least 1
    (0.0001, 1, MAX_AUTO_SYNC_EVERY),  # 500 would be needed: capped
    (0.0, 3, MAX_AUTO_SYNC_EVERY),  # nothing measurable stepped
    (1e9, 1, 1),  # the floor: however slow the step
])
def test_auto_sync_every_is_the_smallest_stretch_of_50_ms_capped(tau, shards, expected):
    assert auto_sync_every(tau, shards, "cuda") == expected
    assert auto_sync_every(tau, shards, "cpu") == 1  # the CPU rule: every mini-batch, whatever the timing


def test_auto_sync_every_is_minimal_on_a_grid():
    for tau in (0.0007, 0.001, 0.0023, 0.004, 0.009, 0.02, 0.051):
        for shards in (1, 2, 3, 5, 10):
            s = auto_sync_every(tau, shards, "cuda")
            assert 1 <= s <= MAX_AUTO_SYNC_EVERY
            if 1 < s < MAX_AUTO_SYNC_EVERY:
                assert s * shards * tau >= AUTO_EXCHANGE_INTERVAL_S * (1 - 1e-9) > (s - 1) * shards * tau
    # The G_max rule (benchmarks/README.md): an exchange every 50 ms, 1.4 ms of server CPU each -> ~35 GPUs.
    assert 30 < AUTO_EXCHANGE_INTERVAL_S / 1.4e-3 < 40


# --- the shard loop ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", train_limit=640)


def _group(data, spec, blocks, client, sync_every="auto", paced=None, **train):
    cfg = TrainConfig(seed=0, batch_size=32, sync_every=sync_every, **train)
    return ShardGroup(spec, blocks, cfg, data.train_x, data.train_y, data.mean, data.std, client, log=lambda s: None,
                      paced=paced)


class _NoSettling(LocalClient):
    def settle_sync_every(self, proposal):
        raise AssertionError("a CPU worker asked the server for sync_every")


def test_auto_is_exactly_sync_every_1_on_the_cpu(data, monkeypatch):
    """On a CPU auto must change nothing: no measurement, no call, the same weights bit for bit as 1."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("the CPU loop synchronised a device"))
    spec = make_spec("learned", num_shards=2)
    runs = []
    for every in ("auto", 1):
        server = SharedStateServer(spec, 0)
        group = _group(data, spec, [1, 2], _NoSettling(server), every)
        for epoch in range(2):
            group.train_epoch(epoch)
        runs.append((group, server))
    (auto, auto_server), (one, one_server) = runs
    assert auto.sync_every == 1 and not auto.auto_sync
    assert auto.replica.stats.exchanges == one.replica.stats.exchanges == 2 * BATCHES
    assert torch.equal(auto_server.flat, one_server.flat) and auto_server.version == one_server.version
    for t in (1, 2):
        for k, v in one.trainers[t].block.state_dict().items():
            assert torch.equal(auto.trainers[t].block.state_dict()[k], v), (t, k)
    assert "sync_every" not in auto_server.state_dict()  # the CPU checkpoint is as it was


class _Syncs:
    """Counts the loop's device waits (loop._synchronize, its only ones) in place of a GPU's."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, device=None) -> None:
        self.count += 1


def _on_gpu(group: ShardGroup) -> ShardGroup:
    """The group as on a GPU with sync_every=auto: measuring and agreeing through the server."""
    group.auto_sync = True
    return group


def test_a_gpu_worker_measures_its_first_batches_once_then_exchanges_every_s(data, monkeypatch):
    syncs = _Syncs()
    monkeypatch.setattr(loop, "_synchronize", syncs)
    seen = []

    def rule(tau, shards, device_type):
        seen.append((tau, shards))
        return 4

    monkeypatch.setattr(loop, "auto_sync_every", rule)
    spec = make_spec("learned", num_shards=2)
    server = SharedStateServer(spec, 0)
    group = _on_gpu(_group(data, spec, [1, 2], LocalClient(server)))
    assert group.sync_every == 1  # not measured yet
    group.train_epoch(0)
    # Two waits per timed batch, none elsewhere; the measured step time per block of the 2 blocks.
    assert syncs.count == 2 * loop.AUTO_TIMED_BATCHES
    assert len(seen) == 1 and seen[0][1] == 2 and 0 < seen[0][0] < 5
    assert group.sync_every == 4 and server.sync_every == (4, 0) == group.sync_choice
    # Epoch 0: every one of the first HEAD batches, then every 4 (batches 10, 14, 18) and the last (20).
    assert server.received["w0"] == (0, HEAD + 4)
    group.train_epoch(1)
    assert syncs.count == 2 * loop.AUTO_TIMED_BATCHES, "the loop synchronised the device after the measurement"
    assert server.received["w0"] == (1, BATCHES // 4) and group.replica.stats.exchanges == HEAD + 4 + BATCHES // 4
    assert server.version == 2 * 2 * BATCHES  # every block step counted once


def test_a_restarted_or_resumed_worker_keeps_the_runs_value_and_cadence(data, monkeypatch):
    """A worker restarted by the supervisor, or a resumed run, must exchange after the same mini-batches as the
    run did: its pushes of rounds the server holds are repeats only if round k covers the same batches. It takes
    the run's value from the server (from its checkpoint after a resume), measuring nothing."""
    syncs = _Syncs()
    monkeypatch.setattr(loop, "_synchronize", syncs)
    proposals = iter([4, 2])  # the first worker's measurement, then what a re-measurement would give
    monkeypatch.setattr(loop, "auto_sync_every", lambda tau, shards, device_type: next(proposals))
    spec = make_spec("learned", num_shards=2)
    server = SharedStateServer(spec, 0)
    first = _on_gpu(_group(data, spec, [1, 2], LocalClient(server)))
    first.train_epoch(0)
    after_epoch_0 = first.state_dicts()
    first.train_epoch(1)
    version, received, waits = server.version, dict(server.received), syncs.count

    for redo, states in ((0, None), (1, after_epoch_0)):  # the measuring epoch, and a later one
        again = _on_gpu(_group(data, spec, [1, 2], LocalClient(server)))
        if states:
            again.load_state_dicts(states)
        repeats = server.repeats
        again.train_epoch(redo)
        assert again.sync_every == 4 and syncs.count == waits, "the restarted worker measured again"
        # Every push a repeat (its rounds are the ones the server holds): nothing counted twice.
        assert server.version == version and server.received == received
        assert server.repeats - repeats == again.replica.stats.exchanges

    # A resumed run: a new server from the checkpoint, new workers; the value comes with the checkpoint.
    resumed_server = SharedStateServer(spec, 0)
    resumed_server.load_state_dict(server.state_dict())
    assert resumed_server.sync_every == (4, 0)
    resumed = _on_gpu(_group(data, spec, [1, 2], LocalClient(resumed_server)))
    resumed.train_epoch(2)
    assert resumed.sync_every == 4 and syncs.count == waits
    assert resumed_server.received["w0"] == (2, BATCHES // 4)


class _ThreadClient(LocalClient):
    """Two workers in two threads against one in-process server: the Ray transport's waiting, with a lock."""

    TIMEOUT_S = 60.0

    def __init__(self, server: SharedStateServer, source: str, lock: threading.Lock) -> None:
        super().__init__(server, source)
        self.lock = lock

    def fetch(self) -> Snapshot:
        with self.lock:
            return super().fetch()

    def exchange(self, delta, steps, round_, want) -> None:
        with self.lock:
            super().exchange(delta.clone(), steps, round_, want)

    def take(self, wait: bool) -> Snapshot | None:
        deadline = time.monotonic() + self.TIMEOUT_S
        while True:
            with self.lock:
                snap = super().take(wait=False)
            if snap is not None or not wait or self.want is None:
                return snap
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.source}: round {self.want} never completed; the server has "
                                   f"{self.server.received}")
            time.sleep(0.001)

    def settle_sync_every(self, proposal):
        with self.lock:
            return super().settle_sync_every(proposal)


def _train_two_sync_workers(groups: dict[str, ShardGroup], epochs: int = 2) -> None:
    """Two workers' groups (by source name) against one sync server, each in its own thread, the epochs aligned
    as the driver aligns them; raises the first error (a round never completed: TimeoutError)."""
    barrier = threading.Barrier(len(groups))
    errors: list[BaseException] = []

    def work(group: ShardGroup) -> None:
        try:
            for epoch in range(epochs):
                group.train_epoch(epoch)
                barrier.wait(timeout=120)  # the driver starts an epoch once every worker ended the last
        except BaseException as e:  # noqa: BLE001 - raised below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(g,), name=name) for name, g in groups.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]


def _assert_one_cadence(server: SharedStateServer, groups: dict[str, ShardGroup], allowed: set[int]) -> None:
    """Every worker took the run's one value; the same rounds from each, applied once (2 epochs of 4 shards)."""
    chosen = {g.sync_every for g in groups.values()}
    assert len(chosen) == 1 and chosen <= allowed, chosen
    every = chosen.pop()
    assert server.sync_every == (every, 0)
    # epoch 1 has ceil(20 / every) exchanges
    assert server.received == {name: (1, math.ceil(BATCHES / every)) for name in groups}
    assert server.version == 2 * 4 * BATCHES and not server.held


def test_sync_workers_that_measure_differently_agree_on_one_value(data, monkeypatch):
    """Each worker measures its own step time, but in sync mode round k is every worker's k-th exchange: with
    its own value each, the worker exchanging more often waits at the epoch's end for rounds the other never
    pushes. The server keeps the first proposal and every worker takes it."""
    proposal = {"w0": 3, "w1": 5}
    monkeypatch.setattr(loop, "auto_sync_every",
                        lambda tau, shards, device_type: proposal[threading.current_thread().name])
    spec = make_spec("learned", num_shards=4)
    server = SharedStateServer(spec, 0, sources=["w0", "w1"], mode="sync")
    lock = threading.Lock()
    groups = {f"w{w}": _on_gpu(_group(data, spec, blocks, _ThreadClient(server, f"w{w}", lock), sync_mode="sync"))
              for w, blocks in enumerate(([1, 2], [3, 4]))}
    _train_two_sync_workers(groups)
    _assert_one_cadence(server, groups, {3, 5})


@pytest.mark.parametrize("sets,wants", [([], False), (["cluster.gpus_per_worker=0.5"], True),
                                        (["cluster.gpus_per_worker=1", "cluster.device=cpu"], False),
                                        (["cluster.gpus_per_worker=1", "cluster.device=cuda"], True)])
def test_a_run_is_paced_through_the_server_when_its_workers_ask_for_gpus(sets, wants):
    """WorkerSpec.paced (every worker of the run, whatever device it lands on) is ClusterConfig.wants_gpus."""
    assert load_config(None, sets).cluster.wants_gpus is wants


def test_a_cpu_worker_in_a_run_with_gpus_takes_the_runs_cadence(data, monkeypatch):
    """A run whose workers ask for GPUs paces every worker through the server (the supervisor's WorkerSpec.paced),
    one that landed on a CPU too: alone it would exchange every mini-batch, and in sync mode the GPU worker,
    exchanging every 4, would wait at the epoch's end for rounds it never pushes. The GPU worker's rule is
    faked (4); the CPU worker's is the real one (1 on a CPU): whichever proposes first, both take it."""
    real = loop.auto_sync_every
    monkeypatch.setattr(loop, "auto_sync_every", lambda tau, shards, device_type:
                        4 if threading.current_thread().name == "w0" else real(tau, shards, device_type))
    spec = make_spec("learned", num_shards=4)
    server = SharedStateServer(spec, 0, sources=["w0", "w1"], mode="sync")
    lock = threading.Lock()
    gpu = _on_gpu(_group(data, spec, [1, 2], _ThreadClient(server, "w0", lock), sync_mode="sync"))
    cpu = _group(data, spec, [3, 4], _ThreadClient(server, "w1", lock), sync_mode="sync", paced=True)
    assert cpu.device.type == "cpu" and cpu.auto_sync
    groups = {"w0": gpu, "w1": cpu}
    _train_two_sync_workers(groups)
    _assert_one_cadence(server, groups, {1, 4})


@pytest.mark.ray
def test_the_choice_travels_through_ray_and_stays_with_the_server(ray_cluster):
    """The transport a Ray worker uses: RayClient -> ParameterServer actor, as SharedReplica calls it."""
    from noprop_dist.distributed.param_server import ParameterServer
    from noprop_dist.distributed.worker import RayClient
    from noprop_dist.training.shared_state import SharedReplica

    spec = make_spec("learned", num_shards=2)
    server = ParameterServer.remote(spec, 0, None, None, ["w0", "w1"], "sync")
    replicas = [SharedReplica(spec, TrainConfig(), RayClient(server, "sync", rank=w), CPU, log=lambda s: None)
                for w in (0, 1)]
    for r in replicas:
        r.begin_epoch()  # learns the server's incarnation, as every epoch does first
    assert replicas[0].settle_sync_every(None) is None
    assert replicas[1].settle_sync_every((4, 0)) == (4, 0)
    assert replicas[0].settle_sync_every((7, 0)) == (4, 0)  # the first proposal stays
    assert ray_cluster.get(server.state_dict.remote())["sync_every"] == [4, 0]
    ray_cluster.kill(server)


# --- the GPU check ---------------------------------------------------------------------------------------------

def test_the_gpu_checks_dry_run_runs_every_part_without_an_error(tmp_path):
    """benchmarks/gpu_check.py on the CPU (--device cpu --quick), all parts in one process: a session lent a GPU
    gets one run of it, so an error a CPU can show must show here first (its vmap part once raised on the
    CPU). Every part must end ok with no case in error; the Fashion-MNIST part reads Debian's files where
    scripts/setup.sh installed them, and is skipped with its one line where they are not. Slow for a test
    (about 15 s alone): the parts train and time small shard loops, and spawn processes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fashion = os.path.isdir(FASHION_MNIST_DEBIAN_DIR)
    p = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_check.py"), "--device", "cpu",
                        "--quick", "--out", str(tmp_path), "--fashion-root",
                        FASHION_MNIST_DEBIAN_DIR if fashion else str(tmp_path / "no_fashion")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["environment", "portability", "sync_audit", "graphs", "shard_loop", "fashion_mnist",
                           "processes", "vmap"]
    for name, part in parts.items():
        expected = "skipped: Fashion-MNIST not found" if name == "fashion_mnist" and not fashion else "ok"
        assert part["status"].startswith(expected), (name, part["status"])
        errors = [line for line in part["lines"] if ": error" in line or line.startswith("error")]
        assert not errors, (name, errors)
