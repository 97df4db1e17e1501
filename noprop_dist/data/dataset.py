"""The dataset a run trains on: :class:`ImageDataset`, its checks, statistics, limits and validation split.

Images are uint8 (N, C, H, W), C-contiguous, labels int64 (N,): they go into Ray's object store once and every
block worker reads them zero-copy, converting a batch to float only on its device with :func:`normalize`.

:func:`load_dataset` turns a ``data.name`` into a dataset through :data:`noprop_dist.registry.DATASETS` (each
loader returns the full splits), then applies, in this order, ``train_limit`` / ``test_limit`` and the
validation split (``val_fraction``); every step that changes the training set recomputes ``mean`` / ``std``.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import Config, ConfigError, DataConfig
from ..registry import DATASETS

TRAIN_ACCURACY_LIMIT = 10_000  # train_accuracy is measured on at most this many training images
CHANNELS = (1, 3)  # grey or RGB: what the blocks' first convolution takes
# Pixels per np.bincount call in channel_stats: bincount casts its input to intp (8 bytes a pixel), so this
# bounds the temporary copy to a few MB whatever the dataset's size.
_STATS_CHUNK = 1 << 18

Log = Callable[[str], None]
Loader = Callable[[DataConfig, Log], "ImageDataset"]


class DatasetNotFoundError(Exception):
    """Raised when the files are missing; the message names every expected file and the directories searched."""


class DatasetFileError(ValueError):
    """A data file (or array) that is not in its format (or, a CIFAR pickle, would run code); the message is one
    line that names the file and key, or the argument. The entry points turn it into that line and exit code 2."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing/hashing arrays element-wise makes no sense
class ImageDataset:
    """A train/test split, and optionally a validation split, held in memory.

    ``train_x``: uint8 (N_train, C, H, W); ``train_y``: int64 (N_train,); same for ``test_*`` and ``val_*``
    (both None when there is no validation split). ``mean``/``std``: per-channel statistics of ``train_x / 255``
    (length C). ``class_names``: one name per class (length ``num_classes``), or None.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def eval_split(self) -> tuple[str, np.ndarray, np.ndarray]:
        """The split the per-epoch curve reads: ``("val", val_x, val_y)`` when there is a validation split, else
        ``("test", test_x, test_y)``."""
        if self.val_x is not None and self.val_y is not None:
            return "val", self.val_x, self.val_y
        return "test", self.test_x, self.test_y

    def summary(self) -> dict[str, Any]:
        """What summary.json records of the data: its name, classes, image shape and the size of each split."""
        return {"name": self.name, "num_classes": self.num_classes, "image_shape": list(self.image_shape),
                "train": len(self.train_y), "val": 0 if self.val_y is None else len(self.val_y),
                "test": len(self.test_y), "class_names": None if self.class_names is None else list(self.class_names)}

    def train_accuracy_indices(self, limit: int = TRAIN_ACCURACY_LIMIT) -> np.ndarray:
        """Indices (n,) int64 of the training images every method's ``train_accuracy`` is measured on, so
        Table 1's train column compares like with like: at most ``limit``, evenly spaced through the training
        set (all of them if fewer)."""
        n = len(self.train_y)
        return np.linspace(0, n - 1, min(n, limit)).astype(np.int64)

    def train_accuracy_subset(self, limit: int = TRAIN_ACCURACY_LIMIT) -> tuple[np.ndarray, np.ndarray]:
        """The images of :meth:`train_accuracy_indices`: (x uint8 (n, C, H, W), y int64 (n,)), C-contiguous."""
        idx = self.train_accuracy_indices(limit)
        return np.ascontiguousarray(self.train_x[idx]), np.ascontiguousarray(self.train_y[idx])

    @classmethod
    def from_arrays(cls, train_images: Any, train_labels: Any, test_images: Any, test_labels: Any,
                    name: str = "arrays", *, val_images: Any = None, val_labels: Any = None,
                    class_names: Sequence[str] | None = None) -> ImageDataset:
        """A dataset from numpy arrays or (CPU) torch tensors, checked; DatasetFileError (one line naming the
        argument) when they break a rule.

        Images: uint8, one of (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}. The layout is read from
        the shape: rank 3 is one channel; rank 4, (N, a, b, c), is NHWC when c is 1 or 3 and a is not, NCHW when
        a is 1 or 3 and c is not; when both a and c are 1 or 3 it is ambiguous and refused, and when neither is,
        refused too (channels must be 1 or 3). Every split must end up with the same (C, H, W).
        Labels: integers (not bool, not float), shape (N,) or (N, 1), one per image, each in 0..m-1, where m is
        ``len(class_names)`` if given, else the largest label of all splits + 1; m must be at least 2.
        ``val_images`` and ``val_labels``: both or neither; they become the validation split.
        ``class_names``: distinct non-empty strings, one per class.
        """
        arrays = {"train_images": train_images, "train_labels": train_labels,
                  "test_images": test_images, "test_labels": test_labels}
        if val_images is not None or val_labels is not None:
            arrays |= {"val_images": val_images, "val_labels": val_labels}
        return build_dataset(arrays, name, class_names, source="from_arrays")


def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, C, H, W) uint8 -> float32 ``(x/255 - mean) / std`` per channel, on ``x``'s device.

    mean, std: per-channel sequences, or tensors already on x's device (then no copy is made per batch).
    """
    m = torch.as_tensor(mean, dtype=torch.float32, device=x_uint8.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x_uint8.device).view(1, -1, 1, 1)
    return (x_uint8.to(torch.float32) / 255.0 - m) / s


