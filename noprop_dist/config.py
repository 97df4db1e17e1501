"""Typed, validated run configuration: dataclasses, YAML loading and ``--set a.b=v`` overrides.

Every error a user can make in a config ends as one :class:`ConfigError` whose message names the
key and what is allowed; the entry points turn it into a one-line message and exit code 2.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

import yaml

DATASET_NAMES = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "bloodmnist", "bloodmnist_64", "bloodmnist_128")
EMBEDDINGS = ("one_hot", "learned", "prototype")
CLASS_PROBS = ("softmax", "radial")
SYNC_MODES = ("sync", "async")
PRECISIONS = ("fp32", "bf16")
NONFINITE_POLICIES = ("rollback", "stop")
DEVICES = ("auto", "cpu", "cuda")
NOPROP_METHODS = ("noprop_dt", "noprop_ct", "noprop_fm")
BASELINE_METHODS = ("backprop", "adjoint", "dtp")
METHODS = NOPROP_METHODS + BASELINE_METHODS
CT_INFERENCE = ("chain", "ode")


class ConfigError(ValueError):
    """A bad config key or value; the message is one line that names the key."""


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None  # None: the loader's defaults (see noprop_dist.data)
    download: bool = False  # fetch through torchvision when files are missing and a network is there
    train_limit: int | None = None  # keep only this many training examples (smoke runs, CI)
    test_limit: int | None = None


@dataclass
class ModelConfig:
    # noprop_dt | noprop_ct | noprop_fm (layer-parallel on Ray), or a baseline: backprop | adjoint | dtp
    method: str = "noprop_dt"
    num_blocks: int = 10  # T, NoProp-DT (and the backprop baseline's chain)
    num_shards: int = 1  # K, NoProp-CT / FM: [0, 1] split into K time intervals, one network each
    inference_steps: int = 1000  # CT / FM: steps of the inference chain or ODE solver (paper: 1000)
    ct_inference: str = "chain"  # CT: chain (the DT update on the step grid) | ode (probability flow)
    embedding: str = "learned"  # one_hot | learned | prototype
    embedding_dim: int = 20  # used by `learned` only; one_hot has d = m, prototype d = C*H*W
    class_prob: str = "softmax"  # softmax (Eq. 14) | radial (Eq. 15-16)
    radial_sigma: float = 0.1  # radial width; 1.0 left the head untrained (README, "Method")
    eta: float = 0.1
    abar_max: float = 0.999  # cap of the cosine schedule at t = T (keeps the last SNR finite)
    dropout: float = 0.2


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-3
    seed: int = 0
    # Shared state (docs/parameter_server.md): every sync_every mini-batches a worker pushes the sum of its
    # shards' updates and takes fresh state it asked for one exchange earlier. sync: that state holds every
    # worker's updates up to that exchange (runs repeat exactly); async: whatever the server had (never waits).
    sync_mode: str = "sync"
    sync_every: int = 1
    precision: str = "fp32"  # fp32 | bf16 (autocast of the shards' forward and backward; weights stay fp32)
    log_every_seconds: float = 5.0  # progress lines when the output is not a terminal
    # A block whose loss or gradients become NaN/inf applies nothing, rolls back to its state at the
    # start of the epoch and multiplies its learning rate by `nonfinite_lr_factor` (rollback), or stops
    # (stop); after `max_nonfinite` rollbacks it stops too. The other blocks go on either way.
    on_nonfinite: str = "rollback"
    nonfinite_lr_factor: float = 0.5
    max_nonfinite: int = 3


@dataclass
class ClusterConfig:
    num_workers: int = 2
    gpus_per_worker: float = 0.0  # fractional allowed: several workers share a GPU
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 0  # torch threads per worker; 0 = max(1, floor(cpus_per_worker))
    device: str = "auto"  # auto: cuda when the worker was given a GPU, else cpu
    # A worker process that dies is restarted in its placement-group bundle and its shards resume from
    # their last checkpoint; the parameter server comes back from its last checkpoint (Ray restarts it).
    max_restarts_per_worker: int = 3  # restarts of one worker (its shard group) before the run fails
    max_restarts: int = 10  # restarts in the whole run (workers and parameter server) before it fails
    # false: refuse to start or join a Ray cluster when RAY_AUTH_MODE turns token authentication off
    # (anyone who reaches an unauthenticated cluster's ports can run code on it); true: go on, with a warning.
    allow_unauthenticated: bool = False


@dataclass
class RunConfig:
    dir: str = "runs/quickstart"
    checkpoint_every: int = 1  # epochs between checkpoints
    overwrite: bool = False  # true: a run.dir written by another config is cleared and started afresh


@dataclass
class EvalConfig:
    batch_size: int = 1000
    seed: int = 1234  # seeds z_0 and the chain's noise so a saved chain re-evaluates identically
    every_epochs: int = 1  # test accuracy of the chain as it stands every this many epochs (0: at the end only)


@dataclass
class MetricsConfig:
    enabled: bool = True  # workers and the parameter server export Prometheus metrics through Ray
    run_id: str | None = None  # the `run` label; None: <run.dir name>-<hash of the run's config>
    write_every_seconds: float = 5.0  # <run.dir>/metrics.jsonl gets a line per block this often (and per epoch)


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


# ----------------------------------------------------------------------------- parsing

def _section_types(section_cls: type) -> dict[str, Any]:
    return get_type_hints(section_cls)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML / command-line value to the declared type, or raise ConfigError naming `key`."""
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
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: must be an integer, got {value!r}")
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: must be a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return out
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled type {typ} for {key}")


