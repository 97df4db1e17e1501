"""The built-in datasets: scikit-learn's digits, (Fashion-)MNIST, CIFAR-10/100 and BloodMNIST.

Each ``load_<name>(data, log)`` is the loader :data:`noprop_dist.registry.DATASETS` names for ``data.name``; it
returns the full splits as an :class:`~noprop_dist.data.dataset.ImageDataset` (limits and the validation split are
applied afterwards, by :func:`~noprop_dist.data.dataset.load_dataset`).

The file formats (IDX for MNIST, python pickles for CIFAR) are parsed here rather than through
torchvision's dataset classes, so no md5 check or network is needed for files already on disk;
torchvision is only used to fetch missing files when ``download=True``. CIFAR's pickles go through an
unpickler that admits only numpy's array reconstruction (:func:`read_cifar_batch`): a file planted in
``data.root`` cannot run code.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from ..config import DataConfig
from .dataset import (
    DatasetFileError,
    DatasetNotFoundError,
    ImageDataset,
    Log,
    make_dataset,
)
from .files import read_npz

# The built-in datasets, found under data.root (or bundled); every data.name is in noprop_dist.registry.DATASETS.
DATASET_NAMES: tuple[str, ...] = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100",
                                   "bloodmnist", "bloodmnist_64", "bloodmnist_128")

T = TypeVar("T")

# Used when ``root`` is None (relative to the working directory; ignored by git).
DEFAULT_ROOT = "data"
# Where Debian's `apt-get install dataset-fashion-mnist` puts the four gzipped IDX files.
# Module-level so tests can point it elsewhere.
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # ubyte data, 3 dims (images) / 1 dim (labels)
_TV_NAMES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST",
             "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
# MedMNIST's own default download directory (``medmnist`` package); searched after ``root``.
MEDMNIST_DEFAULT_DIR = os.path.join("~", ".medmnist")
# BloodMNIST's 8 classes in label order (MedMNIST's INFO["bloodmnist"]["label"]).
BLOODMNIST_CLASSES = ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte", "monocyte",
                      "neutrophil", "platelet"]
_MEDMNIST = {  # name -> (file, class names): MedMNIST v2 (28 px) and MedMNIST+ (64 / 128 px) file names
    "bloodmnist": ("bloodmnist.npz", BLOODMNIST_CLASSES),
    "bloodmnist_64": ("bloodmnist_64.npz", BLOODMNIST_CLASSES),
    "bloodmnist_128": ("bloodmnist_128.npz", BLOODMNIST_CLASSES),
}
_CIFAR = {  # name -> (directory, train files, test files, label key, classes)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                ("test_batch",), b"labels", 10),
    "cifar100": ("cifar-100-python", ("train",), ("test",), b"fine_labels", 100),
}


# ---------------------------------------------------------------- the registry's loaders

def _root(data: DataConfig) -> str:
    return DEFAULT_ROOT if data.root is None else os.fspath(data.root)


def load_digits(data: DataConfig, log: Log) -> ImageDataset:
    """``digits``: scikit-learn's bundled 8x8 digits, (N, 1, 8, 8); ``data.root`` is ignored."""
    train, test, classes = _load_digits()
    return make_dataset("digits", train, test, classes)


def _mnist_like(name: str, data: DataConfig) -> ImageDataset:
    train, test, classes = _load_mnist_like(name, _root(data), data.download)
    return make_dataset(name, train, test, classes)


def load_mnist(data: DataConfig, log: Log) -> ImageDataset:
    """``mnist``: IDX files, (N, 1, 28, 28)."""
    return _mnist_like("mnist", data)


def load_fashion_mnist(data: DataConfig, log: Log) -> ImageDataset:
    """``fashion_mnist``: IDX files, (N, 1, 28, 28); also found where Debian's package puts them."""
    return _mnist_like("fashion_mnist", data)


def _cifar(name: str, data: DataConfig) -> ImageDataset:
    train, test, classes = _load_cifar(name, _root(data), data.download)
    return make_dataset(name, train, test, classes)


def load_cifar10(data: DataConfig, log: Log) -> ImageDataset:
    """``cifar10``: the python batches, (N, 3, 32, 32)."""
    return _cifar("cifar10", data)


