"""The run directory: config snapshot, one checkpoint per block and for the parameter server, a manifest.

Layout of ``<run.dir>``::

    config.yaml                 the config the run was started with
    manifest.json               last complete epoch, file names and sha256 of every checkpoint
    checkpoints/block_03.e0002.pt, checkpoints/shared.e0002.pt   (e = epochs done)
    chain.pt, summary.json      written at the end

Every file is written to a temporary name and renamed (atomic on POSIX). The manifest is written last,
so a crash mid-epoch leaves the previous manifest pointing at intact files; the previous epoch's
files are kept until the next manifest lands.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from .config import Config, ConfigError

MANIFEST_FORMAT = 1


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj: Any, path: str) -> str:
    """Save with torch.save atomically; returns the file's sha256."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not match its manifest checksum; the message names the path."""


@dataclass
class Resume:
    """What a run directory holds to resume from."""

    epochs_done: int
    block_states: dict[int, dict]
    shared_state: dict
    train_seconds: float


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
    def prepare(self, cfg: Config) -> None:
        """Create the directory and snapshot the config; refuse a directory made by an incompatible config."""
        snapshot = self.file("config.yaml")
        if os.path.exists(snapshot):
            with open(snapshot, encoding="utf-8") as f:
                old = yaml.safe_load(f) or {}
            new = cfg.to_dict()
            for section in _IDENTITY_SECTIONS:
                for key, value in new[section].items():
                    if old.get(section, {}).get(key) != value:
                        raise ConfigError(
                            f"run.dir: {self.path} holds a run with {section}.{key}={old.get(section, {}).get(key)!r}, "
                            f"this config has {value!r}; use another run.dir"
                        )
            for key in _IDENTITY_TRAIN_KEYS:
                if old.get("train", {}).get(key) != new["train"][key]:
                    raise ConfigError(
                        f"run.dir: {self.path} holds a run with train.{key}={old.get('train', {}).get(key)!r}, "
                        f"this config has {new['train'][key]!r}; use another run.dir"
                    )
        os.makedirs(self.ckpt_dir, exist_ok=True)
        atomic_write_bytes(snapshot, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())

    # --- checkpoints ---------------------------------------------------------------------
    def save_epoch(
        self, epochs_done: int, block_states: dict[int, dict], shared_state: dict, train_seconds: float
    ) -> None:
        """Write every block's and the server's state for ``epochs_done``, then the manifest."""
        files: dict[str, dict[str, str]] = {}
        for t, state in sorted(block_states.items()):
            name = f"block_{t:02d}.e{epochs_done:04d}.pt"
            files[f"block_{t}"] = {"file": name, "sha256": atomic_torch_save(state, os.path.join(self.ckpt_dir, name))}
        name = f"shared.e{epochs_done:04d}.pt"
        files["shared"] = {"file": name, "sha256": atomic_torch_save(shared_state, os.path.join(self.ckpt_dir, name))}
        old = self.read_manifest()
        atomic_write_json(self.file("manifest.json"), {
            "format": MANIFEST_FORMAT, "epochs_done": epochs_done, "train_seconds": train_seconds, "files": files,
            "previous": old.get("files") if old else None,
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
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def _load_checked(self, entry: dict[str, str]) -> Any:
        path = os.path.join(self.ckpt_dir, entry["file"])
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint missing: {path}")
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint corrupted (sha256 differs from manifest): {path}")
        return torch.load(path, map_location="cpu", weights_only=True)

    def load_resume(self, num_blocks: int) -> Resume | None:
        """The last complete epoch's states, checksums verified; None for a fresh directory."""
        manifest = self.read_manifest()
        if manifest is None:
            return None
        files = manifest["files"]
        blocks = {t: self._load_checked(files[f"block_{t}"]) for t in range(1, num_blocks + 1)}
        return Resume(
            epochs_done=int(manifest["epochs_done"]), block_states=blocks,
            shared_state=self._load_checked(files["shared"]), train_seconds=float(manifest["train_seconds"]),
        )
