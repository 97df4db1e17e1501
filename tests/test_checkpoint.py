"""Checkpoints: atomic writes, checksums in the manifest, fallback to the previous epoch, resume data."""
import json
import os

import pytest
import torch

from noprop_dist.storage.atomic import atomic_torch_save, sha256_file
from noprop_dist.storage.checkpoints import CheckpointError, CheckpointStore
from noprop_dist.storage.run_dir import RunDir


def _states(value: float, blocks=(1, 2)):
    return ({t: {"block": {"w": torch.full((3,), value + t)}} for t in blocks},
            {"shared": {"embed": torch.full((2,), value)}, "version": int(value)})


def _save(store: CheckpointStore, epoch: int):
    blocks, shared = _states(float(epoch))
    store.save_epoch(epoch, blocks, shared, train_seconds=10.0 * epoch)


@pytest.fixture
def store(tmp_path):
    checkpoints = CheckpointStore(str(tmp_path))
    os.makedirs(checkpoints.dir)
    return checkpoints


def test_round_trip_and_manifest_checksums(store):
    _save(store, 1)
    _save(store, 2)
    m = store.read_manifest()
    assert m["epochs_done"] == 2 and m["previous"]["epochs_done"] == 1
    for entry in m["files"].values():
        assert sha256_file(os.path.join(store.dir, entry["file"])) == entry["sha256"]
    r = store.load_resume(2)
    assert r.epochs_done == 2 and r.train_seconds == 20.0
    assert torch.equal(r.block_states[2]["block"]["w"], torch.full((3,), 4.0))
    assert r.shared_state["version"] == 2


def test_replica_states_round_trip_and_older_runs_have_none(store):
    _save(store, 1)
    assert store.load_resume(2).replica_states == {}  # a run saved without replicas
    blocks, shared = _states(2.0)
    replicas = {"1-2": {"optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": []}}}
    store.save_epoch(2, blocks, shared, 20.0, replicas)
    got = store.load_resume(2).replica_states
    assert list(got) == ["1-2"] and torch.equal(got["1-2"]["optimizer"]["state"][0]["exp_avg"], torch.ones(2))


def test_only_the_last_two_epochs_are_kept(store):
    for e in (1, 2, 3):
        _save(store, e)
    names = sorted(os.listdir(store.dir))
    assert all(".e0002." in n or ".e0003." in n for n in names), names
    assert len(names) == 6


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_checkpoint_is_reported_and_previous_epoch_used(store, damage):
    _save(store, 1)
    _save(store, 2)
    path = os.path.join(store.dir, store.read_manifest()["files"]["block_2"]["file"])
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "flip":
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))
    else:
        os.remove(path)
    warnings: list[str] = []
    r = store.load_resume(2, warn=warnings.append)
    assert r.epochs_done == 1 and r.shared_state["version"] == 1
    assert torch.equal(r.block_states[2]["block"]["w"], torch.full((3,), 3.0))
    assert len(warnings) == 1 and path in warnings[0] and "epoch 1" in warnings[0]


def test_both_epochs_corrupt_is_an_error_naming_the_files(store):
    _save(store, 1)
    _save(store, 2)
    m = store.read_manifest()
    for entry in (m["files"]["shared"], m["previous"]["files"]["shared"]):
        with open(os.path.join(store.dir, entry["file"]), "ab") as f:
            f.write(b"garbage")
    with pytest.raises(CheckpointError) as e:
        store.load_resume(2, warn=lambda s: None)
    assert "shared.e0002.pt" in str(e.value) and "shared.e0001.pt" in str(e.value)


def test_first_epoch_corrupt_has_no_fallback(store):
    _save(store, 1)
    path = os.path.join(store.dir, store.read_manifest()["files"]["block_1"]["file"])
    open(path, "wb").write(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupted"):
        store.load_resume(2)


def test_unreadable_manifest_names_its_path(store):
    _save(store, 1)
    with open(store.manifest_path, "w") as f:
        f.write('{"epochs_done": 1, "fil')
    with pytest.raises(CheckpointError, match="manifest.json"):
        store.load_resume(2)


def test_interrupted_write_leaves_previous_file_intact(tmp_path):
    """A crash between writing the temporary file and the rename leaves the old file as it was."""
    path = str(tmp_path / "x.pt")
    atomic_torch_save({"v": torch.ones(2)}, path)
    before = open(path, "rb").read()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        atomic_torch_save({"v": Boom()}, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["x.pt"], "the half-written temporary file was left behind"
    assert torch.load(path, weights_only=True)["v"].sum() == 2


def test_checkpoints_load_weights_only(store):
    """A checkpoint that would run code when unpickled is refused by torch.load(weights_only=True)."""
    _save(store, 1)
    m = store.read_manifest()
    entry = m["files"]["shared"]
    path = os.path.join(store.dir, entry["file"])
    torch.save({"evil": os.system}, path)  # a pickled callable, not tensors
    entry["sha256"] = sha256_file(path)
    with open(store.manifest_path, "w") as f:
        json.dump(m, f)
    with pytest.raises(CheckpointError, match="weights_only=True") as e:
        store.load_resume(2)
    assert path in str(e.value)


def test_other_config_refused_unless_overwrite(tmp_path):
    from noprop_dist.config import ConfigError, load_config

    rd = RunDir(str(tmp_path))
    rd.prepare(load_config(None, [f"run.dir={tmp_path}"]))
    _save(rd.checkpoints, 1)
    (tmp_path / "notes.txt").write_text("mine")
    other = load_config(None, [f"run.dir={tmp_path}", "model.embedding=one_hot"])
    with pytest.raises(ConfigError, match="model.embedding='learned'.*run.overwrite=true"):
        rd.prepare(other)
    assert rd.checkpoints.read_manifest()["epochs_done"] == 1, "a refused run must leave the directory as it was"
    rd.prepare(load_config(None, [f"run.dir={tmp_path}", "model.embedding=one_hot", "run.overwrite=true"]))
    assert rd.checkpoints.read_manifest() is None and os.listdir(rd.checkpoints.dir) == []
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # The same config (more epochs, say) is a resume, never a conflict.
    rd.prepare(load_config(None, [f"run.dir={tmp_path}", "model.embedding=one_hot", "train.epochs=50"]))
