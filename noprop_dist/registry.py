"""The registries: which code a config's names stand for. Each name is registered once, here, and the code
behind it is imported only when it is used, so ``import noprop_dist`` and config validation stay light.

- :data:`BLOCKS`: ``model.block``, the network of one shard (docs/your_data_and_blocks.md). Besides a
  registered name, ``model.block`` takes an import path ``package.module:factory``.
- :data:`DATASETS`: ``data.name``, the loaders that turn files into arrays (noprop_dist.data).

A target is ``"module:attribute"``; :func:`import_target` imports it, the way ``python -m`` would find the
module (the working directory first, then installed packages), and says in one line why when it cannot.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

# module:attribute, where module is a dotted Python module path and attribute a (possibly dotted) name in it.
IMPORT_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


class ImportTargetError(ImportError):
    """An import path that does not resolve; the message is one line naming the module (or attribute) and why."""


@dataclass(frozen=True)
class Entry:
    """One registered name: the code it stands for and what it is, in a line (shown by errors and docs)."""

    target: str  # "module:attribute"
    about: str


class Registry:
    """Names of one config key mapped to code, e.g. ``model.block`` -> ``fig6`` -> a factory."""

    def __init__(self, key: str, entries: dict[str, Entry], import_paths: bool = False) -> None:
        self.key, self.entries, self.import_paths = key, dict(entries), import_paths

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def allowed(self) -> str:
        """What the key takes, for an error message."""
        names = ", ".join(self.entries)
        return f"{names}, or an import path package.module:factory" if self.import_paths else names

    def is_valid(self, value: str) -> bool:
        """Whether ``value`` is a registered name (or, where allowed, has the form of an import path)."""
        return value in self.entries or (self.import_paths and IMPORT_PATH.fullmatch(value) is not None)

    def resolve(self, value: str) -> Any:
        """The object a name or import path stands for (ImportTargetError naming it when it cannot be imported)."""
        entry = self.entries.get(value)
        if entry is None and not (self.import_paths and IMPORT_PATH.fullmatch(value)):
            raise ImportTargetError(f"{self.key}: {value!r} is not allowed; allowed: {self.allowed()}")
        return import_target(entry.target if entry else value)


def import_target(path: str) -> Any:
    """The attribute ``module:attribute`` names, imported as ``python -m`` would find the module: the working
    directory comes first on sys.path (a console script such as ``noprop-run`` does not put it there)."""
    module_name, _, attr = path.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportTargetError(f"cannot import module {module_name!r} ({type(e).__name__}: {e}); it must be "
                                "importable from the working directory or an installed package") from None
    except Exception as e:  # noqa: BLE001 - the module's own code raised while it was imported
        raise ImportTargetError(f"importing module {module_name!r} raised {type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportTargetError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def target_of(obj: Any) -> str:
    """The import path ``module:qualname`` of a function or class, as a config or a chain file records it."""
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"


BLOCKS = Registry("model.block", {
    "fig6": Entry("noprop_dist.core.fig6:fig6", "the paper's Fig. 6 CNN (NOPROP.md, 'Block architecture')"),
    "resnet": Entry("noprop_dist.core.resnet:resnet",
                    "Fig. 6 with a small residual image path: a conv stem and two residual stages with BatchNorm"),
}, import_paths=True)

DATASETS = Registry("data.name", {
    "digits": Entry("noprop_dist.data.builtin:load_digits", "scikit-learn's 8x8 digits, bundled (1,797 images)"),
    "mnist": Entry("noprop_dist.data.builtin:load_mnist", "MNIST, IDX files"),
    "fashion_mnist": Entry("noprop_dist.data.builtin:load_fashion_mnist",
                           "Fashion-MNIST, IDX files (Debian: dataset-fashion-mnist)"),
    "cifar10": Entry("noprop_dist.data.builtin:load_cifar10", "CIFAR-10, python batches"),
    "cifar100": Entry("noprop_dist.data.builtin:load_cifar100", "CIFAR-100, python batches"),
    "bloodmnist": Entry("noprop_dist.data.builtin:load_bloodmnist", "BloodMNIST 28x28, MedMNIST .npz"),
    "bloodmnist_64": Entry("noprop_dist.data.builtin:load_bloodmnist_64", "BloodMNIST 64x64, MedMNIST+ .npz"),
    "bloodmnist_128": Entry("noprop_dist.data.builtin:load_bloodmnist_128", "BloodMNIST 128x128, MedMNIST+ .npz"),
    "npz": Entry("noprop_dist.data.files:load_npz", "your own .npz file (data.path), MedMNIST's key layout"),
    "image_folder": Entry("noprop_dist.data.files:load_image_folder",
                          "your own PNG / JPEG files in DIR/train/<class>/ and DIR/test/<class>/ (data.path)"),
    "arrays": Entry("noprop_dist.data.dataset:arrays_from_api",
                    "arrays given to the Python API: noprop_dist.train(..., dataset=ImageDataset.from_arrays(...))"),
})
