"""Typed, validated run configuration: dataclasses, YAML loading and ``--set a.b=v`` overrides.

Each section (DataConfig, ModelConfig, ...) checks its own keys in its ``validate``; :meth:`Config.validate` runs
them and holds the rules that join two sections. Every error a user can make in a config ends as one
:class:`ConfigError` whose message names the key and what is allowed; the entry points turn it into a one-line
message and exit code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import time
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from .paper.numbers import PAPER_SETTINGS, paper_epochs
from .registry import BLOCKS, DATASETS, METHODS

# Keys with a fixed set of values have a Literal type; the tuple of its values (what validation allows and
# error messages list) comes from that type, so each set is written once.
Embedding = Literal["one_hot", "learned", "prototype"]
ClassProb = Literal["softmax", "radial"]
SyncMode = Literal["sync", "async"]
LrSchedule = Literal["constant", "cosine"]
Precision = Literal["fp32", "bf16", "auto"]
NonfinitePolicy = Literal["rollback", "stop"]
Device = Literal["auto", "cpu", "cuda"]
Sampler = Literal["eq3", "mean", "ensemble", "stage_average", "ode"]
ShardPartition = Literal["uniform", "log_snr", "equal_mass"]
CtLossWeight = Literal["snr_prime", "sigmoid", "flat"]
CtReadout = Literal["head", "nearest"]
FmTarget = Literal["velocity", "endpoint"]
# train.sync_every: a count of mini-batches, or "auto" (derived from the worker's device and step time where it
# trains: training.hardware.auto_sync_every).
SyncEvery = int | Literal["auto"]

DATASET_NAMES: tuple[str, ...] = DATASETS.names()  # data.name (noprop_dist.registry)
# The datasets read from a file or directory the user names in data.path.
PATH_DATASETS = ("npz", "image_folder")
EMBEDDINGS: tuple[str, ...] = get_args(Embedding)
CLASS_PROBS: tuple[str, ...] = get_args(ClassProb)
SYNC_MODES: tuple[str, ...] = get_args(SyncMode)
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
PRECISIONS: tuple[str, ...] = get_args(Precision)
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonfinitePolicy)
DEVICES: tuple[str, ...] = get_args(Device)
# Inference samplers of the NoProp chains (docs/method.md, "Inference samplers"); the methods each applies to:
# their registry.METHODS entry's samplers.
# eq3: Eq. 3 with its noise term, as the paper runs it; mean: the same update without the noise term (the
# posterior mean); ensemble: class probabilities averaged over eval.ensemble_draws noisy (eq3) runs;
# stage_average (DT): one mean run, the head's class probabilities averaged over z_1 .. z_T; ode:
# NoProp-CT's probability-flow ODE. NoProp-FM's flow has no noise term: mean is its Euler solve, ensemble
# averages it over draws of z_0.
SAMPLERS: tuple[str, ...] = get_args(Sampler)
# NoProp-CT / FM: how [0, 1] is split among the K time-shards (core.partition) and NoProp-CT's denoising
# weight (core.losses.ct_loss_weight; snr_prime is the paper's).
SHARD_PARTITIONS: tuple[str, ...] = get_args(ShardPartition)
CT_LOSS_WEIGHTS: tuple[str, ...] = get_args(CtLossWeight)
CT_READOUTS: tuple[str, ...] = get_args(CtReadout)  # NoProp-CT's readout at z_1 (core.chain.CTChain.readout)
FM_TARGETS: tuple[str, ...] = get_args(FmTarget)  # what a NoProp-FM network predicts (core.paths.fm_field)
ABAR_MAX_LIMIT = 0.9999  # model.abar_max's ceiling (see ModelConfig.validate)
# Keys that were renamed: old (section, key) -> (section, key, value map). Old configs and run snapshots load.
_RENAMED = {("model", "ct_inference"): ("eval", "sampler", {"chain": "eq3"})}


class ConfigError(ValueError):
    """A bad config key or value; the message is one line that names the key."""


# Values and names are quoted cut short: a 300-byte YAML file can alias one list into megabytes of repr.
_QUOTE = reprlib.Repr()
_QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 60, 60, 40
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 4
_QUOTE.maxlevel = 2


def shown(value: Any) -> str:
    """``value`` as an error message quotes it: its repr, cut short (at most ~100 characters)."""
    return _QUOTE.repr(value)


def _named(name: Any) -> str:
    """A section or key name from a file, as a message names it: as it is when it is a short string."""
    return name if isinstance(name, str) and len(name) <= 60 and name.isprintable() else shown(name)


def _unknown(what: str, given: str, allowed: list[str]) -> ConfigError:
    """'<given>: unknown <what>', with the nearest names and the allowed ones (or where to find them)."""
    close = difflib.get_close_matches(given.rpartition(".")[2], allowed, n=2)
    listing = ", ".join(allowed)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    rest = f"allowed: {listing}" if len(listing) <= 160 else "python -m noprop_dist.run --help lists every key"
    return ConfigError(f"{given}: unknown {what}; {hint}{rest}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a mapping that repeats a key is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: the base loader says what is wrong with it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {shown(key)}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(stream: Any) -> Any:
    """``yaml.safe_load`` that refuses a repeated key (``train: {epochs: 3, epochs: 5}`` is a mistake, not 5)."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