def load_cifar100(data: DataConfig, log: Log) -> ImageDataset:
    """``cifar100``: the python batches, (N, 3, 32, 32), fine labels."""
    return _cifar("cifar100", data)


def _bloodmnist(name: str, data: DataConfig) -> ImageDataset:
    path = _find_medmnist(name, _root(data), data.download)
    # MedMNIST's key layout is the npz loader's: one reader, one set of checks (nothing in the file runs)
    return read_npz(path, name, _MEDMNIST[name][1], what="a MedMNIST file")


def load_bloodmnist(data: DataConfig, log: Log) -> ImageDataset:
    """``bloodmnist``: MedMNIST's 28x28 .npz, (N, 3, 28, 28), with its val split."""
    return _bloodmnist("bloodmnist", data)


def load_bloodmnist_64(data: DataConfig, log: Log) -> ImageDataset:
    """``bloodmnist_64``: MedMNIST+'s 64x64 .npz, (N, 3, 64, 64), with its val split."""
    return _bloodmnist("bloodmnist_64", data)


def load_bloodmnist_128(data: DataConfig, log: Log) -> ImageDataset:
    """``bloodmnist_128``: MedMNIST+'s 128x128 .npz, (N, 3, 128, 128), with its val split."""
    return _bloodmnist("bloodmnist_128", data)


# ---------------------------------------------------------------- CIFAR: the restricted unpickler

class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR batch does not need; the message names it."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles ``bytes`` at protocol 2 (latin-1 text); no other codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _cifar_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR python batch may name: what pickling a numpy array writes, under numpy 1's
    (``numpy.core``, the real files') and numpy 2's (``numpy._core``) module names, for protocols 2 to 5."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                              ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct  # protocols 2-4
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch and nothing else: a pickle names the callables it runs as globals, and every
    global but numpy's array reconstruction is refused, so a planted file cannot run code."""

    allowed = _cifar_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def read_cifar_batch(path: str) -> dict:
    """One CIFAR python batch (a dict with bytes keys) through :class:`_CifarUnpickler`; DatasetFileError
    (one line naming the file) for a pickle that names another global or is not a batch at all."""
    try:
        with open(path, "rb") as fh:
            batch = _CifarUnpickler(fh, encoding="bytes").load()
    except _RefusedGlobal as e:
        raise DatasetFileError(f"{path}: refused to unpickle the global {e}: a CIFAR batch needs only numpy "
                               "arrays, so this file is not one (it could run code); not loaded") from None
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - garbage makes pickle raise anything from EOFError to KeyError
        raise DatasetFileError(f"{path}: not a CIFAR python batch ({e.__class__.__name__}: "
                               f"{' '.join(str(e).split())[:200]})") from None
    if not isinstance(batch, dict):
        raise DatasetFileError(f"{path}: not a CIFAR python batch (a pickled {type(batch).__name__}, not a dict)")
    return batch



# ---------------------------------------------------------------- the file formats

def _load_digits():
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16), as uint8 (N, 1, 8, 8).

    Fixed stratified split: for each class c, its indices are permuted with
    ``np.random.default_rng(0)`` (one generator, classes in ascending order) and the first
    ``round(0.2 * n_c)`` go to test, the rest to train; both sides keep ascending index order.
    """
    pixels, target = _digits_arrays()
    x = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    y = target.astype(np.int64)
    rng = np.random.default_rng(0)
    is_test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        is_test[idx[: int(round(0.2 * len(idx)))]] = True
    return (x[~is_test], y[~is_test]), (x[is_test], y[is_test]), 10


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (pixels (1797, 64) float64 in 0..16, labels (1797,)), the values of
    ``sklearn.datasets.load_digits()``.

    Read straight from the CSV file scikit-learn ships (each row: 64 pixels, then the label), found without
    importing scikit-learn: its import (scipy included) costs most of a second in every process that loads digits,
    the quickstart's driver among them. Where the file is not in its place, scikit-learn's own loader reads it.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DatasetNotFoundError("data.name=digits: scikit-learn, which ships the digits, is not installed "
                                   "(pip install scikit-learn)")
    for folder in spec.submodule_search_locations or ():
        path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1]
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


# An IDX header may claim any size; a corrupt or hostile one (a gzip bomb) is refused before it is inflated.
# MNIST's largest file holds 47 MB; this allows datasets a hundred times larger.
MAX_IDX_BYTES = 1 << 33


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Parse one IDX file (plain or ``.gz``) of unsigned bytes with ``ndim`` dimensions.

    Layout: big-endian magic (0x00000803 for 3-dim images, 0x00000801 for labels), then ``ndim``
    big-endian uint32 sizes, then the data. The header is read first and only the bytes it announces are
    inflated (at most :data:`MAX_IDX_BYTES`), so a gzip bomb stops at the header's size. Raises DatasetFileError
    (a ValueError) naming the file on any mismatch, and on a truncated or corrupt gzip stream.
    """
    gz = path.endswith(".gz")
    header = 4 + 4 * ndim
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            head = f.read(header)
            if len(head) < header:
                raise DatasetFileError(f"{path}: truncated IDX file ({len(head)} bytes)")
            (magic,) = struct.unpack(">I", head[:4])
            if magic != _IDX_MAGIC[ndim]:
                raise DatasetFileError(f"{path}: bad IDX magic number 0x{magic:08x}, expected "
                                       f"0x{_IDX_MAGIC[ndim]:08x}")
            dims = struct.unpack(f">{ndim}I", head[4:header])
            expected = int(np.prod(dims, dtype=np.int64))
            if expected > MAX_IDX_BYTES:
                raise DatasetFileError(f"{path}: IDX header says {dims} ({expected} bytes), more than the "
                                       f"{MAX_IDX_BYTES} bytes an IDX file is read to; not loaded")
            raw = f.read(expected)
            trailing = f.read(1)
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut stream an EOFError
        what = "a readable gzip-compressed IDX file" if gz else "a readable IDX file"
        raise DatasetFileError(f"{path}: not {what} ({type(e).__name__}: {' '.join(str(e).split())[:150]})") from None
    if len(raw) != expected or trailing:
        held = f"{len(raw)} bytes of data" if not trailing else f"more than {expected} bytes of data"
        raise DatasetFileError(f"{path}: IDX size mismatch: header says {dims} ({expected} bytes), file holds {held}")
    # copy: a view of the bytes object would be read-only (torch.from_numpy warns on those)
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims).copy()


