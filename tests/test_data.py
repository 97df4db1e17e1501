"""Tests for noprop_dist.data: real digits, hand-written IDX / CIFAR pickle files, normalize()."""
from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import types

import numpy as np
import pytest
import torch

from noprop_dist import data
from noprop_dist.data import (
    DATASET_NAMES,
    DatasetNotFoundError,
    ImageDataset,
    builtin,  # the loaders' module: tests point its directory constants elsewhere
    load_dataset,
    normalize,
)

# ---------------------------------------------------------------- helpers writing real formats

def _write_idx(path, arr: np.ndarray, magic: int | None = None, gz: bool = False) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 | arr.ndim
    payload = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)


def _make_mnist_arrays(n_train=12, n_test=5, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_train).astype(np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_test).astype(np.uint8))


def _write_mnist_dir(d, arrays, gz: bool = False) -> None:
    os.makedirs(d, exist_ok=True)
    trx, try_, tex, tey = arrays
    _write_idx(os.path.join(d, "train-images-idx3-ubyte"), trx, gz=gz)
    _write_idx(os.path.join(d, "train-labels-idx1-ubyte"), try_, gz=gz)
    _write_idx(os.path.join(d, "t10k-images-idx3-ubyte"), tex, gz=gz)
    _write_idx(os.path.join(d, "t10k-labels-idx1-ubyte"), tey, gz=gz)


def _check_mnist_roundtrip(ds: ImageDataset, arrays) -> None:
    trx, try_, tex, tey = arrays
    assert ds.train_x.shape == (len(trx), 1, 28, 28) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (len(tex), 1, 28, 28)
    assert ds.train_y.dtype == np.int64 and ds.test_y.dtype == np.int64
    np.testing.assert_array_equal(ds.train_x[:, 0], trx)
    np.testing.assert_array_equal(ds.train_y, try_.astype(np.int64))
    np.testing.assert_array_equal(ds.test_x[:, 0], tex)
    np.testing.assert_array_equal(ds.test_y, tey.astype(np.int64))
    assert ds.num_classes == 10 and ds.image_shape == (1, 28, 28)
    assert ds.train_x.flags["C_CONTIGUOUS"] and ds.test_x.flags["C_CONTIGUOUS"]


def _cifar_batch(n, rng, label_key):
    x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    y = rng.integers(0, 10, n).tolist()  # the real files store labels as a python list
    return {b"batch_label": b"test", label_key: y, b"data": x, b"filenames": [b"f"] * n}


def _dump(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def no_debian_fashion(monkeypatch, tmp_path):
    """Point the Debian fallback at an empty dir, so results don't depend on the apt package."""
    empty = tmp_path / "no-debian"
    empty.mkdir()
    monkeypatch.setattr(builtin, "FASHION_MNIST_DEBIAN_DIR", str(empty))
    return str(empty)


# ---------------------------------------------------------------- digits (real, bundled data)

def test_digits_shapes_and_split():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert DATASET_NAMES == ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100",
                             "bloodmnist", "bloodmnist_64", "bloodmnist_128")
    assert ds.name == "digits" and ds.num_classes == 10 and ds.image_shape == (1, 8, 8)
    assert ds.train_x.dtype == np.uint8 and ds.test_x.dtype == np.uint8
    assert ds.train_y.dtype == np.int64 and ds.test_y.dtype == np.int64
    assert ds.train_x.flags["C_CONTIGUOUS"] and ds.test_x.flags["C_CONTIGUOUS"]
    assert len(ds.train_x) + len(ds.test_x) == 1797
    assert len(ds.train_x) == len(ds.train_y) and len(ds.test_x) == len(ds.test_y)
    counts = np.bincount(load_digits().target, minlength=10)
    np.testing.assert_array_equal(np.bincount(ds.test_y, minlength=10),
                                  [round(0.2 * c) for c in counts])
    assert set(ds.train_y.tolist()) == set(range(10))
    assert ds.train_x.max() == 255 and ds.train_x.min() == 0


