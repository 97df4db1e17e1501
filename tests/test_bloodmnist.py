"""BloodMNIST from MedMNIST .npz files in the real format, written by the test itself."""
from __future__ import annotations

import numpy as np
import pytest

from noprop_dist.config import load_config
from noprop_dist.data import DatasetNotFoundError, builtin, load_dataset


def _write_npz(path, size: int = 28, n=(24, 6, 10), seed: int = 0) -> dict[str, np.ndarray]:
    """The layout MedMNIST ships: {train,val,test}_images uint8 (N, H, W, 3), {train,val,test}_labels (N, 1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (k, size, size, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(k) % 8).astype(np.uint8).reshape(k, 1)
    np.savez_compressed(path, **arrays)
    return arrays


@pytest.fixture
def no_default_dir(tmp_path, monkeypatch):
    """Point MedMNIST's default directory (~/.medmnist) at an empty directory: the test sees only its own files."""
    monkeypatch.setattr(builtin, "MEDMNIST_DEFAULT_DIR", str(tmp_path / "medmnist_home"))
    return tmp_path / "medmnist_home"


@pytest.mark.parametrize("name, file, size", [("bloodmnist", "bloodmnist.npz", 28),
                                              ("bloodmnist_64", "bloodmnist_64.npz", 64)])
def test_bloodmnist_loads_as_uint8_nchw(tmp_path, no_default_dir, name, file, size):
    arrays = _write_npz(tmp_path / file, size=size)
    ds = load_dataset(name, root=str(tmp_path))
    assert ds.name == name and ds.num_classes == 8 and ds.image_shape == (3, size, size)
    assert ds.train_x.dtype == np.uint8 and ds.train_x.flags["C_CONTIGUOUS"] and ds.train_y.dtype == np.int64
    np.testing.assert_array_equal(ds.train_x, arrays["train_images"].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(ds.test_x, arrays["test_images"].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(ds.train_y, arrays["train_labels"].ravel())
    assert len(ds.test_y) == 10  # the val split is not used
    scaled = arrays["train_images"] / 255.0  # per-channel statistics of the train split only
    np.testing.assert_allclose(ds.mean, scaled.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(ds.std, scaled.std(axis=(0, 1, 2)), rtol=1e-6)


def test_bloodmnist_found_in_medmnist_default_dir(tmp_path, no_default_dir):
    no_default_dir.mkdir()
    _write_npz(no_default_dir / "bloodmnist_128.npz", size=128, n=(4, 2, 3))
    ds = load_dataset("bloodmnist_128", root=str(tmp_path / "empty_root"), train_limit=3)
    assert ds.image_shape == (3, 128, 128) and len(ds.train_y) == 3


def test_bloodmnist_missing_names_the_file(tmp_path, no_default_dir):
    with pytest.raises(DatasetNotFoundError, match=r"bloodmnist_64\.npz.*medmnist_home"):
        load_dataset("bloodmnist_64", root=str(tmp_path))


def test_bloodmnist_bad_file_is_refused(tmp_path, no_default_dir):
    np.savez(tmp_path / "bloodmnist.npz", train_images=np.zeros((2, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="not a MedMNIST file"):
        load_dataset("bloodmnist", root=str(tmp_path))


def test_bloodmnist_configs_validate():
    for path in ("noprop_dist/configs/bloodmnist_dt.yaml", "noprop_dist/configs/bloodmnist_ct.yaml", "noprop_dist/configs/bloodmnist_128_dt.yaml",
                 "noprop_dist/configs/bloodmnist_128_ct.yaml"):
        cfg = load_config(path)
        assert cfg.data.name.startswith("bloodmnist")


def test_baseline_trains_on_bloodmnist(tmp_path, no_default_dir):
    from noprop_dist.baselines import run_baseline

    _write_npz(tmp_path / "bloodmnist.npz", n=(64, 4, 16))
    cfg = load_config(None, ["model.method=dtp", "data.name=bloodmnist", f"data.root={tmp_path}", "train.epochs=1",
                             "cluster.num_workers=1", f"run.dir={tmp_path}/run"])
    summary = run_baseline(cfg, log=lambda s: None)
    assert summary["dataset"] == "bloodmnist" and 0 <= summary["test_accuracy"] <= 1
