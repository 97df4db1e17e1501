"""The registries: which code a config's names stand for. Each name is registered once, here, and the code
behind it is imported only when it is used, so ``import noprop_dist`` and config validation stay light.

- :data:`BLOCKS`: ``model.block``, the network of one shard (docs/your_data_and_blocks.md). Besides a
  registered name, ``model.block`` takes an import path ``package.module:factory``.
- :data:`DATASETS`: ``data.name``, the loaders that turn files into arrays (noprop_dist.data).
- :data:`METHODS`: ``model.method``, one :class:`Method` each: what sets the method apart from the others, the
  one place that tells the methods apart (config, storage, core, baselines and the entry points ask it).

A target is ``"module:attribute"``; :func:`import_target` imports it, the way ``python -m`` would find the
module (the working directory first, then installed packages), and says in one line why when it cannot.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from functools import cached_property
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


@dataclass(frozen=True)
class Method:
    """One ``model.method``: what sets it apart from the other methods, as plain data, and the import paths of its
    behaviour, imported when first used (the code lives in core and baselines, layers below this one).

    A NoProp method (:attr:`noprop`) trains its shards layer-parallel (distributed.driver) and saves a chain; a
    baseline trains one model (baselines.runner) and saves its checkpoints only."""

    name: str
    # The packaged configs of the method are <dataset><config_suffix>.yaml (a dataset's own file is NoProp-DT's).
    config_suffix: str
    # The config key that counts its networks (model.num_blocks: T, model.num_shards: K); None: one network.
    shards_key: str | None
    # Its networks are called as forward(z, x, t), and seeded apart from the forward(z, x) ones (core.blocks).
    time_conditioned: bool
    # model.block applies: it trains networks the block factory builds (adjoint and DTP train the paper's own).
    takes_block: bool
    # model.inference_steps applies (CT / FM's samplers, the adjoint's ODE solver); NoProp-DT's chain has T steps.
    takes_steps: bool
    # model.embedding applies; summary.json records embedding "none" without it (DTP has no label embedding).
    label_embedding: bool = True
    # A learnable noise schedule is part of its shared state (NoProp-CT: core.shared, core.schedules).
    learned_schedule: bool = False
    # NoProp: the inference samplers its chain runs (in config.SAMPLERS' order) and the one the paper's Table 1 ran.
    samplers: tuple[str, ...] = ()
    paper_sampler: str | None = None
    # Baselines: whether it trains in bf16 (train.precision) and on several data-parallel workers (DTP: neither).
    bf16: bool = True
    data_parallel: bool = True
    # Its shard count in a line of output (storage.summary.describe_model), n the count and s the plural's "s";
    # None: the method's name alone.
    shards_text: str | None = None
    # Behaviour as "module:attribute", imported by the properties of the same name without "_target". NoProp:
    # its shard loss (net, shared, spec, k, x (B, C, H, W), y (B,), generator) -> (total, denoising part) and its
    # chain class (a core.chain.SavedChain). Baselines: its learner, (cfg, dataset, device, wrap, block) -> a
    # baselines.learner.Learner.
    shard_loss_target: str | None = None
    chain_target: str | None = None
    learner_target: str | None = None

    @property
    def noprop(self) -> bool:
        """Whether it is a NoProp method (shards trained apart on their local losses) rather than a baseline."""
        return self.shard_loss_target is not None

    def num_shards(self, model: Any) -> int | None:
        """Its count of networks in ``model`` (a config.ModelConfig): the value of :attr:`shards_key`, None when
        it has none (one network)."""
        return None if self.shards_key is None else getattr(model, self.shards_key.partition(".")[2])

    def steps(self, inference_steps: int) -> int | None:
        """``inference_steps`` where they apply to the method (:attr:`takes_steps`), else None."""
        return inference_steps if self.takes_steps else None

    def _behaviour(self, target: str | None, what: str) -> Any:
        if target is None:
            raise ValueError(f"model.method={self.name} has no {what}")
        return import_target(target)

    @cached_property
    def shard_loss(self) -> Any:
        """The shard loss of a NoProp method (see :attr:`shard_loss_target`)."""
        return self._behaviour(self.shard_loss_target, "shard loss: it is a baseline")

    @cached_property
    def chain(self) -> Any:
        """The chain class of a NoProp method (core.chain.SavedChain's subclass)."""
        return self._behaviour(self.chain_target, "inference chain: it is a baseline")

    @cached_property
    def learner(self) -> Any:
        """The learner builder of a baseline (see :attr:`learner_target`)."""
        return self._behaviour(self.learner_target, "baseline learner: it is a NoProp method")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("noprop_dt", config_suffix="", shards_key="model.num_blocks", time_conditioned=False, takes_block=True,
           takes_steps=False, samplers=("eq3", "mean", "ensemble", "stage_average"), paper_sampler="eq3",
           shards_text="T={n} blocks", shard_loss_target="noprop_dist.core.losses:dt_shard_loss",
           chain_target="noprop_dist.core.chain:DTChain"),
    Method("noprop_ct", config_suffix="_ct", shards_key="model.num_shards", time_conditioned=True, takes_block=True,
           takes_steps=True, learned_schedule=True, samplers=("eq3", "mean", "ensemble", "ode"), paper_sampler="eq3",
           shards_text="K={n} time-shard{s}", shard_loss_target="noprop_dist.core.losses:ct_shard_loss",
           chain_target="noprop_dist.core.chain:CTChain"),
    # FM's flow has no noise term: mean is its Euler solve, ensemble averages it over draws of z_0.
    Method("noprop_fm", config_suffix="_fm", shards_key="model.num_shards", time_conditioned=True, takes_block=True,
           takes_steps=True, samplers=("mean", "ensemble"), paper_sampler="mean", shards_text="K={n} time-shard{s}",
           shard_loss_target="noprop_dist.core.losses:fm_shard_loss",
           chain_target="noprop_dist.core.chain:FMChain"),
    # The baselines of Table 1: the DT blocks chained and trained end to end (Eq. 17-19); a neural ODE with the CT
    # network as its vector field and adjoint gradients; Difference Target Propagation (Lee et al. 2015).
    Method("backprop", config_suffix="_backprop", shards_key="model.num_blocks", time_conditioned=False,
           takes_block=True, takes_steps=False, shards_text="{n} blocks",
           learner_target="noprop_dist.baselines.learner:backprop_learner"),
    Method("adjoint", config_suffix="_adjoint", shards_key=None, time_conditioned=True, takes_block=False,
           takes_steps=True, learner_target="noprop_dist.baselines.learner:adjoint_learner"),
    Method("dtp", config_suffix="_dtp", shards_key=None, time_conditioned=False, takes_block=False, takes_steps=False,
           label_embedding=False, bf16=False, data_parallel=False,
           learner_target="noprop_dist.baselines.learner:dtp_learner"),
)}


def get_method(name: str) -> Method:
    """The :class:`Method` ``name`` stands for (``model.method``, a chain's ``spec.method``); a ValueError listing
    the methods when there is none."""
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return method