def test_digits_pixels_match_sklearn():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    images = load_digits().images
    expected = np.rint(images * 255.0 / 16.0).astype(np.uint8)
    # Every returned image is one of sklearn's, scaled: check a few against their source.
    all_bytes = {img.tobytes(): i for i, img in enumerate(expected)}
    for img in ds.test_x[:20, 0]:
        assert img.tobytes() in all_bytes


def test_digits_are_read_without_importing_sklearn_and_equal_its_loader(tmp_path, monkeypatch):
    """The digits come from scikit-learn's CSV file, read without its import (most of a second in every
    process that loads them): the arrays are load_digits()'s, and where the file is not found its loader runs."""
    from sklearn.datasets import load_digits

    code = ("import sys; from noprop_dist.data import load_dataset; load_dataset('digits'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr[-2000:]
    bunch = load_digits()
    pixels, target = builtin._digits_arrays()
    np.testing.assert_array_equal(pixels, bunch.data)
    np.testing.assert_array_equal(target, bunch.target)
    # No file in its place (a scikit-learn that moved it): its loader gives the same arrays.
    moved = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: moved)
    pixels, target = builtin._digits_arrays()
    np.testing.assert_array_equal(pixels, bunch.data)
    np.testing.assert_array_equal(target, bunch.target)


def test_digits_deterministic():
    a, b = load_dataset("digits"), load_dataset("digits", root="/nonexistent/ignored")
    for f in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert a.mean == b.mean and a.std == b.std


def test_digits_mean_std_plausible():
    ds = load_dataset("digits")
    assert len(ds.mean) == 1 and len(ds.std) == 1
    x = ds.train_x.astype(np.float64) / 255
    assert ds.mean[0] == pytest.approx(x.mean(), rel=1e-9)
    assert ds.std[0] == pytest.approx(x.std(), rel=1e-9)
    assert 0.2 < ds.mean[0] < 0.4 and 0.3 < ds.std[0] < 0.45


def test_limits_keep_all_classes_and_are_deterministic():
    ds = load_dataset("digits", train_limit=100, test_limit=50)
    assert len(ds.train_x) == 100 and len(ds.test_x) == 50
    assert set(ds.train_y.tolist()) == set(range(10))
    assert ds.train_x.flags["C_CONTIGUOUS"]
    again = load_dataset("digits", train_limit=100, test_limit=50)
    np.testing.assert_array_equal(ds.train_y, again.train_y)
    full = load_dataset("digits")
    # mean is over the limited set, not the full one
    assert ds.mean[0] == pytest.approx(ds.train_x.mean() / 255, rel=1e-9)
    assert ds.mean != full.mean
    # a limit above the size keeps everything
    assert len(load_dataset("digits", train_limit=10**6).train_x) == len(full.train_x)


@pytest.mark.parametrize("kw", [{"train_limit": 0}, {"test_limit": -3}])
def test_bad_limit(kw):
    with pytest.raises(ValueError, match="limit"):
        load_dataset("digits", **kw)


def test_unknown_name():
    with pytest.raises(ValueError) as e:
        load_dataset("imagenet")
    assert "imagenet" in str(e.value) and "digits" in str(e.value) and "cifar100" in str(e.value)


# ---------------------------------------------------------------- MNIST / Fashion-MNIST (IDX)

def test_mnist_plain_idx_roundtrip(tmp_path):
    arrays = _make_mnist_arrays()
    _write_mnist_dir(tmp_path, arrays, gz=False)
    _check_mnist_roundtrip(load_dataset("mnist", root=str(tmp_path)), arrays)


def test_mnist_gz_idx_roundtrip_with_limit(tmp_path):
    arrays = _make_mnist_arrays(n_train=20, n_test=6, seed=2)
    _write_mnist_dir(tmp_path, arrays, gz=True)
    ds = load_dataset("mnist", root=str(tmp_path))
    _check_mnist_roundtrip(ds, arrays)
    lim = load_dataset("mnist", root=str(tmp_path), train_limit=7)
    idx = np.random.default_rng(0).permutation(20)[:7]
    np.testing.assert_array_equal(lim.train_x[:, 0], arrays[0][idx])
    np.testing.assert_array_equal(lim.train_y, arrays[1][idx])