def _find_idx_dir(dirs: list[str]) -> dict[str, str] | None:
    """First directory holding all four IDX files (each plain or .gz): base name -> path."""
    for d in dirs:
        found = {}
        for base in IDX_FILES:
            for cand in (os.path.join(d, base), os.path.join(d, base + ".gz")):
                if os.path.isfile(cand):
                    found[base] = cand
                    break
        if len(found) == len(IDX_FILES):
            return found
    return None


def _locate(find: Callable[[], T | None], download: bool, fetch: Callable[[], None], missing: str) -> T:
    """What ``find()`` returns; when it finds nothing and ``download`` is on, ``fetch()`` and look again.
    Still nothing: DatasetNotFoundError(``missing``), which says where we looked and how to get the files."""
    found = find()
    if found is None and download:
        fetch()
        found = find()
    if found is None:
        raise DatasetNotFoundError(missing)
    return found


def _load_mnist_like(name: str, root: str, download: bool):
    """MNIST / Fashion-MNIST from IDX files: images (N, 1, 28, 28), labels (N,).

    Search order: ``root``, ``root/<MNIST|FashionMNIST>/raw`` (torchvision's layout), and for
    fashion_mnist :data:`FASHION_MNIST_DEBIAN_DIR` (Debian's ``dataset-fashion-mnist`` package).
    """
    raw_dir = os.path.join(root, _TV_NAMES[name], "raw")
    dirs = [root, raw_dir]
    if name == "fashion_mnist":
        dirs.append(FASHION_MNIST_DEBIAN_DIR)
    hint = " or `apt-get install dataset-fashion-mnist`" if name == "fashion_mnist" else ""
    files = _locate(lambda: _find_idx_dir(dirs), download, lambda: _torchvision_download(name, root),
                    f"{name}: files not found. Expected {', '.join(IDX_FILES)} (each plain or .gz) "
                    f"in one of: {', '.join(dirs)}. Set data.root to their directory, set "
                    f"`data.download: true` to fetch them through torchvision{hint}.")
    split = []
    for prefix in ("train", "t10k"):
        x = read_idx(files[f"{prefix}-images-idx3-ubyte"], 3)
        y = read_idx(files[f"{prefix}-labels-idx1-ubyte"], 1)
        if len(x) != len(y):
            raise DatasetFileError(f"{files[f'{prefix}-labels-idx1-ubyte']}: {len(y)} labels "
                                   f"for {len(x)} images")
        split.append((x[:, None, :, :], y.astype(np.int64)))
    return split[0], split[1], 10


