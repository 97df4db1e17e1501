"""The run directory: config snapshot, one checkpoint per block and for the parameter server, a manifest.

Layout of ``<run.dir>``::

    config.yaml                 the config the run was started with
    manifest.json               last complete epoch, file names and sha256 of every checkpoint
    checkpoints/block_03.e0002.pt, checkpoints/shared.e0002.pt   (e = epochs done)
    checkpoints/replicas.e0002.pt   the workers' shared-state replicas (their optimizers), by block group
    chain.pt, summary.json      written at the end

Every file is written to a temporary name and renamed (atomic on POSIX). The manifest is written last,
so a crash mid-epoch leaves the previous manifest pointing at intact files; the previous epoch's
files are kept until the next manifest lands.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import yaml

from .atomic_io import atomic_torch_save, atomic_write_bytes, atomic_write_json, sha256_file

from .config import Config, ConfigError

MANIFEST_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not match its manifest checksum; the message names the path."""


@dataclass
class Resume:
    """What a run directory holds to resume from."""

    epochs_done: int
    block_states: dict[int, dict]
    shared_state: dict
    train_seconds: float
    # Group key (training.replica_key) -> a worker replica's state; empty for runs saved before replicas.
    replica_states: dict[str, dict] = field(default_factory=dict)


# Sections whose change makes a run directory's checkpoints meaningless for the new config.
_IDENTITY_SECTIONS = ("data", "model")
_IDENTITY_TRAIN_KEYS = ("batch_size", "lr", "weight_decay", "seed")