def test_fashion_torchvision_layout(tmp_path, no_debian_fashion):
    arrays = _make_mnist_arrays(seed=3)
    _write_mnist_dir(tmp_path / "FashionMNIST" / "raw", arrays, gz=False)
    ds = load_dataset("fashion_mnist", root=str(tmp_path))
    assert ds.name == "fashion_mnist"
    _check_mnist_roundtrip(ds, arrays)


def test_fashion_debian_fallback_used_when_root_empty(tmp_path, monkeypatch):
    arrays = _make_mnist_arrays(seed=4)
    fake = tmp_path / "debian"
    _write_mnist_dir(fake, arrays, gz=True)
    monkeypatch.setattr(builtin, "FASHION_MNIST_DEBIAN_DIR", str(fake))
    empty = tmp_path / "empty"
    empty.mkdir()
    _check_mnist_roundtrip(load_dataset("fashion_mnist", root=str(empty)), arrays)


def test_mnist_missing_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("mnist", root=str(tmp_path))
    msg = str(e.value)
    for f in data.IDX_FILES:
        assert f in msg
    assert str(tmp_path) in msg and os.path.join(str(tmp_path), "MNIST", "raw") in msg
    assert "data.download: true" in msg


def test_fashion_missing_files(tmp_path, no_debian_fashion):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion_mnist", root=str(tmp_path))
    msg = str(e.value)
    for f in data.IDX_FILES:
        assert f in msg
    assert str(tmp_path) in msg and no_debian_fashion in msg
    assert "dataset-fashion-mnist" in msg and "data.download: true" in msg


def test_bad_magic_names_file(tmp_path):
    arrays = _make_mnist_arrays()
    _write_mnist_dir(tmp_path, arrays)
    bad = tmp_path / "train-labels-idx1-ubyte"
    _write_idx(bad, arrays[1], magic=0x00000803)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*magic"):
        load_dataset("mnist", root=str(tmp_path))


def test_size_mismatch_names_file(tmp_path):
    arrays = _make_mnist_arrays()
    _write_mnist_dir(tmp_path, arrays)
    path = tmp_path / "t10k-images-idx3-ubyte"
    with open(path, "ab") as f:
        f.write(b"\x00" * 3)  # trailing bytes the header does not account for
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*size mismatch"):
        load_dataset("mnist", root=str(tmp_path))


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "not a readable gzip-compressed IDX file (EOFError"),
    ("garbage", "not a readable gzip-compressed IDX file (BadGzipFile"),
])
def test_a_corrupt_or_truncated_gz_idx_is_one_line_naming_it(tmp_path, damage, needle):
    """Bug seen: a .gz cut short or overwritten ended in a traceback from gzip."""
    arrays = _make_mnist_arrays()
    _write_mnist_dir(tmp_path, arrays, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"not gzip at all, " + raw[:40])
    with pytest.raises(data.DatasetFileError) as e:
        load_dataset("mnist", root=str(tmp_path))
    assert str(e.value).startswith(f"{path}: {needle}") and "\n" not in str(e.value), str(e.value)