def _load_cifar(name: str, root: str, download: bool):
    """CIFAR-10/100 from the python-pickle batches: images (N, 3, 32, 32), labels (N,).

    Each batch is a dict with ``b"data"`` uint8 (N, 3072) -- row-major 32x32 R, G, B planes --
    and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). Searched in
    ``root/<cifar dir>`` and then ``root`` itself.
    """
    sub, train_files, test_files, label_key, classes = _CIFAR[name]
    dirs = [os.path.join(root, sub), root]
    needed = train_files + test_files

    def find() -> str | None:
        return next((d for d in dirs if all(os.path.isfile(os.path.join(d, f)) for f in needed)), None)

    found = _locate(find, download, lambda: _torchvision_download(name, root),
                    f"{name}: files not found. Expected {', '.join(needed)} in one of: {', '.join(dirs)}. "
                    f"Set data.root to the directory holding {sub}/, or set `data.download: true` "
                    f"to fetch them through torchvision.")

    def read(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            path = os.path.join(found, f)
            batch = read_cifar_batch(path)
            try:
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                raise DatasetFileError(f"{path}: expected the keys b'data' (uint8 (N, 3072)) and {label_key!r} "
                                       f"(N labels) ({e.__class__.__name__}: {e})") from None
            if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
                raise DatasetFileError(f"{path}: expected data (N, 3072) and N labels, "
                                       f"got data {data.shape} and {len(labels)} labels")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(labels)
        return np.concatenate(xs), np.concatenate(ys)

    return read(train_files), read(test_files), classes


def _find_medmnist(name: str, root: str, download: bool) -> str:
    """The path of MedMNIST's ``.npz`` for ``name``: ``{train,val,test}_images`` uint8 (N, H, W, 3) (or (N, H, W)
    for the grey datasets) and ``{train,val,test}_labels`` (N, 1); the val split is the run's validation split.
    Searched in ``root`` and then :data:`MEDMNIST_DEFAULT_DIR` (where the ``medmnist`` package downloads to)."""
    fname, _ = _MEDMNIST[name]
    dirs = [root, os.path.expanduser(MEDMNIST_DEFAULT_DIR)]

    def find() -> str | None:
        return next((os.path.join(d, fname) for d in dirs if os.path.isfile(os.path.join(d, fname))), None)

    path = _locate(find, download, lambda: _medmnist_download(name, root),
                   f"{name}: file not found. Expected {fname} in one of: {', '.join(dirs)}. Set data.root to its "
                   f"directory, or set `data.download: true` with the `medmnist` package installed to fetch it.")
    return path


def _medmnist_download(name: str, root: str) -> None:
    """Fetch ``name`` into ``root`` with the ``medmnist`` package (network needed)."""
    try:
        import medmnist  # local import: optional dependency
    except ImportError:
        raise DatasetNotFoundError(
            f"{name}: data.download needs the `medmnist` package (pip install medmnist)") from None
    size = int(name.rsplit("_", 1)[1]) if name.count("_") else 28
    os.makedirs(root, exist_ok=True)
    medmnist.BloodMNIST(split="train", download=True, root=root, size=size)


def _torchvision_download(name: str, root: str) -> None:
    """Fetch both splits of ``name`` into ``root`` with torchvision (network needed)."""
    import torchvision  # local import: only the download path needs it

    cls = getattr(torchvision.datasets, _TV_NAMES[name])
    os.makedirs(root, exist_ok=True)
    for train in (True, False):
        cls(root, train=train, download=True)