class RunDir:
    def __init__(self, path: str) -> None:
        self.path = path
        self.ckpt_dir = os.path.join(path, "checkpoints")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # --- config snapshot -----------------------------------------------------------------
    def check(self, cfg: Config) -> bool:
        """Refuse (ConfigError) a directory made by an incompatible config unless ``run.overwrite`` is set;
        writes nothing. Returns whether the directory would be cleared by :meth:`prepare`."""
        snapshot = self.file("config.yaml")
        if not os.path.exists(snapshot):
            return False
        with open(snapshot, encoding="utf-8") as f:
            old = yaml.safe_load(f) or {}
        conflict = self._conflict(old, cfg.to_dict())
        if conflict and not cfg.run.overwrite:
            raise ConfigError(f"{conflict}; use another run.dir or set run.overwrite=true")
        return conflict is not None

    def prepare(self, cfg: Config) -> None:
        """Create the directory and snapshot the config. A directory made by an incompatible config is
        refused, or with ``run.overwrite: true`` cleared of that run's files (nothing else is touched)."""
        snapshot = self.file("config.yaml")
        if self.check(cfg):
            self.clear()
        os.makedirs(self.ckpt_dir, exist_ok=True)
        atomic_write_bytes(snapshot, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())

    def _conflict(self, old: dict, new: dict) -> str | None:
        """The first setting that differs between the directory's run and this config, if any."""
        keys = [(s, k) for s in _IDENTITY_SECTIONS for k in new[s]] + [("train", k) for k in _IDENTITY_TRAIN_KEYS]
        for section, key in keys:
            before = old.get(section, {}).get(key)
            if before != new[section][key]:
                return (f"run.dir: {self.path} holds a run with {section}.{key}={before!r}, "
                        f"this config has {new[section][key]!r}")
        return None

    def clear(self) -> None:
        """Remove this run's files (snapshot, manifest, checkpoints, chain, summary); leave anything else."""
        for name in ("config.yaml", "manifest.json", "chain.pt", "summary.json", "curve.json"):
            if os.path.exists(self.file(name)):
                os.remove(self.file(name))
        if os.path.isdir(self.ckpt_dir):
            for name in os.listdir(self.ckpt_dir):
                os.remove(os.path.join(self.ckpt_dir, name))

    # --- checkpoints ---------------------------------------------------------------------
    def save_epoch(
        self, epochs_done: int, block_states: dict[int, dict], shared_state: dict, train_seconds: float,
        replica_states: dict[str, dict] | None = None,
    ) -> None:
        """Write every block's, the server's and the worker replicas' state for ``epochs_done``, then the manifest."""
        files: dict[str, dict[str, str]] = {}
        for t, state in sorted(block_states.items()):
            name = f"block_{t:02d}.e{epochs_done:04d}.pt"
            files[f"block_{t}"] = {"file": name, "sha256": atomic_torch_save(state, os.path.join(self.ckpt_dir, name))}
        for key, state in (("shared", shared_state), ("replicas", replica_states)):
            if state is None:
                continue
            name = f"{key}.e{epochs_done:04d}.pt"
            files[key] = {"file": name, "sha256": atomic_torch_save(state, os.path.join(self.ckpt_dir, name))}
        old = self.read_manifest()
        previous = None
        if old is not None:  # the last complete epoch stays loadable until this one is
            previous = {k: old[k] for k in ("epochs_done", "train_seconds", "files")}
        atomic_write_json(self.file("manifest.json"), {
            "format": MANIFEST_FORMAT, "epochs_done": epochs_done, "train_seconds": train_seconds, "files": files,
            "previous": previous,
        })
        self._prune(keep={f["file"] for f in files.values()} | {f["file"] for f in (old or {}).get("files", {}).values()})

    def _prune(self, keep: set[str]) -> None:
        for name in os.listdir(self.ckpt_dir):
            if name not in keep:
                os.remove(os.path.join(self.ckpt_dir, name))

    def read_manifest(self) -> dict | None:
        path = self.file("manifest.json")
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
            if manifest.get("format") != MANIFEST_FORMAT or "files" not in manifest:
                raise ValueError(f"format {manifest.get('format')!r}")
            return manifest
        except (OSError, ValueError) as e:
            raise CheckpointError(f"manifest unreadable ({e.__class__.__name__}: {e}): {path}") from None

    def _load_checked(self, entry: dict[str, str]) -> Any:
        path = os.path.join(self.ckpt_dir, entry["file"])
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint missing: {path}")
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint corrupted (sha256 differs from manifest): {path}")
        try:  # weights_only: a checkpoint is data; it must never run code when loaded.
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
            first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            raise CheckpointError(f"checkpoint cannot be loaded with weights_only=True ({first}): {path}") from None

    def load_resume(self, num_blocks: int, warn: Callable[[str], None] = print) -> Resume | None:
        """The last complete epoch's states, checksums verified; None for a fresh directory.

        A checkpoint that is missing or fails its checksum is reported (``warn``, with its path) and the
        whole run falls back to the previous complete epoch, whose files the manifest still lists: the
        blocks share an epoch counter, and one epoch lost beats loading garbage. Both epochs bad: error.
        """
        manifest = self.read_manifest()
        if manifest is None:
            return None
        try:
            return self._load_epoch(manifest, num_blocks)
        except CheckpointError as e:
            previous = manifest.get("previous")
            if not previous:
                raise
            warn(f"{e}; falling back to the checkpoints of epoch {previous['epochs_done']}")
            try:
                return self._load_epoch(previous, num_blocks)
            except CheckpointError as e2:
                raise CheckpointError(f"{e}; and the previous epoch's too: {e2}") from None

    def load_shared(self, warn: Callable[[str], None] = print) -> tuple[int, dict] | None:
        """(epochs done, parameter-server state) of the last complete epoch, checksum verified, falling back
        to the previous epoch like :meth:`load_resume`; None when no epoch has been checkpointed yet."""
        manifest = self.read_manifest()
        if manifest is None:
            return None
        try:
            return int(manifest["epochs_done"]), self._load_checked(manifest["files"]["shared"])
        except CheckpointError as e:
            previous = manifest.get("previous")
            if not previous:
                raise
            warn(f"{e}; falling back to the parameter-server checkpoint of epoch {previous['epochs_done']}")
            return int(previous["epochs_done"]), self._load_checked(previous["files"]["shared"])

    def _load_epoch(self, entry: dict, num_blocks: int) -> Resume:
        files = entry["files"]
        missing = [t for t in range(1, num_blocks + 1) if f"block_{t}" not in files]
        if missing:
            raise CheckpointError(f"manifest lists no checkpoint for blocks {missing}: {self.file('manifest.json')}")
        blocks = {t: self._load_checked(files[f"block_{t}"]) for t in range(1, num_blocks + 1)}
        return Resume(
            epochs_done=int(entry["epochs_done"]), block_states=blocks,
            shared_state=self._load_checked(files["shared"]), train_seconds=float(entry["train_seconds"]),
            replica_states=self._load_checked(files["replicas"]) if "replicas" in files else {},
        )