def test_a_gzip_bomb_is_refused_at_its_header_without_inflating_it(tmp_path):
    """A 4 KB .gz whose header claims 60,000 images of 60,000 x 60,000 pixels: refused after the header, with
    memory untouched (reading it whole, as before, would inflate whatever follows)."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", 0x803) + struct.pack(">3I", 60_000, 60_000, 60_000) + b"\x00" * (1 << 20))
    tracemalloc.start()
    with pytest.raises(data.DatasetFileError, match="IDX header says .* more than the .* bytes an IDX file is read to"):
        data.read_idx(str(path), 3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated reading a header"


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist(tmp_path):
    ds = load_dataset("fashion_mnist", root=str(tmp_path))  # empty root -> Debian fallback
    assert len(ds.train_x) == 60000 and len(ds.test_x) == 10000
    assert ds.image_shape == (1, 28, 28) and ds.num_classes == 10
    assert set(np.unique(ds.train_y).tolist()) == set(range(10))
    assert set(np.unique(ds.test_y).tolist()) == set(range(10))
    assert ds.mean[0] == pytest.approx(0.286, abs=2e-3) and ds.std[0] == pytest.approx(0.353, abs=2e-3)


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100 (pickles)

def test_cifar10_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    batches = [_cifar_batch(3, rng, b"labels") for _ in range(5)]
    for i, b in enumerate(batches, 1):
        _dump(d / f"data_batch_{i}", b)
    test = _cifar_batch(4, rng, b"labels")
    # A known pixel: channel G (plane 1), row 2, col 5 of test image 1.
    test[b"data"][1, 1 * 1024 + 2 * 32 + 5] = 7
    test[b"data"][1, 0 * 1024 + 2 * 32 + 5] = 200
    _dump(d / "test_batch", test)

    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.num_classes == 10 and ds.image_shape == (3, 32, 32) and len(ds.mean) == 3
    assert ds.train_x.flags["C_CONTIGUOUS"] and ds.train_x.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_x.reshape(15, 3072),
                                  np.concatenate([b[b"data"] for b in batches]))
    np.testing.assert_array_equal(ds.train_y, np.concatenate([b[b"labels"] for b in batches]))
    np.testing.assert_array_equal(ds.test_y, test[b"labels"])
    assert ds.test_x[1, 1, 2, 5] == 7 and ds.test_x[1, 0, 2, 5] == 200
    # per-channel mean of the training set
    x = ds.train_x.astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 2, 3)), rtol=1e-9)


def test_cifar100_roundtrip(tmp_path):
    rng = np.random.default_rng(6)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    train = _cifar_batch(6, rng, b"fine_labels")
    train[b"coarse_labels"] = [0] * 6
    train[b"fine_labels"] = [0, 99, 42, 7, 13, 64]
    train[b"data"][3, 2 * 1024 + 31 * 32 + 0] = 123  # B plane, last row, first col
    test = _cifar_batch(2, rng, b"fine_labels")
    _dump(d / "train", train)
    _dump(d / "test", test)
    ds = load_dataset("cifar100", root=str(tmp_path))
    assert ds.num_classes == 100
    assert ds.train_y.tolist() == [0, 99, 42, 7, 13, 64]
    assert ds.train_x[3, 2, 31, 0] == 123
    np.testing.assert_array_equal(ds.test_x.reshape(2, 3, 1024), test[b"data"].reshape(2, 3, 1024))


@pytest.mark.parametrize("name,expected", [
    ("cifar10", ["data_batch_1", "data_batch_5", "test_batch", "cifar-10-batches-py"]),
    ("cifar100", ["train", "test", "cifar-100-python"]),
])
def test_cifar_missing_files(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(name, root=str(tmp_path))
    msg = str(e.value)
    for s in expected:
        assert s in msg
    assert str(tmp_path) in msg and "data.download: true" in msg


# ---------------------------------------------------------------- normalize

def test_normalize_per_channel():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # (1, 2, 1, 2)
    out = normalize(x, (0.5, 0.2), (0.25, 0.1))
    assert out.dtype == torch.float32 and out.shape == x.shape
    expected = torch.tensor([[[[-2.0, 2.0]], [[0.0, 2.0]]]])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_normalize_with_dataset_stats_gives_zero_mean_unit_std():
    ds = load_dataset("digits")
    out = normalize(torch.from_numpy(ds.train_x), ds.mean, ds.std)
    assert out.dtype == torch.float32
    assert abs(out.mean().item()) < 1e-4 and abs(out.std(unbiased=False).item() - 1) < 1e-4


# ---------------------------------------------------------------- CIFAR: the restricted unpickler

class _Python2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2's cPickle did (SHORT_BINSTRING / BINSTRING), as in the real CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _python2_batch(obj) -> bytes:
    """``obj`` pickled in the layout of the real CIFAR python files: protocol 2, Python 2 byte strings, and
    numpy 1's module name ``numpy.core.multiarray`` for the array reconstruction."""
    buf = io.BytesIO()
    _Python2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


