"""Image datasets as plain numpy arrays: the built-in ones (digits, (Fashion-)MNIST, CIFAR-10/100, BloodMNIST),
users' own (an ``.npz`` file, a folder of images, arrays given to the Python API), and the steps after loading
(limits, validation split, normalisation statistics).

- :mod:`.dataset`: :class:`ImageDataset` (uint8 (N, C, H, W) images, int64 (N,) labels), its checks
  (:meth:`ImageDataset.from_arrays`), :func:`channel_stats`, :func:`load_dataset` and :func:`dataset_for`.
- :mod:`.builtin`: the built-in datasets' loaders and file formats (IDX, CIFAR batches, MedMNIST).
- :mod:`.files`: ``data.name: npz`` and ``data.name: image_folder``.

Which loader a ``data.name`` stands for is written once, in :data:`noprop_dist.registry.DATASETS`.
"""
from .builtin import (
    DATASET_NAMES,
    DEFAULT_ROOT,
    FASHION_MNIST_DEBIAN_DIR,
    IDX_FILES,
    MEDMNIST_DEFAULT_DIR,
    read_cifar_batch,
    read_idx,
)
from .dataset import (
    TRAIN_ACCURACY_LIMIT,
    DatasetFileError,
    DatasetNotFoundError,
    ImageDataset,
    apply_limits,
    arrays_from_api,
    channel_stats,
    dataset_for,
    load_dataset,
    normalize,
    split_validation,
)
from .files import IMAGE_EXTENSIONS, load_image_folder, load_npz

__all__ = [
    "DATASET_NAMES", "DEFAULT_ROOT", "FASHION_MNIST_DEBIAN_DIR", "IDX_FILES", "IMAGE_EXTENSIONS",
    "MEDMNIST_DEFAULT_DIR", "TRAIN_ACCURACY_LIMIT", "DatasetFileError", "DatasetNotFoundError", "ImageDataset",
    "apply_limits", "arrays_from_api", "channel_stats", "dataset_for", "load_dataset", "load_image_folder",
    "load_npz", "normalize", "read_cifar_batch", "read_idx", "split_validation",
]