# ----------------------------------------------------------------------------- checks and bounds

def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {shown(value)} is not allowed; allowed: {', '.join(allowed)}")


def _bad_sync_every(key: str, value: Any) -> ConfigError:
    """The one error for a train.sync_every that is neither "auto" nor a count of at least 1."""
    return ConfigError(f"{key}: must be a positive integer or auto, got {shown(value)}")


def _positive(key: str, value: float, strict: bool = True) -> None:
    if (value <= 0) if strict else (value < 0):
        raise ConfigError(f"{key}: must be {'> 0' if strict else '>= 0'}, got {shown(value)}")


def _in_range(key: str, value: float, low: float, high: float) -> None:
    """ConfigError naming ``key`` and the closed range [low, high] unless ``value`` lies in it."""
    if not low <= value <= high:
        raise ConfigError(f"{key}: must be in [{low}, {high}], got {shown(value)}")


# Upper bounds: values above them pass the type and sign checks but fail only later, after Ray has started
# (or at the final evaluation, losing the run), in torch or Ray: refused up front instead.
# T / K: every shard is a whole network with its own AdamW state, and the driver assembles all of them
# into one chain in its memory; the paper uses 10, and past a thousand no single machine holds the chain.
MAX_SHARDS = 1_000
# d of the learned embedding: the head and every block output d-vectors for each class; above the largest
# prototype d this project meets (3 x 128 x 128 = 49 152, BloodMNIST 128) nothing gains from it.
MAX_EMBEDDING_DIM = 65_536
# CT / FM: the inference grid holds steps + 1 times and each step is a pass over every test batch; the
# paper uses 1000, a hundred times that is past any accuracy gain and an evaluation of days.
MAX_INFERENCE_STEPS = 100_000
# A batch is capped at the split it comes from (the largest supported split, MNIST's, is 60 000 images), so
# a bigger value changes nothing but nears the int64 overflow of torch's slicing.
MAX_BATCH_SIZE = 1 << 20
# Ray keeps resource amounts to four decimals and refuses a request below that; amounts are multiples of it.
RAY_RESOURCE_QUANTUM = 1e-4
# Waits measured in seconds become Ray and time.monotonic() arithmetic; a week is past any placement or hang
# worth waiting for, and 1e308 overflows them after Ray has started.
MAX_TIMEOUT_S = 7 * 24 * 3600.0
# The ensemble sampler runs the whole chain once per draw: past a thousand draws its average no longer moves.
MAX_ENSEMBLE_DRAWS = 1_000
# A chain file's spec is built before its weights are checked: these bound what one may ask for (besides the
# shards, the embedding and the steps above). Images have 1 or 3 channels in every loader; m classes of a head.
MAX_CHANNELS = 3
MAX_CLASSES = 1_000_000
# image_folder's resize: every image becomes S x S x C bytes in memory and in Ray's object store.
MAX_IMAGE_SIZE = 4_096
# Early stopping counts epochs; no run has more (train.epochs is not capped, but a patience longer than this is
# not one).
MAX_EPOCHS = 1_000_000
# One Ray actor (a process) per worker, and the NoProp methods need at least one shard per worker.
MAX_WORKERS = MAX_SHARDS
# A worker's CPUs become its torch threads (set_num_threads takes a C int) and its bundle lies on one node:
# past a thousand cores per process there is no node to place it on.
MAX_CPUS_PER_WORKER = 1_024
# Ray keeps the count as a C integer; a fault recurring more than a thousand times is not one to absorb.
MAX_RESTARTS = 1_000
# train.seed is multiplied by up to 2_000_003 and offset by the epoch and block (or rank) before it seeds
# torch (core.seeds), whose manual_seed takes at most 2**64 - 1; seeds up to 2**32 - 1 keep every derived seed in range
# (numpy's legacy seeding takes the same range, should it ever be seeded with it).
MAX_TRAIN_SEED = 2**32 - 1
# eval.seed seeds a torch.Generator as it is: manual_seed accepts [-2**63, 2**64 - 1].
EVAL_SEED_RANGE = (-(2**63), 2**64 - 1)


# ----------------------------------------------------------------------------- sections
# Each section checks its own keys (validate); Config.validate adds the rules across sections.