# ---------------------------------------------------------------- statistics

def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of ``x / 255`` for uint8 ``x`` (N, C, H, W), N >= 1.

    Counts each channel's 256 values in chunks (``np.bincount``), so no float copy of ``x`` is made, and sums
    the counts exactly in Python integers: the mean and the variance's numerator carry no rounding error, and
    each result is rounded once.
    """
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) == 0:
        raise ValueError(f"channel_stats takes non-empty uint8 (N, C, H, W), got {x.dtype} {x.shape}")
    n, c, h, w = x.shape
    hist = np.zeros((c, 256), dtype=np.int64)
    images_per_chunk = max(1, _STATS_CHUNK // max(1, h * w))
    for ch in range(c):
        for i in range(0, n, images_per_chunk):
            flat = x[i:i + images_per_chunk, ch].reshape(-1)  # a copy of at most one chunk (or one plane)
            for j in range(0, flat.size, _STATS_CHUNK):
                hist[ch] += np.bincount(flat[j:j + _STATS_CHUNK], minlength=256)
    count = n * h * w
    means, stds = [], []
    for counts in hist.tolist():
        total = sum(v * k for v, k in enumerate(counts))
        squares = sum(v * v * k for v, k in enumerate(counts))
        means.append(total / (255 * count))  # int / int: one correctly rounded division
        stds.append(((count * squares - total * total) / (count * count * 255 * 255)) ** 0.5)
    return tuple(means), tuple(stds)


def make_dataset(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 num_classes: int, val: tuple[np.ndarray, np.ndarray] | None = None,
                 class_names: tuple[str, ...] | None = None) -> ImageDataset:
    """An ImageDataset from checked splits (x (N, C, H, W), y (N,)): C-contiguous uint8 / int64, with the
    training set's statistics."""
    def split(xy: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(xy[0], dtype=np.uint8), np.ascontiguousarray(xy[1], dtype=np.int64)

    (trx, try_), (tex, tey) = split(train), split(test)
    vx, vy = split(val) if val is not None else (None, None)
    mean, std = channel_stats(trx)
    return ImageDataset(name, trx, try_, tex, tey, num_classes, mean, std, vx, vy, class_names)


def _with_train(ds: ImageDataset, x: np.ndarray, y: np.ndarray, **changes: Any) -> ImageDataset:
    """``ds`` with a new training set (statistics recomputed on it) and any other fields changed."""
    mean, std = channel_stats(x)
    return dataclasses.replace(ds, train_x=x, train_y=y, mean=mean, std=std, **changes)


# ---------------------------------------------------------------- checks of given arrays (from_arrays, npz)

def build_dataset(arrays: Mapping[str, Any], name: str, class_names: Any, source: str) -> ImageDataset:
    """The checked dataset from ``arrays`` (keys ``{train,test}_{images,labels}``, optionally ``val_*``): the
    rules of :meth:`ImageDataset.from_arrays`. ``source`` (a file, or ``from_arrays``) starts every message."""
    splits = [s for s in ("train", "test", "val") if f"{s}_images" in arrays or f"{s}_labels" in arrays]
    for s in splits:
        for given, lacking in ((f"{s}_images", f"{s}_labels"), (f"{s}_labels", f"{s}_images")):
            if arrays.get(given) is not None and arrays.get(lacking) is None:
                raise DatasetFileError(f"{source}: {given} given without {lacking}; give both or neither")
    images = {s: _images(_as_array(arrays[f"{s}_images"], source, f"{s}_images"), source, f"{s}_images")
              for s in splits}
    shape = images["train"].shape[1:]
    for s in splits:
        if images[s].shape[1:] != shape:
            raise DatasetFileError(f"{source}: {s}_images holds images of (C, H, W) = {images[s].shape[1:]}, "
                                   f"train_images {shape}; every split needs the same")
    labels = {s: _labels(_as_array(arrays[f"{s}_labels"], source, f"{s}_labels"), len(images[s]), source, s)
              for s in splits}
    names = None if class_names is None else _class_names(class_names, source)
    num_classes = _check_label_range(labels, names, source)
    val = (images["val"], labels["val"]) if "val" in images else None
    return make_dataset(name, (images["train"], labels["train"]), (images["test"], labels["test"]), num_classes,
                        val, names)


def _as_array(value: Any, source: str, key: str) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor (copied to the CPU if need be)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise DatasetFileError(f"{source}: {key} must be a numpy array or a torch tensor, got {type(value).__name__}")


def _images(x: np.ndarray, source: str, key: str) -> np.ndarray:
    """uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) -> C-contiguous (N, C, H, W) (the layout rule of
    :meth:`ImageDataset.from_arrays`); a copy only when the layout or memory order changes."""
    if x.dtype != np.uint8:
        raise DatasetFileError(f"{source}: {key} is {x.dtype}; images must be uint8: convert with "
                               ".astype(np.uint8) after scaling to 0..255")
    allowed = "images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3"
    if x.ndim not in (3, 4):
        raise DatasetFileError(f"{source}: {key} has shape {x.shape}; {allowed}")
    if x.size == 0:
        raise DatasetFileError(f"{source}: {key} has shape {x.shape}: no image (or no pixel); {allowed}")
    if x.ndim == 3:
        return np.ascontiguousarray(x[:, None])
    a, c = x.shape[1], x.shape[3]
    if c in CHANNELS and a not in CHANNELS:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if a in CHANNELS and c not in CHANNELS:
        return np.ascontiguousarray(x)
    if a in CHANNELS:
        raise DatasetFileError(f"{source}: {key} has shape {x.shape}: ambiguous, axis 1 and axis 3 could both be "
                               "the channels (1 or 3); give one-channel images as (N, H, W)")
    raise DatasetFileError(f"{source}: {key} has shape {x.shape}: neither axis 1 nor axis 3 has 1 or 3 channels; "
                           f"{allowed}")


def _labels(y: np.ndarray, n: int, source: str, split: str) -> np.ndarray:
    """Integer labels (N,) or (N, 1), one per image of ``split`` -> (N,), dtype as given (range checked later)."""
    key = f"{split}_labels"
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise DatasetFileError(f"{source}: {key} is {y.dtype}; labels must be integers 0..m-1 "
                               "(e.g. .astype(np.int64) of class indices)")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DatasetFileError(f"{source}: {key} has shape {y.shape}; labels must be (N,) or (N, 1)")
    if len(y) != n:
        raise DatasetFileError(f"{source}: {key} holds {len(y)} labels for the {n} images of {split}_images")
    return y


def _class_names(names: Any, source: str) -> tuple[str, ...]:
    """Distinct non-empty strings, one per class."""
    if isinstance(names, (str, bytes)) or not isinstance(names, (Sequence, np.ndarray)):
        raise DatasetFileError(f"{source}: class_names must be a sequence of strings, got {type(names).__name__}")
    out = tuple(names.tolist() if isinstance(names, np.ndarray) else names)  # plain str, not np.str_
    for i, s in enumerate(out):
        if not isinstance(s, str) or not s:
            raise DatasetFileError(f"{source}: class_names[{i}] is {str(s)[:40]!r}; class names must be "
                                   "non-empty strings")
    out = tuple(str(s) for s in out)  # np.str_ (a str subclass) would not load with torch.load(weights_only=True)
    seen: set[str] = set()
    for s in out:
        if s in seen:
            raise DatasetFileError(f"{source}: class_names holds {s[:60]!r} twice; class names must be distinct")
        seen.add(s)
    return out


def _check_label_range(labels: Mapping[str, np.ndarray], names: tuple[str, ...] | None, source: str) -> int:
    """m (the number of classes) once m >= 2 and every label lies in 0..m-1."""
    bounds = {s: (int(y.min()), int(y.max())) for s, y in labels.items()}
    for s, (lo, _) in bounds.items():
        if lo < 0:
            raise DatasetFileError(f"{source}: {s}_labels holds {lo}; labels are class indices 0..m-1, never negative")
    if names is not None:
        m, why = len(names), "from class_names"
        what = f"class_names holds {m} name{'' if m == 1 else 's'}"
    else:
        m, why = max(hi for _, hi in bounds.values()) + 1, "from the largest label"
        what = " and ".join(f"{s}_labels" for s in labels) + " hold class 0 only"
    if m < 2:
        raise DatasetFileError(f"{source}: {what} (m = {m} {why}); a classifier needs at least 2 classes")
    for s, (_, hi) in bounds.items():
        if hi >= m:
            raise DatasetFileError(f"{source}: {s}_labels holds {hi} outside 0..{m - 1} (m = {m} {why})")
    return m


# ---------------------------------------------------------------- the steps after loading

def _subset(x: np.ndarray, y: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first ``limit`` of a fixed-seed permutation; always return C-contiguous arrays."""
    if limit is not None and limit < len(y):
        idx = np.random.default_rng(0).permutation(len(y))[:limit]
        x, y = x[idx], y[idx]
    return np.ascontiguousarray(x, dtype=np.uint8), np.ascontiguousarray(y, dtype=np.int64)


def apply_limits(ds: ImageDataset, train_limit: int | None, test_limit: int | None) -> ImageDataset:
    """Keep ``train_limit`` / ``test_limit`` examples: the first k of a ``np.random.default_rng(0)`` permutation,
    so that small subsets still hold every class. The validation split is kept whole."""
    if train_limit is not None and train_limit < len(ds.train_y):
        ds = _with_train(ds, *_subset(ds.train_x, ds.train_y, train_limit))
    if test_limit is not None and test_limit < len(ds.test_y):
        tex, tey = _subset(ds.test_x, ds.test_y, test_limit)
        ds = dataclasses.replace(ds, test_x=tex, test_y=tey)
    return ds


def split_validation(ds: ImageDataset, val_fraction: float, seed: int, source: str) -> ImageDataset:
    """Hold out ``val_fraction`` of the training set as the validation split, stratified: ``round(val_fraction *
    n_c)`` images of each class c, the first of ``np.random.default_rng(seed).permutation`` of the class's
    indices (one generator, classes in ascending order). Both sides keep ascending index order.
    ConfigError when ``ds`` has its own validation split, or the split would leave a class without training
    images or hold out nothing."""
    if val_fraction == 0:
        return ds
    if ds.val_y is not None:
        raise ConfigError(f"data.val_fraction: {source} has its own validation split ({len(ds.val_y)} images); "
                          "leave data.val_fraction at 0 to use it")
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(ds.train_y), dtype=bool)
    for c in np.unique(ds.train_y):
        idx = rng.permutation(np.flatnonzero(ds.train_y == c))
        k = round(val_fraction * len(idx))
        if k == len(idx):
            label = ds.class_names[c] if ds.class_names else int(c)
            raise ConfigError(f"data.val_fraction: {val_fraction} holds out all {k} training images of class "
                              f"{label!r} in {source}; lower data.val_fraction")
        is_val[idx[:k]] = True
    if not is_val.any():
        raise ConfigError(f"data.val_fraction: {val_fraction} of each class of {source} rounds to no image; "
                          "raise data.val_fraction or leave it at 0")
    keep = ~is_val
    return _with_train(ds, ds.train_x[keep], ds.train_y[keep], val_x=ds.train_x[is_val], val_y=ds.train_y[is_val])


def prepare(ds: ImageDataset, data: DataConfig, seed: int, source: str) -> ImageDataset:
    """The steps after loading, in order: the limits, then the validation split (seeded by ``seed``)."""
    ds = apply_limits(ds, data.train_limit, data.test_limit)
    return split_validation(ds, data.val_fraction, seed, source)


def _quiet(_: str) -> None:
    """A log that shows nothing."""


def load_dataset(name: str, root: str | os.PathLike | None = None, download: bool = False,
                 train_limit: int | None = None, test_limit: int | None = None, *,
                 path: str | os.PathLike | None = None, image_size: int | None = None, val_fraction: float = 0.0,
                 seed: int = 0, log: Log | None = None) -> ImageDataset:
    """Load ``name`` (a ``data.name`` of :data:`noprop_dist.registry.DATASETS`) as uint8 NCHW arrays.

    ``root``: directory holding a built-in dataset's files (None: the loader's default; ignored for ``digits``).
    ``download``: fetch missing files into ``root`` (needs a network).
    ``train_limit``/``test_limit``: keep a deterministic subset of k examples (:func:`apply_limits`).
    ``path``: the .npz file (``npz``) or image directory (``image_folder``); ``image_size``: image_folder's
    resize to S x S. ``val_fraction``: share of the (limited) training set held out as the validation split,
    stratified and fixed by ``seed`` (:func:`split_validation`). ``log``: progress lines of long loads.
    mean/std are computed on the final training set. A bad argument raises ConfigError (a ValueError) naming
    the data.* key.
    """
    data = DataConfig(name=name, root=None if root is None else os.fspath(root), download=download,
                      train_limit=train_limit, test_limit=test_limit,
                      path=None if path is None else os.fspath(path), image_size=image_size,
                      val_fraction=val_fraction)
    data.validate()  # DataConfig holds the data.* rules (an unknown name lists the allowed ones)
    loader: Loader = DATASETS.resolve(name)
    return prepare(loader(data, log or _quiet), data, seed, source=data.path or name)


def dataset_for(cfg: Config, given: ImageDataset | None = None, log: Log | None = None) -> ImageDataset:
    """The dataset the run ``cfg`` trains on: ``given`` (from the Python API, with ``data.name: arrays``) with
    cfg's limits and validation split applied, else :func:`load_dataset` of ``cfg.data`` seeded by
    ``cfg.train.seed``."""
    d = cfg.data
    if given is None:
        return load_dataset(d.name, d.root, d.download, d.train_limit, d.test_limit, path=d.path,
                            image_size=d.image_size, val_fraction=d.val_fraction, seed=cfg.train.seed, log=log)
    if not isinstance(given, ImageDataset):
        raise ConfigError(f"dataset: expected an ImageDataset (ImageDataset.from_arrays(...)), got "
                          f"{type(given).__name__}")
    if d.name != "arrays":
        raise ConfigError(f"data.name: a dataset given to the Python API trains with data.name=arrays, not {d.name}")
    return prepare(given, d, cfg.train.seed, source=given.name)


def arrays_from_api(data: DataConfig, log: Log) -> ImageDataset:
    """``data.name: arrays`` names the dataset given to the Python API; there is nothing to load."""
    raise ConfigError("data.name: arrays is the dataset given to the Python API: noprop_dist.train(config, "
                      "dataset=ImageDataset.from_arrays(...)); from a file use data.name=npz with data.path")
