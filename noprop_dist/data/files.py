"""Users' own datasets at ``data.path``: one ``.npz`` file (``data.name: npz``) or a folder of images
(``data.name: image_folder``, torchvision ImageFolder's layout).

Every failure is one line naming the file (and key) or folder: DatasetNotFoundError when it is missing,
DatasetFileError otherwise; the entry points turn either into that line and exit code 2.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError, DataConfig
from .dataset import (
    DatasetFileError,
    DatasetNotFoundError,
    ImageDataset,
    Log,
    build_dataset,
    make_dataset,
)

NPZ_REQUIRED = ("train_images", "train_labels", "test_images", "test_labels")
NPZ_OPTIONAL = ("val_images", "val_labels")
# What torchvision's ImageFolder reads and PIL decodes; other files in a class folder are skipped.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# PIL modes with one (grey) band, with or without alpha: such images load as one channel.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
PROGRESS_SECONDS = 5.0  # at most one progress line this often while images decode


def _why(e: BaseException) -> str:
    """An exception as a short one-line text: its type and first sentence."""
    text = " ".join(str(e).split())
    first = text.split(". ")[0][:150]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _path(data: DataConfig) -> str:
    if not data.path:
        what = "the .npz file" if data.name == "npz" else "the directory holding train/<class>/ and test/<class>/"
        raise ConfigError(f"data.path: data.name={data.name} reads {what}; set data.path")
    return os.fspath(data.path)


# ---------------------------------------------------------------- npz

def load_npz(data: DataConfig, log: Log) -> ImageDataset:
    """``data.path``: one ``.npz`` with ``train_images``, ``train_labels``, ``test_images``, ``test_labels``,
    optionally ``val_images`` + ``val_labels`` (the validation split) and ``class_names`` (a 1-D unicode string
    array). Images and labels follow :meth:`ImageDataset.from_arrays`' rules (uint8 images, (N, H, W),
    (N, H, W, C) or (N, C, H, W); integer labels). Read with ``allow_pickle=False``: nothing in the file runs.
    The dataset's name is the file's stem."""
    path = _path(data)
    if not os.path.exists(path):
        raise DatasetNotFoundError(f"{path}: no such file; data.name=npz reads one .npz file holding "
                                   f"{', '.join(NPZ_REQUIRED)}")
    if os.path.isdir(path):
        raise DatasetFileError(f"{path}: a directory; data.name=npz reads one .npz file "
                               "(data.name=image_folder reads a directory of images)")
    return read_npz(path, os.path.splitext(os.path.basename(path))[0])


def read_npz(path: str, name: str, class_names: list[str] | None = None, what: str = "an .npz archive") -> ImageDataset:
    """The dataset in the ``.npz`` file ``path`` (MedMNIST's key layout, the rules of
    :meth:`ImageDataset.from_arrays`), read with ``allow_pickle=False``; ``class_names`` when the caller knows
    them (the file's own ``class_names`` otherwise). Every problem is one DatasetFileError naming the file."""
    try:
        opened = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - garbage makes numpy / zipfile raise anything from EOFError to ValueError
        raise DatasetFileError(f"{path}: not {what} ({_why(e)})") from None
    if not isinstance(opened, np.lib.npyio.NpzFile):
        raise DatasetFileError(f"{path}: one .npy array, not an .npz archive of named arrays; write one with "
                               "np.savez(path, train_images=..., train_labels=..., test_images=..., test_labels=...)")
    with opened as npz:
        missing = [k for k in NPZ_REQUIRED if k not in npz.files]
        if missing:
            raise DatasetFileError(f"{path}: not {what}: key {missing[0]} missing; it has "
                                   f"{', '.join(npz.files)[:150] or 'no key'} (needs {', '.join(NPZ_REQUIRED)})")
        arrays = {k: _member(npz, k, path) for k in NPZ_REQUIRED + NPZ_OPTIONAL if k in npz.files}
        if class_names is None and "class_names" in npz.files:
            class_names = _npz_class_names(_member(npz, "class_names", path), path)
    return build_dataset(arrays, name, class_names, source=path)


def _member(npz: np.lib.npyio.NpzFile, key: str, path: str) -> np.ndarray:
    """One array of the archive; one line naming the file and key when numpy cannot or will not read it."""
    try:
        return npz[key]
    except Exception as e:  # noqa: BLE001 - a damaged member raises anything from zlib.error to ValueError
        if isinstance(e, ValueError) and "Object arrays" in str(e):
            raise DatasetFileError(f"{path}: {key} is an object array (pickled Python objects), refused without "
                                   "unpickling it; store plain arrays (images uint8, labels integers)") from None
        raise DatasetFileError(f"{path}: {key} cannot be read ({_why(e)})") from None


def _npz_class_names(names: np.ndarray, path: str) -> list[str]:
    if names.dtype.kind != "U" or names.ndim != 1:
        raise DatasetFileError(f"{path}: class_names is {names.dtype} {names.shape}; it must be a 1-D unicode "
                               "string array, e.g. np.array(['cat', 'dog'])")
    return names.tolist()


# ---------------------------------------------------------------- image folder

@dataclass
class _Split:
    """One split of an image folder: its image files (sorted) and their class indices."""

    name: str  # train, test, val
    files: list[str]
    labels: list[int]


def load_image_folder(data: DataConfig, log: Log) -> ImageDataset:
    """``data.path`` holds ``train/<class>/*`` and ``test/<class>/*``, optionally ``val/<class>/*`` (the
    validation split): torchvision ImageFolder's layout. The classes are train/'s sorted folder names; each
    class folder's image files (by extension, in its subfolders too, in sorted order; hidden files and folders
    skipped) are its images. The images have one channel when every one is greyscale, else three (greys
    replicated). With ``data.image_size`` every image is resized to S x S (bilinear); without it every image
    must have the first one's size. The dataset's name is the directory's base name."""
    root = _path(data)
    if not os.path.exists(root):
        raise DatasetNotFoundError(f"{root}: no such directory; data.name=image_folder reads DIR/train/<class>/ "
                                   "and DIR/test/<class>/ image files")
    if not os.path.isdir(root):
        raise DatasetFileError(f"{root}: not a directory; data.name=image_folder reads DIR/train/<class>/ and "
                               "DIR/test/<class>/ (data.name=npz reads a .npz file)")
    classes = _class_folders(os.path.join(root, "train"), required=True)
    if len(classes) < 2:
        raise DatasetFileError(f"{os.path.join(root, 'train')}: holds {len(classes)} class folder(s) "
                               f"({', '.join(classes) or 'none'}); a classifier needs at least 2")
    splits = [_split(root, s, classes) for s in ("train", "test", "val")
              if s != "val" or os.path.isdir(os.path.join(root, "val"))]
    channels, size = _scan(splits, data.image_size)
    total = sum(len(s.files) for s in splits)
    progress = _Progress(log, root, total)
    xy = {s.name: (_decode(s.files, channels, size, data.image_size is not None, progress),
                   np.asarray(s.labels, dtype=np.int64)) for s in splits}
    name = os.path.basename(os.path.normpath(root))
    return make_dataset(name, xy["train"], xy["test"], len(classes), xy.get("val"), tuple(classes))


def _class_folders(split_dir: str, required: bool) -> list[str]:
    """The sorted names of ``split_dir``'s class folders (hidden ones skipped)."""
    if not os.path.isdir(split_dir):
        raise DatasetNotFoundError(f"{split_dir}: no such folder; data.name=image_folder reads DIR/train/<class>/ "
                                   "and DIR/test/<class>/ (and optionally DIR/val/<class>/)")
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if required and not names:
        raise DatasetFileError(f"{split_dir}: holds no class folder; put each class's images in {split_dir}/<class>/")
    return names


def _split(root: str, name: str, classes: list[str]) -> _Split:
    """The files and labels of ``root/name``; its class folders must be train/'s and none empty."""
    split_dir = os.path.join(root, name)
    out = _Split(name, [], [])
    for folder in _class_folders(split_dir, required=True):
        if folder not in classes:
            raise DatasetFileError(f"{os.path.join(split_dir, folder)}: a class folder train/ lacks (train/ has "
                                   f"{', '.join(classes)[:120]}); every class needs training images")
        files = _image_files(os.path.join(split_dir, folder))
        out.files += files
        out.labels += [classes.index(folder)] * len(files)
    return out


def _image_files(folder: str) -> list[str]:
    """The image files under ``folder`` (any depth), sorted as ImageFolder sorts them: by folder, then name."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # os.walk descends only into what is left
        found.append((parent, sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)
                                     and not f.startswith("."))))
    paths = [os.path.join(parent, f) for parent, files in sorted(found) for f in files]
    if not paths:
        raise DatasetFileError(f"{folder}: empty class folder (no {' '.join(IMAGE_EXTENSIONS)} file)")
    return paths


def _scan(splits: list[_Split], image_size: int | None) -> tuple[int, tuple[int, int]]:
    """First pass, headers only: (channels, (width, height)) of the arrays. One channel when every image is
    greyscale, else 3; without ``image_size`` every image must have the first one's size."""
    from PIL import Image  # local import: only image folders need PIL

    grey, first, first_size = True, None, None
    for split in splits:
        for f in split.files:
            try:
                with Image.open(f) as im:  # reads the header, decodes nothing
                    size, mode = im.size, im.mode
            except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
                raise DatasetFileError(f"{f}: not a readable image ({_why(e)})") from None
            grey = grey and mode in GREY_MODES
            if first is None:
                first, first_size = f, size
            elif image_size is None and size != first_size:
                raise DatasetFileError(f"{f}: {size[0]}x{size[1]} pixels, but {first} has {first_size[0]}x"
                                       f"{first_size[1]}; every image needs one size, or set data.image_size=S "
                                       "to resize all to S x S")
    assert first_size is not None  # every split has files (_image_files)
    return (1 if grey else 3), ((image_size, image_size) if image_size is not None else first_size)


class _Progress:
    """Logs ``images decoded so far / total`` at most every PROGRESS_SECONDS."""

    def __init__(self, log: Log, root: str, total: int) -> None:
        self.log, self.root, self.total, self.done = log, root, total, 0
        self.last = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS and self.done < self.total:
            self.log(f"{self.root}: {self.done}/{self.total} images decoded")
            self.last = now


def _decode(files: list[str], channels: int, size: tuple[int, int], resize: bool,
            progress: _Progress) -> np.ndarray:
    """Second pass: the images of ``files`` as one uint8 (N, C, H, W) array, filled in place."""
    from PIL import Image

    w, h = size
    x = np.empty((len(files), channels, h, w), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"  # convert replicates a grey image into R, G and B
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert(mode)  # decodes: a truncated file fails here
                if resize and im.size != size:
                    im = im.resize(size, Image.Resampling.BILINEAR)
                pixels = np.asarray(im)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a damaged file
            raise DatasetFileError(f"{f}: cannot decode this image ({_why(e)})") from None
        x[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
        progress.step()
    return x
