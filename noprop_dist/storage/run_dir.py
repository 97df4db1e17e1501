"""The run directory: config snapshot, one checkpoint per block and for the parameter server, a manifest.

Layout of ``<run.dir>``::

    config.yaml                 the config of the latest invocation (the one running now)
    config_history.jsonl        every invocation's config, one line each: time, epochs done before it, config
    manifest.json               last complete epoch, file names and sha256 of every checkpoint
    checkpoints/block_03.e0002.pt, checkpoints/shared.e0002.pt   (e = epochs done)
    checkpoints/replicas.e0002.pt   the workers' shared-state replicas (their optimizers), by block group
    chain.pt, summary.json      written at the end
    .lock                       held (flock) by the one driver running on this directory

Every file is written to a temporary name and renamed (atomic on POSIX). The manifest is written last,
so a crash mid-epoch leaves the previous manifest pointing at intact files; the previous epoch's
files are kept until the next manifest lands.

The run deletes only files it can prove it wrote: a name of its own (:data:`RUN_FILES`, the checkpoint
pattern, its temporary files), a regular file (not a symlink), inside run.dir once symlinks are resolved,
and for checkpoints also listed in a manifest it wrote. Anything else in run.dir is left alone. One driver
at a time holds ``<run.dir>/.lock`` (:meth:`RunDir.lock`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import yaml

from ..config import Config, ConfigError
from .atomic import (
    append_lines,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    read_jsonl,
    repair_torn_tail,
    sha256_file,
    tmp_pattern,
)

MANIFEST_FORMAT = 1
# Appended once per invocation that prepares run.dir (config.yaml keeps only the latest config).
CONFIG_HISTORY = "config_history.jsonl"

# The files a run writes at the top of run.dir; run.overwrite removes these (and its checkpoints) only.
TENSORBOARD_DIR = "tensorboard"  # observability.tensorboard's event files (metrics.tensorboard)
RUN_FILES = ("config.yaml", CONFIG_HISTORY, "manifest.json", "chain.pt", "chain_last.pt", "summary.json", "curve.json",
             "metrics.jsonl", "report.md", "metrics.png", "stages.png")
_CKPT_NAME = r"(?:block_\d{2,}|shared|replicas)\.e\d{4,}\.pt"
CHECKPOINT_NAME = re.compile(rf"^{_CKPT_NAME}$")
_CKPT_TMP = tmp_pattern(_CKPT_NAME)
_RUN_TMP = tmp_pattern("|".join(re.escape(n) for n in RUN_FILES))
LOCK_FILE = ".lock"
# Files the run appends to rather than replaces: it needs write permission on them, not only on run.dir.
_APPENDED_FILES = (CONFIG_HISTORY, "metrics.jsonl")


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


def _manifest_problem(manifest: Any) -> str | None:
    """What makes a parsed manifest.json unusable, or None. Checks every field that :meth:`RunDir.check`,
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