@dataclass
class DataConfig:
    # A registered dataset (noprop_dist.registry.DATASETS): the bundled and downloadable ones, npz (your .npz
    # file) or image_folder (your image files), both at data.path; arrays: given to the Python API.
    name: str = "digits"
    root: str | None = None  # None: the loader's defaults (see noprop_dist.data)
    download: bool = False  # fetch through torchvision when files are missing and a network is there
    train_limit: int | None = None  # keep only this many training examples (smoke runs, CI)
    test_limit: int | None = None
    path: str | None = None  # npz: the .npz file; image_folder: the directory holding train/ and test/
    image_size: int | None = None  # image_folder: resize every image to this many pixels square (None: as stored)
    # A share of the training set held out, stratified and fixed by train.seed, to validate on: the per-epoch
    # curve then reads it and the test set is scored once, at the end. 0: the dataset's own validation split
    # (an npz's val_images, image_folder's val/, MedMNIST's val) if it has one, else none.
    val_fraction: float = 0.0

    def validate(self) -> None:
        """data.*: a registered dataset, the keys it uses and no key it would ignore."""
        _choice("data.name", self.name, DATASET_NAMES)
        for key, v in (("data.train_limit", self.train_limit), ("data.test_limit", self.test_limit)):
            if v is not None:
                _positive(key, v)
        if self.name in PATH_DATASETS and not self.path:
            what = "the .npz file" if self.name == "npz" else "the directory holding train/<class>/ and test/<class>/"
            raise ConfigError(f"data.path: data.name={self.name} reads {what}; set data.path")
        if self.path is not None and self.name not in PATH_DATASETS:
            raise ConfigError(f"data.path: applies to data.name {' or '.join(PATH_DATASETS)}, not {self.name} "
                              "(its files are found under data.root)")
        if self.path is not None and "\0" in self.path:
            raise ConfigError("data.path: holds a NUL byte")
        if self.image_size is not None:
            if self.name != "image_folder":
                raise ConfigError(f"data.image_size: applies to data.name=image_folder, not {self.name}")
            _in_range("data.image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction!r}")