def _apply(cfg: Config, section: str, name: str, value: Any) -> None:
    sections = {f.name: f for f in fields(Config)}
    if section not in sections:
        raise ConfigError(f"{section}: unknown section; allowed: {', '.join(sections)}")
    sec_obj = getattr(cfg, section)
    types = _section_types(type(sec_obj))
    if name not in types:
        raise ConfigError(f"{section}.{name}: unknown key; allowed: {', '.join(types)}")
    setattr(sec_obj, name, _coerce(f"{section}.{name}", value, types[name]))


def _apply_mapping(cfg: Config, mapping: Any, origin: str) -> None:
    if mapping is None:
        return
    if not isinstance(mapping, dict):
        raise ConfigError(f"{origin}: top level must be a mapping of sections, got {type(mapping).__name__}")
    for section, body in mapping.items():
        if not isinstance(body, dict):
            if section in {f.name for f in fields(Config)}:
                raise ConfigError(f"{section}: must be a mapping of keys, got {body!r}")
            raise ConfigError(f"{section}: unknown section; allowed: {', '.join(f.name for f in fields(Config))}")
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
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts[0], parts[1], value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then ``--set`` overrides; validated."""
    cfg = Config()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                mapping = yaml.safe_load(f)
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "parse error"
            raise ConfigError(f"--config {path}: not valid YAML ({first})") from None
        _apply_mapping(cfg, mapping, path)
    for text in overrides:
        section, name, value = parse_override(text)
        _apply(cfg, section, name, value)
    validate(cfg)
    return cfg


def config_from_dict(mapping: dict[str, Any]) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (run snapshots, saved chains)."""
    cfg = Config()
    _apply_mapping(cfg, mapping, "config")
    validate(cfg)
    return cfg


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(allowed)}")


