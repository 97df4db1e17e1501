"""The checkpoints of a run: saved per epoch, listed with their checksums in a manifest, loaded to resume.

In ``<run.dir>``::

    manifest.json               last complete epoch, file names and sha256 of every checkpoint (and the previous
                                epoch's)
    checkpoints/block_03.e0002.pt, checkpoints/shared.e0002.pt   (e = epochs done)
    checkpoints/replicas.e0002.pt   the workers' shared-state replicas (their optimizers), by block group

Every file is written to a temporary name and renamed (atomic on POSIX). The manifest is written last,
so a crash mid-epoch leaves the previous manifest pointing at intact files; the previous epoch's
files are kept until the next manifest lands. Pruning deletes only checkpoints a manifest listed and the
temporary files of a crash, and only files of the run's own (:func:`.atomic.remove_own`).
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .atomic import atomic_torch_save, atomic_write_json, remove_own, sha256_file, tmp_pattern

MANIFEST_FORMAT = 1
MANIFEST_FILE = "manifest.json"
CHECKPOINTS_DIR = "checkpoints"
_CKPT_NAME = r"(?:block_\d{2,}|shared|replicas)\.e\d{4,}\.pt"
CHECKPOINT_NAME = re.compile(rf"^{_CKPT_NAME}$")
_CKPT_TMP = tmp_pattern(_CKPT_NAME)


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


def _manifest_problem(manifest: Any) -> str | None:
    """What makes a parsed manifest.json unusable, or None. Checks every field that the run directory's check,
    the resume and the clean-ups read, for this epoch and the previous one, so that a damaged or foreign
    file is one CheckpointError rather than a KeyError or TypeError deep inside them; a listed file must
    have the checkpoint name pattern (a manifest cannot point a load outside checkpoints/)."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"
    for where, entry in (("epoch", manifest), ("previous epoch", manifest.get("previous"))):
        if entry is None and where == "previous epoch":
            continue
        if not isinstance(entry, dict):
            return f"{where}: {entry!r:.40} is not an object"
        epochs, seconds, files = entry.get("epochs_done"), entry.get("train_seconds"), entry.get("files")
        if type(epochs) is not int or epochs < 0:  # type(): a JSON true is no count either
            return f"{where}: epochs_done {epochs!r:.40} is not a count of epochs"
        if type(seconds) not in (int, float) or not 0 <= seconds < math.inf:
            return f"{where}: train_seconds {seconds!r:.40} is not a duration"
        if not isinstance(files, dict) or "shared" not in files:
            return f"{where}: files {files!r:.40} is not an object listing the shared state's checkpoint"
        for key, f in files.items():
            if not (isinstance(f, dict) and isinstance(f.get("file"), str) and CHECKPOINT_NAME.match(f["file"])
                    and isinstance(f.get("sha256"), str)):
                return f"{where}: files[{key!r:.40}] is not a checkpoint entry (file with a checkpoint's name, sha256)"
    return None


def _listed_checkpoints(manifest: dict | None) -> set[str]:
    """The checkpoint names a manifest lists (its epoch and the previous one's) that have our pattern."""
    names: set[str] = set()
    for entry in (manifest, (manifest or {}).get("previous")):
        for f in (entry or {}).get("files", {}).values():
            name = f.get("file") if isinstance(f, dict) else None
            if isinstance(name, str) and CHECKPOINT_NAME.match(name):
                names.add(name)
    return names