@dataclass
class ModelConfig:
    # noprop_dt | noprop_ct | noprop_fm (layer-parallel on Ray), or a baseline: backprop | adjoint | dtp
    # (noprop_dist.registry.METHODS)
    method: str = "noprop_dt"
    # The network of each shard: a registered block (noprop_dist.registry.BLOCKS: fig6, the paper's; resnet) or
    # the import path package.module:factory of your own (docs/your_data_and_blocks.md).
    block: str = "fig6"
    num_blocks: int = 10  # T, NoProp-DT (and the backprop baseline's chain)
    num_shards: int = 1  # K, NoProp-CT / FM: [0, 1] split into K time intervals, one network each
    shard_partition: ShardPartition = "uniform"  # uniform | log_snr | equal_mass: where the K intervals' boundaries lie
    shard_overlap: float = 0.0  # each shard also trains this fraction of its span into each neighbour's
    ct_loss_weight: CtLossWeight = "flat"  # NoProp-CT's denoising weight: flat | sigmoid | snr_prime (the paper's)
    # CT / FM networks: the DT block's BatchNorm after the image path's FC256 (the paper's CT / FM have none)
    image_batch_norm: bool = False
    # NoProp-CT's prediction from z_1: nearest (the nearest class embedding, as NoProp-FM's) | head (Eq. 14)
    ct_readout: CtReadout = "nearest"
    # NoProp-FM's network predicts: velocity (the paper's: v = logits @ W_embed, regressed on z_1 - z_0) |
    # endpoint (z1_hat = softmax(logits) @ W_embed, regressed on z_1; v = (z1_hat - z_t) / (1 - t))
    fm_target: FmTarget = "endpoint"
    inference_steps: int = 1000  # CT / FM: steps of the inference chain or ODE solver (paper: 1000)
    embedding: Embedding = "learned"  # one_hot | learned | prototype
    embedding_dim: int = 20  # used by `learned` only; one_hot has d = m, prototype d = C*H*W
    class_prob: ClassProb = "softmax"  # softmax (Eq. 14) | radial (Eq. 15-16)
    radial_sigma: float = 0.1  # radial width; 1.0 left the head untrained (docs/method.md, "NoProp-DT")
    eta: float = 0.1
    abar_max: float = 0.999  # cap of the cosine schedule at t = T (keeps the last SNR finite)
    dropout: float = 0.2

    def validate(self) -> None:
        """model.*: ranges and choices; model.block against the baselines that train only the paper's network."""
        _choice("model.method", self.method, tuple(METHODS))
        if not BLOCKS.is_valid(self.block):
            raise ConfigError(f"model.block: {shown(self.block)} is not allowed; allowed: {BLOCKS.allowed()}")
        if not METHODS[self.method].takes_block and self.block != "fig6":
            *others, last = (name for name, method in METHODS.items() if method.takes_block)
            raise ConfigError(f"model.block: model.method={self.method} trains the paper's own network; model.block="
                              f"{self.block} applies to {', '.join(others)} and {last}")
        _in_range("model.num_blocks", self.num_blocks, 1, MAX_SHARDS)
        _in_range("model.num_shards", self.num_shards, 1, MAX_SHARDS)
        _in_range("model.inference_steps", self.inference_steps, 1, MAX_INFERENCE_STEPS)
        _choice("model.shard_partition", self.shard_partition, SHARD_PARTITIONS)
        if not 0.0 <= self.shard_overlap < 0.5:
            raise ConfigError(f"model.shard_overlap: must be in [0, 0.5) (a fraction of a shard's span), "
                              f"got {self.shard_overlap!r}")
        _choice("model.ct_loss_weight", self.ct_loss_weight, CT_LOSS_WEIGHTS)
        _choice("model.ct_readout", self.ct_readout, CT_READOUTS)
        _choice("model.fm_target", self.fm_target, FM_TARGETS)
        _choice("model.embedding", self.embedding, EMBEDDINGS)
        _in_range("model.embedding_dim", self.embedding_dim, 1, MAX_EMBEDDING_DIM)
        _choice("model.class_prob", self.class_prob, CLASS_PROBS)
        _positive("model.radial_sigma", self.radial_sigma)
        _positive("model.eta", self.eta)
        # The last block's loss weight is SNR(T) - SNR(T-1), about abar_max / (1 - abar_max): beyond 1e4
        # (abar_max 0.9999) that one block's denoising term swamps every other gradient W_embed receives.
        if not 0.5 < self.abar_max <= ABAR_MAX_LIMIT:
            raise ConfigError(f"model.abar_max: must be in (0.5, {ABAR_MAX_LIMIT}], got {self.abar_max} (the last "
                              f"block's loss weight grows as abar_max / (1 - abar_max))")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    # The training budget in passes over the training set. A fraction is allowed: 0.5 trains half an epoch,
    # 2.5 two epochs and half of a third (the last epoch is cut short, and a cosine rate reaches 0 there);
    # time-to-accuracy runs pick their budget so. A whole number stays an int.
    epochs: int | float = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-3
    # constant | cosine: linear warm-up over warmup_epochs, then cosine decay to 0 at train.epochs (every
    # block's and the shared state's learning rate; training.lr_schedule_factor)
    lr_schedule: LrSchedule = "constant"
    warmup_epochs: float = 0.0
    seed: int = 0
    # Shared state (docs/parameter_server.md): every sync_every mini-batches a worker pushes the sum of its
    # shards' updates and takes fresh state it asked for one exchange earlier. sync: that state holds every
    # worker's updates up to that exchange (runs repeat exactly); async: whatever the server had (never waits).
    sync_mode: SyncMode = "sync"
    # auto: 1 on a CPU; on a GPU the run measures its block step time over the first few steps and exchanges
    # about every 50 ms (training.hardware.auto_sync_every), one value for every worker of the run, reported in
    # summary.json's workers. An integer fixes it (and makes a GPU run repeatable whatever its timing).
    sync_every: SyncEvery = "auto"
    # fp32 | bf16 (autocast of the shards' forward and backward; weights stay fp32) | auto: bf16 where the
    # worker's device computes it natively, else fp32 (training.resolve_precision)
    precision: Precision = "fp32"
    log_every_seconds: float = 5.0  # progress lines when the output is not a terminal
    # A block whose loss or gradients become NaN/inf applies nothing, rolls back to its state at the
    # start of the epoch and trains on at `nonfinite_lr_factor` ** (its rollbacks) times its rate
    # (rollback), or stops (stop); after `max_nonfinite` rollbacks it stops too. The other blocks go on either way.
    # With a validation split (data.val_fraction, or the dataset's own): end the run once the validation accuracy
    # has not risen for this many epochs (0: never). chain.pt is the best validation epoch's chain either way.
    early_stop_patience: int = 0
    on_nonfinite: NonfinitePolicy = "rollback"
    nonfinite_lr_factor: float = 0.5
    max_nonfinite: int = 3

    @property
    def passes(self) -> int:
        """Epochs begun: train.epochs rounded up. Epochs are numbered 0 .. passes - 1 and checkpointed whole;
        the last one is partial when train.epochs is not a whole number (:meth:`batches_in`)."""
        return math.ceil(self.epochs)

    def batches_in(self, epoch: int, full: int) -> int:
        """How many of the ``full`` mini-batches of epoch ``epoch`` (0-based) the budget trains: all of them,
        except in a partial last epoch its share, at least one (train.epochs = 2.5: half of epoch 2's)."""
        share = self.epochs - epoch
        return full if share >= 1 else max(1, min(full, round(share * full)))

    def validate(self) -> None:
        """train.*: ranges and choices; the warm-up within the budget."""
        _positive("train.epochs", self.epochs)
        _in_range("train.batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _positive("train.lr", self.lr)
        _positive("train.weight_decay", self.weight_decay, strict=False)
        _choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"train.warmup_epochs: must be in [0, train.epochs = {self.epochs}), "
                              f"got {self.warmup_epochs!r}")
        _in_range("train.seed", self.seed, 0, MAX_TRAIN_SEED)
        _choice("train.sync_mode", self.sync_mode, SYNC_MODES)
        if self.sync_every != "auto" and (isinstance(self.sync_every, bool) or not isinstance(self.sync_every, int)
                                          or self.sync_every < 1):
            raise _bad_sync_every("train.sync_every", self.sync_every)
        _choice("train.precision", self.precision, PRECISIONS)
        _positive("train.log_every_seconds", self.log_every_seconds)
        _in_range("train.early_stop_patience", self.early_stop_patience, 0, MAX_EPOCHS)
        _choice("train.on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        if not 0.0 < self.nonfinite_lr_factor < 1.0:
            raise ConfigError(f"train.nonfinite_lr_factor: must be in (0, 1), got {self.nonfinite_lr_factor}")
        _positive("train.max_nonfinite", self.max_nonfinite, strict=False)


@dataclass
class ClusterConfig:
    num_workers: int = 2
    gpus_per_worker: float = 0.0  # fractional allowed: several workers share a GPU
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 0  # torch threads per worker; 0 = max(1, floor(cpus_per_worker))
    device: Device = "auto"  # auto: cuda when the worker was given a GPU, else cpu
    # A worker process that dies is restarted in its placement-group bundle and its shards resume from
    # their last checkpoint; the parameter server comes back from its last checkpoint (Ray restarts it).
    max_restarts_per_worker: int = 3  # restarts of one worker (its shard group) before the run fails
    max_restarts: int = 10  # restarts in the whole run (workers and parameter server) before it fails
    # A worker that makes no step for this long in an epoch (stopped, deadlocked, its node unreachable) is
    # killed and restarted like a dead one, and so is a parameter server that does not answer; both count
    # against the restart limits. 0: automatic, 10x the longest gap between two steps seen so far in the
    # run and at least restart_policy.HANG_FLOOR_S (actor start and the first steps are slow). A process that
    # has not answered yet (starting) gets HANG_FLOOR_S at least whatever this says.
    hang_timeout_s: float = 0.0
    # Seconds the run waits for Ray to place its workers' bundles: at the start, and after a node is lost and
    # Ray looks for room for the bundles it held (an autoscaler may be adding a node). A bundle still without a
    # node then fails the run with one line that says what the cluster has left; its workers are not counted
    # as hung meanwhile.
    placement_timeout_s: float = 120.0
    # false: refuse to start or join a Ray cluster when RAY_AUTH_MODE turns token authentication off
    # (anyone who reaches an unauthenticated cluster's ports can run code on it); true: go on, with a warning.
    allow_unauthenticated: bool = False

    @property
    def wants_gpus(self) -> bool:
        """Whether the workers are meant to train on GPUs (device cuda, or auto with GPUs given to them)."""
        return self.device != "cpu" and self.gpus_per_worker > 0

    def validate(self) -> None:
        """cluster.*: what Ray would refuse only after it started, refused here (see the bounds above)."""
        _in_range("cluster.num_workers", self.num_workers, 1, MAX_WORKERS)
        _positive("cluster.gpus_per_worker", self.gpus_per_worker, strict=False)
        if self.gpus_per_worker > 1 and not float(self.gpus_per_worker).is_integer():
            raise ConfigError(f"cluster.gpus_per_worker: above 1 must be a whole number, got {self.gpus_per_worker}")
        if 0 < self.gpus_per_worker < RAY_RESOURCE_QUANTUM:
            raise ConfigError(f"cluster.gpus_per_worker: 0, or at least {RAY_RESOURCE_QUANTUM} (Ray counts "
                              f"resources in steps of {RAY_RESOURCE_QUANTUM}), got {self.gpus_per_worker}")
        _positive("cluster.cpus_per_worker", self.cpus_per_worker)
        _in_range("cluster.cpus_per_worker", self.cpus_per_worker, RAY_RESOURCE_QUANTUM, MAX_CPUS_PER_WORKER)
        _in_range("cluster.threads_per_worker", self.threads_per_worker, 0, MAX_CPUS_PER_WORKER)
        _choice("cluster.device", self.device, DEVICES)
        _in_range("cluster.max_restarts_per_worker", self.max_restarts_per_worker, 0, MAX_RESTARTS)
        _in_range("cluster.max_restarts", self.max_restarts, 0, MAX_RESTARTS)
        _in_range("cluster.hang_timeout_s", self.hang_timeout_s, 0, MAX_TIMEOUT_S)
        _positive("cluster.placement_timeout_s", self.placement_timeout_s)
        _in_range("cluster.placement_timeout_s", self.placement_timeout_s, 0, MAX_TIMEOUT_S)
        if self.device == "cuda" and self.gpus_per_worker == 0:
            raise ConfigError("cluster.device: 'cuda' needs cluster.gpus_per_worker > 0")


@dataclass
class RunConfig:
    # Where config, checkpoints, chain and summary go. None: a new directory for every run,
    # runs/<config name>/<date>-<time> (new_run_dir); the same directory again resumes that run.
    dir: str | None = None
    checkpoint_every: int = 1  # epochs between checkpoints
    overwrite: bool = False  # true: a run.dir written by another config is cleared and started afresh

    def validate(self) -> None:
        """run.*: a usable directory (load_config has replaced null by a new one)."""
        if not self.dir:
            raise ConfigError("run.dir: must be a non-empty path (or null: a new directory under runs/)")
        if "\0" in self.dir:
            raise ConfigError("run.dir: holds a NUL byte")
        _positive("run.checkpoint_every", self.checkpoint_every)


@dataclass
class EvalConfig:
    batch_size: int = 1000
    seed: int = 1234  # seeds z_0 and the chain's noise so a saved chain re-evaluates identically
    every_epochs: int = 1  # test accuracy of the chain as it stands every this many epochs (0: at the end only)
    # eq3 | mean | ensemble | stage_average (DT) | ode (CT): see SAMPLERS. mean keeps what the blocks learned:
    # Eq. 3's noise term pulls z away from the blocks' estimate at every step (benchmarks/README.md, "Inference
    # samplers"); fashion_mnist.yaml sets stage_average, which keeps what the middle blocks add.
    sampler: Sampler = "mean"
    ensemble_draws: int = 8  # noisy runs averaged by the ensemble sampler
    # The end of a run also scores the paper's sampler (registry.Method.paper_sampler) when the run's differs: a pass of
    # its own over the test set (test_accuracy_by_sampler). Off, the end of a run is one pass over the test set.
    paper_sampler: bool = False
    # The end of a run also scores the training subset (data.TRAIN_ACCURACY_LIMIT evenly spaced training images:
    # summary.json's train_accuracy, Table 1's train column), another pass as long as the test set's.
    train_accuracy: bool = False

    def validate(self) -> None:
        """eval.*: ranges and a known sampler (which methods it applies to: Config.validate)."""
        _in_range("eval.batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _in_range("eval.seed", self.seed, *EVAL_SEED_RANGE)
        _positive("eval.every_epochs", self.every_epochs, strict=False)
        _choice("eval.sampler", self.sampler, tuple(SAMPLERS))
        _in_range("eval.ensemble_draws", self.ensemble_draws, 1, MAX_ENSEMBLE_DRAWS)


@dataclass
class MetricsConfig:
    enabled: bool = True  # workers and the parameter server export Prometheus metrics through Ray
    run_id: str | None = None  # the `run` label; None: <run.dir name>-<hash of the run's config>
    write_every_seconds: float = 5.0  # <run.dir>/metrics.jsonl gets a line per block this often (and per epoch)
    tensorboard: bool = False  # the same lines as TensorBoard event files in <run.dir>/tensorboard/ (extra: tensorboard)

    def validate(self) -> None:
        """metrics.*: a run label Prometheus and Grafana take as it is; TensorBoard only where it is installed."""
        # It becomes a Prometheus label value and a Grafana variable: keep it to characters that need no quoting.
        if self.run_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]*", self.run_id):
            raise ConfigError(f"metrics.run_id: {shown(self.run_id)} is not allowed; allowed: letters, digits and "
                              "_ . : - (starting with a letter or digit)")
        _positive("metrics.write_every_seconds", self.write_every_seconds)
        if self.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError("metrics.tensorboard: needs the tensorboard package: "
                                  "pip install 'noprop_dist[tensorboard]'")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Each section's own checks (in the order of the sections), then the rules that join two sections: each
        message names both keys. ConfigError on the first problem."""
        for section in fields(self):
            getattr(self, section.name).validate()
        m = self.model
        if self.train.early_stop_patience and self.eval.every_epochs == 0:
            raise ConfigError("train.early_stop_patience: needs a validation accuracy every epoch or few; "
                              "eval.every_epochs=0 measures none until the end")
        shard_key = shards_key(m)
        shards = None if shard_key is None else getattr(m, shard_key.split(".")[1])
        if shards is not None and self.cluster.num_workers > shards:
            raise ConfigError(f"cluster.num_workers: must be in [1, {shard_key} = {shards}] "
                              f"for model.method={m.method}, got {self.cluster.num_workers}")
        method = METHODS[m.method]
        if method.noprop and self.eval.sampler not in method.samplers:
            raise ConfigError(f"eval.sampler: {self.eval.sampler!r} does not apply to model.method={m.method}; "
                              f"allowed: {', '.join(method.samplers)}")
        if self.metrics.tensorboard and not method.noprop:
            raise ConfigError(f"metrics.tensorboard: the per-shard metrics are NoProp's; model.method={m.method} "
                              "writes its curve to summary.json only")


# ----------------------------------------------------------------------------- parsing

def _section_types(section_cls: type) -> dict[str, Any]:
    return get_type_hints(section_cls)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML / command-line value to the declared type, or raise ConfigError naming `key`."""
    if typ == SyncEvery:  # "auto" or a count; TrainConfig.validate checks that it is positive
        if value == "auto":
            return value
        try:
            return _coerce(key, value, int)
        except ConfigError:
            raise _bad_sync_every(key, value) from None
    if get_origin(typ) is Literal:  # a fixed set of strings: its section's validate checks the value
        typ = str
    if typ == int | float:  # a count that may be fractional (train.epochs): a whole number stays an int
        number = _coerce(key, value, float)
        return int(number) if number.is_integer() else number
    optional = typ in (int | None, str | None, float | None)
    base = {int | None: int, str | None: str, float | None: float}.get(typ, typ)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
        if optional:
            return None
        raise ConfigError(f"{key}: must be a {base.__name__}, got null")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: must be true or false, got {shown(value)}")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: must be an integer, got {shown(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: must be an integer, got {shown(value)}")
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: must be a number, got {shown(value)}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: must be a number, got {shown(value)}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{key}: must be a finite number, got {shown(value)}")
        return out
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: must be a string, got {shown(value)}")
        return str(value)
    raise AssertionError(f"unhandled type {typ} for {key}")