def _positive(key: str, value: float, strict: bool = True) -> None:
    if (value <= 0) if strict else (value < 0):
        raise ConfigError(f"{key}: must be {'> 0' if strict else '>= 0'}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range and choice checks; cross-key checks name both keys."""
    _choice("data.name", cfg.data.name, DATASET_NAMES)
    for key, v in (("data.train_limit", cfg.data.train_limit), ("data.test_limit", cfg.data.test_limit)):
        if v is not None:
            _positive(key, v)
    m = cfg.model
    _choice("model.method", m.method, METHODS)
    if m.num_blocks < 1:
        raise ConfigError(f"model.num_blocks: must be >= 1, got {m.num_blocks}")
    if m.num_shards < 1:
        raise ConfigError(f"model.num_shards: must be >= 1, got {m.num_shards}")
    _positive("model.inference_steps", m.inference_steps)
    _choice("model.ct_inference", m.ct_inference, CT_INFERENCE)
    _choice("model.embedding", m.embedding, EMBEDDINGS)
    _positive("model.embedding_dim", m.embedding_dim)
    _choice("model.class_prob", m.class_prob, CLASS_PROBS)
    _positive("model.radial_sigma", m.radial_sigma)
    _positive("model.eta", m.eta)
    if not 0.5 < m.abar_max < 1.0:
        raise ConfigError(f"model.abar_max: must be in (0.5, 1), got {m.abar_max}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")
    t = cfg.train
    _positive("train.epochs", t.epochs)
    _positive("train.batch_size", t.batch_size)
    _positive("train.lr", t.lr)
    _positive("train.weight_decay", t.weight_decay, strict=False)
    if t.seed < 0:
        raise ConfigError(f"train.seed: must be >= 0, got {t.seed}")
    _choice("train.sync_mode", t.sync_mode, SYNC_MODES)
    _positive("train.sync_every", t.sync_every)
    _choice("train.precision", t.precision, PRECISIONS)
    _positive("train.log_every_seconds", t.log_every_seconds)
    _choice("train.on_nonfinite", t.on_nonfinite, NONFINITE_POLICIES)
    if not 0.0 < t.nonfinite_lr_factor < 1.0:
        raise ConfigError(f"train.nonfinite_lr_factor: must be in (0, 1), got {t.nonfinite_lr_factor}")
    _positive("train.max_nonfinite", t.max_nonfinite, strict=False)
    c = cfg.cluster
    if c.num_workers < 1:
        raise ConfigError(f"cluster.num_workers: must be >= 1, got {c.num_workers}")
    shard_key = shards_key(m)
    if shard_key is not None and c.num_workers > getattr(m, shard_key.split(".")[1]):
        raise ConfigError(f"cluster.num_workers: must be in [1, {shard_key} = {getattr(m, shard_key.split('.')[1])}] "
                          f"for model.method={m.method}, got {c.num_workers}")
    _positive("cluster.gpus_per_worker", c.gpus_per_worker, strict=False)
    if c.gpus_per_worker > 1 and not float(c.gpus_per_worker).is_integer():
        raise ConfigError(f"cluster.gpus_per_worker: above 1 must be a whole number, got {c.gpus_per_worker}")
    _positive("cluster.cpus_per_worker", c.cpus_per_worker)
    _positive("cluster.threads_per_worker", c.threads_per_worker, strict=False)
    _choice("cluster.device", c.device, DEVICES)
    _positive("cluster.max_restarts_per_worker", c.max_restarts_per_worker, strict=False)
    _positive("cluster.max_restarts", c.max_restarts, strict=False)
    if c.device == "cuda" and c.gpus_per_worker == 0:
        raise ConfigError("cluster.device: 'cuda' needs cluster.gpus_per_worker > 0")
    if not cfg.run.dir:
        raise ConfigError("run.dir: must be a non-empty path")
    _positive("run.checkpoint_every", cfg.run.checkpoint_every)
    _positive("eval.batch_size", cfg.eval.batch_size)
    _positive("eval.every_epochs", cfg.eval.every_epochs, strict=False)
    run_id = cfg.metrics.run_id
    # It becomes a Prometheus label value and a Grafana variable: keep it to characters that need no quoting.
    if run_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]*", run_id):
        raise ConfigError(f"metrics.run_id: {run_id!r} is not allowed; allowed: letters, digits and _ . : - "
                          "(starting with a letter or digit)")
    _positive("metrics.write_every_seconds", cfg.metrics.write_every_seconds)


def shards_key(m: ModelConfig) -> str | None:
    """The key that counts a NoProp method's shards (model.num_blocks or model.num_shards); None for baselines."""
    if m.method == "noprop_dt":
        return "model.num_blocks"
    if m.method in NOPROP_METHODS:
        return "model.num_shards"
    return None


def worker_threads(c: ClusterConfig) -> int:
    """Torch threads a worker uses: its share of the cores (measured: 2 single-thread processes beat
    one 2-thread process by 1.35x on 2 cores)."""
    return c.threads_per_worker or max(1, int(c.cpus_per_worker))