class CheckpointStore:
    """The checkpoints and manifest of the run directory ``run_dir``: saves, loads and prunes them."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.dir = os.path.join(run_dir, CHECKPOINTS_DIR)
        self.manifest_path = os.path.join(run_dir, MANIFEST_FILE)
        self._saving: threading.Thread | None = None  # save_epoch_in_background's thread
        self._save_error: BaseException | None = None

    def save_epoch_in_background(self, *args: Any, **kwargs: Any) -> None:
        """:meth:`save_epoch` in a thread of its own, so that the workers train the next epoch meanwhile. The
        save before it is waited for first (saves land in order), and so is every read of the checkpoints
        (:meth:`wait_for_saves`); a crash at any point leaves the last manifest's checkpoints whole, as the
        manifest is still written last. What the save raised (a full disk) is raised by the next wait."""
        self.wait_for_saves()

        def save() -> None:
            try:
                self.save_epoch(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the thread that waits
                self._save_error = e

        # Not a daemon: an interpreter that exits (Ctrl-C included) finishes the checkpoint first.
        self._saving = threading.Thread(target=save, name=f"checkpoint-{args[0] if args else ''}")
        self._saving.start()

    def wait_for_saves(self) -> None:
        """Wait for the checkpoint being written in the background, if any; raise what it raised."""
        saving, self._saving = self._saving, None
        if saving is not None:
            saving.join()
        error, self._save_error = self._save_error, None
        if error is not None:
            raise error

    def save_epoch(
        self, epochs_done: int, block_states: dict[int, dict], shared_state: dict, train_seconds: float,
        replica_states: dict[str, dict] | None = None, before_manifest: Callable[[], None] | None = None,
    ) -> None:
        """Write every block's, the server's and the worker replicas' state for ``epochs_done``, then the manifest.
        ``before_manifest`` runs between the two (fault injection: a crash there must leave the last manifest's
        checkpoints whole)."""
        files: dict[str, dict[str, str]] = {}
        for t, state in sorted(block_states.items()):
            name = f"block_{t:02d}.e{epochs_done:04d}.pt"
            files[f"block_{t}"] = {"file": name, "sha256": atomic_torch_save(state, os.path.join(self.dir, name))}
        for key, state in (("shared", shared_state), ("replicas", replica_states)):
            if state is None:
                continue
            name = f"{key}.e{epochs_done:04d}.pt"
            files[key] = {"file": name, "sha256": atomic_torch_save(state, os.path.join(self.dir, name))}
        if before_manifest is not None:
            before_manifest()
        old = self.read_manifest()
        previous = None
        if old is not None:  # the last complete epoch stays loadable until this one is
            previous = {k: old[k] for k in ("epochs_done", "train_seconds", "files")}
        atomic_write_json(self.manifest_path, {
            "format": MANIFEST_FORMAT, "epochs_done": epochs_done, "train_seconds": train_seconds, "files": files,
            "previous": previous,
        })
        keep = {f["file"] for f in files.values()} | {f["file"] for f in (old or {}).get("files", {}).values()}
        self.prune(_listed_checkpoints(old) - keep)

    def listed(self) -> set[str]:
        """The checkpoint names the manifest lists, this epoch's and the previous one's; none when the manifest
        is missing or unreadable (a clean-up then deletes no checkpoint rather than guess)."""
        return _listed_checkpoints(self.read_manifest_or_none())

    def prune(self, names: set[str]) -> None:
        """Delete the checkpoints ``names`` (no manifest needs them any more) and the temporary files a crash
        left: only files of ours (:func:`.atomic.remove_own`), so nothing through a symlink out of run.dir."""
        if not os.path.isdir(self.dir):
            return
        for name in os.listdir(self.dir):
            if name in names or _CKPT_TMP.match(name):
                remove_own(self.run_dir, os.path.join(self.dir, name))

    def read_manifest(self) -> dict | None:
        """The manifest, checked (:class:`CheckpointError` naming it when unusable); None when there is none."""
        path = self.manifest_path
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
            problem = _manifest_problem(manifest)
            if problem:
                raise ValueError(problem)
            return manifest
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested past Python's stack
            raise CheckpointError(f"manifest unreadable ({e.__class__.__name__}: {e}): {path}") from None

    def read_manifest_or_none(self) -> dict | None:
        """The manifest, or None when there is none or it is unreadable (for clean-ups, which then delete
        no checkpoint rather than guess)."""
        try:
            return self.read_manifest()
        except CheckpointError:
            return None

    def _load_checked(self, entry: dict[str, str]) -> Any:
        path = os.path.join(self.dir, entry["file"])
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint missing: {path}")
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint corrupted (sha256 differs from manifest): {path}")
        try:  # weights_only: a checkpoint is data; it must never run code when loaded.
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
            first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            raise CheckpointError(f"checkpoint cannot be loaded with weights_only=True ({first}): {path}") from None

    def load_resume(self, num_shards: int, warn: Callable[[str], None] = print) -> Resume | None:
        """The last complete epoch's states, checksums verified; None for a fresh directory.

        A checkpoint that is missing or fails its checksum is reported (``warn``, with its path) and the
        whole run falls back to the previous complete epoch, whose files the manifest still lists: the
        blocks share an epoch counter, and one epoch lost beats loading garbage. Both epochs bad: error.
        A checkpoint being written in the background is waited for.
        """
        self.wait_for_saves()
        manifest = self.read_manifest()
        if manifest is None:
            return None
        try:
            return self._load_epoch(manifest, num_shards)
        except CheckpointError as e:
            previous = manifest.get("previous")
            if not previous:
                raise
            warn(f"{e}; falling back to the checkpoints of epoch {previous['epochs_done']}")
            try:
                return self._load_epoch(previous, num_shards)
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

    def _load_epoch(self, entry: dict, num_shards: int) -> Resume:
        files = entry["files"]
        missing = [t for t in range(1, num_shards + 1) if f"block_{t}" not in files]
        if missing:
            raise CheckpointError(f"manifest lists no checkpoint for blocks {missing}: {self.manifest_path}")
        blocks = {t: self._load_checked(files[f"block_{t}"]) for t in range(1, num_shards + 1)}
        return Resume(
            epochs_done=int(entry["epochs_done"]), block_states=blocks,
            shared_state=self._load_checked(files["shared"]), train_seconds=float(entry["train_seconds"]),
            replica_states=self._load_checked(files["replicas"]) if "replicas" in files else {},
        )