def _apply(cfg: Config, section: str, name: str, value: Any) -> None:
    if (section, name) in _RENAMED:
        section, name, values = _RENAMED[section, name]
        value = values.get(value, value)
    sections = {f.name: f for f in fields(Config)}
    if section not in sections:
        raise _unknown("section", _named(section), list(sections))
    sec_obj = getattr(cfg, section)
    types = _section_types(type(sec_obj))
    if name not in types:
        raise _unknown("key", f"{section}.{_named(name)}", list(types))
    setattr(sec_obj, name, _coerce(f"{section}.{name}", value, types[name]))


def _apply_mapping(cfg: Config, mapping: Any, origin: str) -> None:
    if mapping is None:
        return
    if not isinstance(mapping, dict):
        raise ConfigError(f"{origin}: top level must be a mapping of sections, got {type(mapping).__name__}")
    for section, body in mapping.items():
        if not isinstance(body, dict):
            if section in {f.name for f in fields(Config)}:
                raise ConfigError(f"{section}: must be a mapping of keys, got {shown(body)}")
            raise _unknown("section", _named(section), [f.name for f in fields(Config)])
        for name, value in body.items():
            _apply(cfg, str(section), str(name), value)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"train.epochs=3"`` -> ("train", "epochs", 3); the value is parsed as YAML (safe_load)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: KEY must be section.name, e.g. train.epochs")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError):  # ValueError: YAML that names an impossible date, e.g. 2020-13-45
        value = raw
    return parts[0], parts[1], value