@pytest.mark.parametrize("layout", ["python2", "protocol2", "protocol4", "protocol5"])
def test_cifar_batches_in_every_real_layout_load(tmp_path, layout):
    """The restricted unpickler admits what a CIFAR batch needs: the real files' layout (Python 2, numpy.core
    names) and what Python 3 writes with numpy 2 (numpy._core names, _codecs.encode at protocol 2,
    _frombuffer at protocol 5)."""
    rng = np.random.default_rng(7)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {name: _cifar_batch(3, rng, b"labels") for name in names}
    for name, b in batches.items():
        raw = _python2_batch(b) if layout == "python2" else pickle.dumps(b, protocol=int(layout[-1]))
        (d / name).write_bytes(raw)
    if layout == "python2":
        assert b"numpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    ds = load_dataset("cifar10", root=str(tmp_path))
    np.testing.assert_array_equal(ds.test_x.reshape(3, 3072), batches["test_batch"][b"data"])
    np.testing.assert_array_equal(ds.train_y, np.concatenate([batches[f"data_batch_{i}"][b"labels"]
                                                              for i in range(1, 6)]))


class _Planted:
    """A pickle payload that would run a shell command (a harmless one: it creates a marker file)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_cifar_pickle_is_refused_and_runs_nothing(tmp_path):
    """Guards: the CIFAR loader used pickle.load, so a file planted in data.root ran code when loaded. Now the
    global it names is refused, with one line naming the file and the global, and the entry point exits 2."""
    from noprop_dist import run

    rng = np.random.default_rng(8)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _dump(d / name, _cifar_batch(2, rng, b"labels"))
    marker = tmp_path / "pwned"
    planted = _cifar_batch(2, rng, b"labels") | {b"batch_label": _Planted(marker)}
    _dump(d / "data_batch_3", planted)
    with pytest.raises(data.DatasetFileError) as e:
        load_dataset("cifar10", root=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and str(d / "data_batch_3") in msg and f"{os.system.__module__}.system" in msg, msg
    assert not marker.exists(), "unpickling the planted file ran its command"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run.main(["--set", "data.name=cifar10", f"data.root={tmp_path}", f"run.dir={tmp_path / 'run'}"])
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and "data_batch_3" in lines[0] and "system" in lines[0], err.getvalue()
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", pickle.dumps([1, 2, 3]), pickle.dumps({b"data": 1}),
                                     pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [1, 2]})])
def test_a_cifar_file_that_is_not_a_batch_is_one_line_naming_it(tmp_path, content):
    """Truncated, garbage or wrongly shaped batch files: one DatasetFileError naming the file, no traceback."""
    rng = np.random.default_rng(9)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _dump(d / name, _cifar_batch(2, rng, b"labels"))
    (d / "test_batch").write_bytes(content)
    with pytest.raises(data.DatasetFileError) as e:
        load_dataset("cifar10", root=str(tmp_path))
    assert "\n" not in str(e.value) and str(d / "test_batch") in str(e.value)


def test_train_accuracy_subset_is_one_rule_evenly_spaced_and_capped():
    """Every method's train_accuracy counts the same images: evenly spaced, at most the limit, first and last in."""
    ds = load_dataset("digits")
    x, y = ds.train_accuracy_subset(limit=100)
    idx = np.linspace(0, len(ds.train_y) - 1, 100).astype(np.int64)
    assert np.array_equal(x, ds.train_x[idx]) and np.array_equal(y, ds.train_y[idx])
    assert x.flags.c_contiguous and y.dtype == np.int64
    x_all, y_all = ds.train_accuracy_subset()  # fewer images than the limit: all of them
    assert np.array_equal(x_all, ds.train_x) and np.array_equal(y_all, ds.train_y)