class RunDir:
    def __init__(self, path: str) -> None:
        self.path = path
        self._saving: threading.Thread | None = None  # save_epoch_in_background's thread
        self._save_error: BaseException | None = None
        self.ckpt_dir = os.path.join(path, "checkpoints")
        self.holds_lock = False  # inside lock(): check() then need not (and must not) probe it

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # --- config snapshot -----------------------------------------------------------------
    def check(self, cfg: Config) -> bool:
        """Refuse (ConfigError) a directory made by an incompatible config unless ``run.overwrite`` is set,
        and one whose config.yaml is not a run's (unreadable, not a mapping, not this project's sections):
        that file is somebody else's and is never overwritten. Writes nothing. Returns whether the directory
        would be cleared by :meth:`prepare`."""
        self._refuse_a_file()
        self._refuse_unwritable()
        self._refuse_if_locked()
        snapshot = self.file("config.yaml")
        if not os.path.exists(snapshot):
            return False
        old = self._read_snapshot(snapshot)
        conflict = self._conflict(old, cfg.to_dict())
        if conflict and not cfg.run.overwrite:
            raise ConfigError(f"{conflict}; leave run.dir out (a new directory) or name another, continue that "
                              f"run with --resume {self.path}, or set run.overwrite=true to start it afresh")
        manifest = None if conflict else self.read_manifest_or_none()
        done = int(manifest.get("epochs_done", 0)) if manifest is not None else 0
        if done > cfg.train.passes:
            # Going on would re-evaluate the longer run and write summary and config saying fewer epochs.
            raise ConfigError(f"train.epochs={cfg.train.epochs}: run.dir {self.path} already holds "
                              f"{manifest['epochs_done']} epochs; ask for at least that many (more resumes "
                              "training), or leave run.dir out for a new run")
        budget = old.get("train", {}).get("epochs")
        if (isinstance(budget, float) and not budget.is_integer() and done == math.ceil(budget)
                and cfg.train.epochs != budget):
            # Its last checkpoint ends a partial epoch: resuming would count it as whole and skip the rest of it.
            raise ConfigError(f"train.epochs={cfg.train.epochs}: run.dir {self.path} holds a run that ended "
                              f"part-way through an epoch (train.epochs={budget}); it cannot be continued with "
                              "another budget; use another run.dir")
        return conflict is not None

    def prepare(self, cfg: Config) -> None:
        """Create the directory and snapshot the config. A directory made by an incompatible config is
        refused, or with ``run.overwrite: true`` cleared of that run's files (nothing else is touched)."""
        snapshot = self.file("config.yaml")
        if self.check(cfg):
            self.clear()
        os.makedirs(self.ckpt_dir, exist_ok=True)
        atomic_write_bytes(snapshot, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        self._append_history(cfg)

    def _append_history(self, cfg: Config) -> None:
        """One line in :data:`CONFIG_HISTORY` for this invocation: when, the epochs done before it, its config.
        Fsynced; a last line torn by a crash is cut off first, so this one starts on a line of its own."""
        path = self.file(CONFIG_HISTORY)
        manifest = self.read_manifest_or_none()
        repair_torn_tail(path)
        append_lines(path, [json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "epochs_done": int(manifest["epochs_done"]) if manifest else 0,
            "config": cfg.to_dict(),
        })])

    def config_history(self, warn: Callable[[str], None] = print) -> list[dict]:
        """Every invocation's line of :data:`CONFIG_HISTORY`, oldest first; unreadable lines are skipped and
        ``warn`` is told once."""
        return read_jsonl(self.file(CONFIG_HISTORY), warn)

    def _read_snapshot(self, snapshot: str) -> dict:
        """The config a run saved in run.dir; ConfigError (one line) for a file that is not one."""
        try:
            with open(snapshot, encoding="utf-8") as f:
                old = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise ConfigError(f"run.dir: {snapshot} cannot be read as a run's config ({first}); "
                              "move it away or use another run.dir") from None
        sections = (*_IDENTITY_SECTIONS, "train")
        if not isinstance(old, dict) or not all(isinstance(old.get(k), dict) for k in sections):
            raise ConfigError(f"run.dir: {snapshot} is not a noprop_dist run's config (it needs the mappings "
                              f"{', '.join(sections)}); move it away or use another run.dir")
        return old

    def _conflict(self, old: dict, new: dict) -> str | None:
        """The first setting that differs between the directory's run and this config, if any. A key the
        directory's config lacks was added since that run, which ran with its default."""
        keys = [(s, k) for s in _IDENTITY_SECTIONS for k in new[s]] + [("train", k) for k in _IDENTITY_TRAIN_KEYS]
        defaults = Config().to_dict()
        for section, key in keys:
            before = old.get(section, {}).get(key, defaults[section][key])
            if before != new[section][key]:
                return (f"run.dir: {self.path} holds a run with {section}.{key}={before!r}, "
                        f"this config has {new[section][key]!r}")
        return None

    def clear(self) -> None:
        """Remove this run's files (:data:`RUN_FILES`, the checkpoints its manifest lists, its temporary
        files); leave anything else, a user's file in checkpoints/ or a subdirectory included."""
        listed = self._listed_checkpoints(self.read_manifest_or_none())
        for name in RUN_FILES:
            self._remove_own(self.path, name)
        if os.path.isdir(self.ckpt_dir):
            for name in os.listdir(self.ckpt_dir):
                if name in listed or _CKPT_TMP.match(name):
                    self._remove_own(self.ckpt_dir, name)
        if os.path.isdir(self.path):
            for name in os.listdir(self.path):
                if _RUN_TMP.match(name):
                    self._remove_own(self.path, name)

    def _inside(self, path: str) -> bool:
        """Whether ``path``, symlinks resolved, lies inside run.dir (symlinks resolved too)."""
        root = os.path.realpath(self.path)
        return os.path.commonpath([root, os.path.realpath(path)]) == root

    def _remove_own(self, directory: str, name: str) -> bool:
        """Delete ``directory/name`` if it is a regular file (not a symlink) inside run.dir; else leave it."""
        path = os.path.join(directory, name)
        if os.path.islink(path) or not os.path.isfile(path) or not self._inside(path):
            return False
        os.remove(path)
        return True

    @staticmethod
    def _listed_checkpoints(manifest: dict | None) -> set[str]:
        """The checkpoint names a manifest lists (its epoch and the previous one's) that have our pattern."""
        names: set[str] = set()
        for entry in (manifest, (manifest or {}).get("previous")):
            for f in (entry or {}).get("files", {}).values():
                name = f.get("file") if isinstance(f, dict) else None
                if isinstance(name, str) and CHECKPOINT_NAME.match(name):
                    names.add(name)
        return names

    def read_manifest_or_none(self) -> dict | None:
        """The manifest, or None when there is none or it is unreadable (for clean-ups, which then delete
        no checkpoint rather than guess)."""
        try:
            return self.read_manifest()
        except CheckpointError:
            return None

    # --- one driver per run.dir ------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, what: str = "a run") -> Iterator[None]:
        """Hold ``<run.dir>/.lock`` while the body runs (take it just before the first write: it creates
        run.dir); a second holder is refused with ConfigError naming the process that holds it, and
        :meth:`check` refuses early, writing nothing. The lock is an flock on the open file, so the kernel
        drops it when its process dies, however it dies: a stale lock file is simply taken over. (flock is
        reliable on local file systems; on NFS it depends on the server.)"""
        self._refuse_a_file()
        path = self.file(LOCK_FILE)
        try:
            os.makedirs(self.path, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as e:
            raise ConfigError(f"run.dir: cannot create or lock {path} ({e.strerror or e}); "
                              "use another run.dir") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise self._in_use(fd) from None
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            os.fsync(fd)
            self.holds_lock = True
            yield
        finally:
            self.holds_lock = False
            os.close(fd)  # releases the flock

    def _refuse_if_locked(self) -> None:
        """ConfigError naming the holder when another process holds the lock; creates nothing (the lock
        itself is taken by :meth:`lock`, just before the first write)."""
        if self.holds_lock:
            return
        try:
            fd = os.open(self.file(LOCK_FILE), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return  # no lock file (or none we may open): nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise self._in_use(fd) from None
        finally:
            os.close(fd)

    def _refuse_a_file(self) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"run.dir: {self.path} is a file, not a directory; use another run.dir")

    def _refuse_unwritable(self) -> None:
        """ConfigError naming the path when this process could not write the run: run.dir, its checkpoints/
        and the files it appends to, or (while run.dir does not exist) the directory it would be created in.
        Checked before anything starts, so a permission problem is one line, not a failure once Ray runs."""
        path = os.path.abspath(self.path)
        if not os.path.exists(path):
            ancestor = os.path.dirname(path)
            while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
                ancestor = os.path.dirname(ancestor)
            if not os.path.isdir(ancestor):
                raise ConfigError(f"run.dir: {self.path} cannot be created: {ancestor} is not a directory; "
                                  "use another run.dir")
            dirs, files = [ancestor], []
        else:
            self._refuse_links()
            dirs = [path] + ([self.ckpt_dir] if os.path.isdir(self.ckpt_dir) else [])
            files = [self.file(n) for n in _APPENDED_FILES if os.path.isfile(self.file(n))]
        for d in dirs:
            if not os.access(d, os.W_OK | os.X_OK):
                raise ConfigError(f"run.dir: cannot write in {d} (permission denied); use another run.dir "
                                  "or change its permissions")
        for f in files:
            if not os.access(f, os.W_OK):
                raise ConfigError(f"run.dir: cannot append to {f} (permission denied); use another run.dir "
                                  "or change its permissions")

    def _refuse_links(self) -> None:
        """One rule for every file and directory the run writes, appends to or repairs: never through a symlink.
        An append or a write into a linked directory would land outside run.dir (a metrics.jsonl linked to a
        user's file lost its last line and gained the run's metrics); a linked checkpoints/ would grow without
        the pruning, which deletes nothing behind a link. Refused with one line before anything is written."""
        for name in (*RUN_FILES, "checkpoints", TENSORBOARD_DIR, LOCK_FILE):
            path = self.file(name)
            if os.path.islink(path):
                raise ConfigError(f"run.dir: {path} is a symlink (to {os.readlink(path)}); the run writes its files "
                                  "only inside run.dir: move the link away, or put run.dir where the files should go")
            if name != "checkpoints" and name != TENSORBOARD_DIR and os.path.isdir(path):
                raise ConfigError(f"run.dir: {path} is a directory where the run keeps a file; move it away or use "
                                  "another run.dir")

    def _in_use(self, fd: int) -> ConfigError:
        """The refusal naming who holds the lock, from what the holder wrote into the file (``fd``)."""
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            holder = f"{info['what']} (pid {info['pid']} on {info['host']}, since {info['since']})"
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            holder = "another process"
        return ConfigError(f"run.dir: {self.path} is in use by {holder}; wait for it to finish or use another run.dir")

    # --- checkpoints ---------------------------------------------------------------------
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
            files[f"block_{t}"] = {"file": name, "sha256": atomic_torch_save(state, os.path.join(self.ckpt_dir, name))}
        for key, state in (("shared", shared_state), ("replicas", replica_states)):
            if state is None:
                continue
            name = f"{key}.e{epochs_done:04d}.pt"
            files[key] = {"file": name, "sha256": atomic_torch_save(state, os.path.join(self.ckpt_dir, name))}
        if before_manifest is not None:
            before_manifest()
        old = self.read_manifest()
        previous = None
        if old is not None:  # the last complete epoch stays loadable until this one is
            previous = {k: old[k] for k in ("epochs_done", "train_seconds", "files")}
        atomic_write_json(self.file("manifest.json"), {
            "format": MANIFEST_FORMAT, "epochs_done": epochs_done, "train_seconds": train_seconds, "files": files,
            "previous": previous,
        })
        keep = {f["file"] for f in files.values()} | {f["file"] for f in (old or {}).get("files", {}).values()}
        self._prune(self._listed_checkpoints(old) - keep)

    def _prune(self, names: set[str]) -> None:
        """Delete the checkpoints no manifest needs any more, and temporary files a crash left: only files
        of ours (:meth:`_remove_own`), so nothing through a symlink out of run.dir."""
        for name in os.listdir(self.ckpt_dir):
            if name in names or _CKPT_TMP.match(name):
                self._remove_own(self.ckpt_dir, name)

    def read_manifest(self) -> dict | None:
        path = self.file("manifest.json")
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
        A checkpoint being written in the background is waited for.
        """
        self.wait_for_saves()
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