PRESETS = ("paper",)


def preset_values(name: str, method: str, dataset: str) -> dict[str, Any]:
    """The dotted keys a preset sets for a method and dataset. ``paper``: Table 3 (NOPROP.md, "Paper
    hyperparameters") and Table 1's inference: batch 128, lr 1e-3, weight decay 1e-3, a constant learning
    rate, fp32, T = 10 and eta 0.1 (DT) or eta 1 and 1000 inference steps (CT / FM), the paper's epochs and sampler
    (Eq. 3 with its noise for DT and CT), SNR'(t) as CT's loss weight and its head as CT's readout, uniform
    time-shards without overlap, CT / FM networks without BatchNorm, and the Fig. 6 blocks' dropout 0.2.
    The number of time-shards and workers (how the run is distributed) stay the config's."""
    _choice("--preset", name, PRESETS)
    values: dict[str, Any] = {
        "train.batch_size": 128, "train.lr": 1e-3, "train.weight_decay": 1e-3, "model.dropout": 0.2,
        "train.lr_schedule": "constant", "train.warmup_epochs": 0.0, "train.precision": "fp32",
        # datasets the paper does not use take MNIST's epochs
        "train.epochs": paper_epochs(method, dataset) or paper_epochs(method, "mnist") or 100,
        "model.eta": 0.1,
    }
    paper_sampler = METHODS[method].paper_sampler if method in METHODS else None  # validate() names a bad method
    if paper_sampler is not None:
        values["eval.sampler"] = paper_sampler
    return values | PAPER_SETTINGS.get(method, {})


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # the packaged configs


def config_names() -> list[str]:
    """The names of the packaged configs (``noprop_dist/configs/<name>.yaml``): what ``--config NAME`` takes."""
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def config_file(name_or_path: str | os.PathLike) -> str:
    """The YAML file ``--config`` means: a path to an existing file, else the packaged config of that name
    (``mnist``, ``mnist.yaml`` or ``configs/mnist.yaml``), which works from any directory. ConfigError lists
    the names otherwise."""
    path = os.fspath(name_or_path)
    if os.path.isfile(path):
        return path
    name = path[:-5] if path.endswith(".yaml") else path
    if os.path.dirname(name) == "configs":  # the repository's configs/<name>.yaml, as earlier commands spell it
        name = os.path.basename(name)
    packaged = os.path.join(CONFIG_DIR, name + ".yaml")
    if os.sep not in name and "/" not in name and os.path.isfile(packaged):
        return packaged
    raise ConfigError(f"--config: file not found: {path}; packaged configs: {', '.join(config_names())}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                preset: str | None = None, values: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (if any: a path or a packaged config's name, see :func:`config_file`), then
    the preset's values (:func:`preset_values`), then the ``--set`` overrides, then ``values`` (dotted keys to
    Python values, ``{"train.epochs": 3}``, the Python API's overrides); validated."""
    cfg = Config()
    values = dict(values or {})
    for dotted in values:
        if len(dotted.split(".")) != 2 or not all(dotted.split(".")):
            raise ConfigError(f"{dotted!r}: a key must be section.name, e.g. train.epochs")
    if path is not None:
        path = config_file(path)
        try:
            with open(path, encoding="utf-8") as f:
                mapping = load_yaml(f)
        except UnicodeDecodeError as e:
            raise ConfigError(f"--config {path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                              "expected a YAML mapping of sections") from None
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot be read ({e.strerror or e})") from None
        # ValueError: PyYAML builds a timestamp such as 2020-13-45 with datetime(), which refuses it;
        # RecursionError: nesting deeper than Python's stack.
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise ConfigError(f"--config {path}: not valid YAML ({first})") from None
        _apply_mapping(cfg, mapping, path)
    if preset is not None:
        parsed = [parse_override(text) for text in overrides] + [(*k.split("."), v) for k, v in values.items()]
        # the method and dataset the --set overrides ask for decide the preset's values
        method = next((v for sec, key, v in reversed(parsed) if (sec, key) == ("model", "method")), cfg.model.method)
        dataset = next((v for sec, key, v in reversed(parsed) if (sec, key) == ("data", "name")), cfg.data.name)
        for dotted, value in preset_values(preset, str(method), str(dataset)).items():
            section, name = dotted.split(".")
            _apply(cfg, section, name, value)
    for text in overrides:
        section, name, value = parse_override(text)
        _apply(cfg, section, name, value)
    for dotted, value in values.items():
        section, name = dotted.split(".")
        _apply(cfg, section, name, value)
    if cfg.run.dir is None:
        cfg.run.dir = new_run_dir(os.path.splitext(os.path.basename(path))[0] if path is not None else "quickstart")
    cfg.validate()
    return cfg


def resume_config(run_dir: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                  values: dict[str, Any] | None = None) -> Config:
    """The config that continues the run in ``run_dir``: its own ``config.yaml``, then ``overrides`` / ``values``
    as :func:`load_config` takes them, its run.dir that directory. ConfigError when it holds no run's config."""
    snapshot = os.path.join(os.fspath(run_dir), "config.yaml")
    if not os.path.isfile(snapshot):
        raise ConfigError(f"--resume {os.fspath(run_dir)}: no config.yaml there: not a run directory")
    return load_config(snapshot, overrides, values=dict(values or {}) | {"run.dir": os.fspath(run_dir)})


RUNS_ROOT = "runs"  # where runs without a run.dir go (relative to the working directory; ignored by git)


def new_run_dir(name: str, root: str = RUNS_ROOT) -> str:
    """A run directory no run has used: ``<root>/<name>/<date>-<time>`` (a suffix -2, -3, ... when two runs start
    in the same second), so that every command makes a run of its own; resuming one names it (run.dir=DIR or
    ``--resume DIR``)."""
    stem = os.path.join(root, name, time.strftime("%Y%m%d-%H%M%S", time.localtime()))
    path, n = stem, 1
    while os.path.lexists(path):
        n += 1
        path = f"{stem}-{n}"
    return path


def key_table() -> list[tuple[str, str, str]]:
    """(section.key, default, what it takes) for every config key, from the dataclasses, their types and the
    registries: what ``python -m noprop_dist.run --help`` lists, so it cannot drift from the config."""
    takes = {"data.name": DATASETS.allowed(), "model.block": BLOCKS.allowed(), "model.method": ", ".join(METHODS),
             "eval.sampler": ", ".join(SAMPLERS)}
    rows = []
    for section in fields(Config):
        obj = section.default_factory()
        for name, typ in get_type_hints(type(obj)).items():
            key = f"{section.name}.{name}"
            if key not in takes:
                if get_origin(typ) is Literal:
                    takes[key] = ", ".join(get_args(typ))
                else:
                    takes[key] = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                                  int | float: "a number", int | None: "an integer or null",
                                  SyncEvery: "a positive integer or auto",
                                  float | None: "a number or null", str | None: "a string or null"}[typ]
            default = getattr(obj, name)
            rows.append((key, "null" if default is None else str(default).lower() if isinstance(default, bool)
                         else str(default), takes[key]))
    return rows


def config_from_dict(mapping: dict[str, Any]) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (run snapshots, saved chains)."""
    cfg = Config()
    _apply_mapping(cfg, mapping, "config")
    cfg.validate()
    return cfg


def shards_key(m: ModelConfig) -> str | None:
    """The key that counts a NoProp method's shards (model.num_blocks or model.num_shards), at least one per
    worker; None for baselines (their workers are data-parallel)."""
    method = METHODS[m.method]
    return method.shards_key if method.noprop else None


def worker_threads(c: ClusterConfig) -> int:
    """Torch threads a worker uses: its share of the cores, so that workers on one machine do not
    oversubscribe it (single-thread processes side by side do more work than one process with as many
    threads: a block's small convolutions parallelise poorly across threads)."""
    return c.threads_per_worker or max(1, int(c.cpus_per_worker))
