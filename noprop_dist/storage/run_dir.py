"""The run directory: which run it holds (its config and the config history) and what the run may delete.

Layout of ``<run.dir>``::

    config.yaml                 the config of the latest invocation (the one running now)
    config_history.jsonl        every invocation's config, one line each: time, epochs done before it, config
    manifest.json, checkpoints/ the checkpoints of each epoch (:mod:`.checkpoints`)
    chain.pt, summary.json      written at the end
    .lock                       held (flock) by the one driver running on this directory (:mod:`.lock`)

The run deletes only files it can prove it wrote: a name of its own (:data:`RUN_FILES`, the checkpoint
pattern, its temporary files), a regular file (not a symlink), inside run.dir once symlinks are resolved,
and for checkpoints also listed in a manifest it wrote. Anything else in run.dir is left alone.
"""
from __future__ import annotations

import json
import math
import os
import re
import time

import yaml

from ..config import Config, ConfigError
from .atomic import append_lines, atomic_write_bytes, remove_own, repair_torn_tail, tmp_pattern
from .checkpoints import CHECKPOINTS_DIR, MANIFEST_FILE, CheckpointStore
from .lock import LOCK_FILE, RunLock, refuse_a_file

# Appended once per invocation that prepares run.dir (config.yaml keeps only the latest config).
CONFIG_HISTORY = "config_history.jsonl"

# The files a run writes at the top of run.dir; run.overwrite removes these (and its checkpoints) only.
TENSORBOARD_DIR = "tensorboard"  # observability.tensorboard's event files (metrics.tensorboard)
RUN_FILES = ("config.yaml", CONFIG_HISTORY, MANIFEST_FILE, "chain.pt", "chain_last.pt", "summary.json", "curve.json",
             "metrics.jsonl", "report.md", "metrics.png", "stages.png")
_RUN_TMP = tmp_pattern("|".join(re.escape(n) for n in RUN_FILES))
# Files the run appends to rather than replaces: it needs write permission on them, not only on run.dir.
_APPENDED_FILES = (CONFIG_HISTORY, "metrics.jsonl")

# Sections whose change makes a run directory's checkpoints meaningless for the new config.
_IDENTITY_SECTIONS = ("data", "model")
_IDENTITY_TRAIN_KEYS = ("batch_size", "lr", "weight_decay", "seed")


class RunDir:
    """The run directory ``path``; its lock (:attr:`lock`) and its checkpoints (:attr:`checkpoints`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = RunLock(path)
        self.checkpoints = CheckpointStore(path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # --- config snapshot -----------------------------------------------------------------
    def check(self, cfg: Config) -> bool:
        """Refuse (ConfigError) a directory made by an incompatible config unless ``run.overwrite`` is set,
        and one whose config.yaml is not a run's (unreadable, not a mapping, not this project's sections):
        that file is somebody else's and is never overwritten. Refuses too a directory another process holds
        the lock of. Writes nothing. Returns whether the directory would be cleared by :meth:`prepare`."""
        refuse_a_file(self.path)
        self._refuse_unwritable()
        self.lock.refuse_if_held_elsewhere()
        snapshot = self.file("config.yaml")
        if not os.path.exists(snapshot):
            return False
        old = self._read_snapshot(snapshot)
        conflict = self._conflict(old, cfg.to_dict())
        if conflict and not cfg.run.overwrite:
            raise ConfigError(f"{conflict}; leave run.dir out (a new directory) or name another, continue that "
                              f"run with --resume {self.path}, or set run.overwrite=true to start it afresh")
        manifest = None if conflict else self.checkpoints.read_manifest_or_none()
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
        os.makedirs(self.checkpoints.dir, exist_ok=True)
        atomic_write_bytes(snapshot, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        self._append_history(cfg)

    def _append_history(self, cfg: Config) -> None:
        """One line in :data:`CONFIG_HISTORY` for this invocation: when, the epochs done before it, its config.
        Fsynced; a last line torn by a crash is cut off first, so this one starts on a line of its own."""
        path = self.file(CONFIG_HISTORY)
        manifest = self.checkpoints.read_manifest_or_none()
        repair_torn_tail(path)
        append_lines(path, [json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "epochs_done": int(manifest["epochs_done"]) if manifest else 0,
            "config": cfg.to_dict(),
        })])

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

    # --- safe deletion -------------------------------------------------------------------
    def clear(self) -> None:
        """Remove this run's files (:data:`RUN_FILES`, the checkpoints its manifest lists, its temporary
        files); leave anything else, a user's file in checkpoints/ or a subdirectory included."""
        listed = self.checkpoints.listed()  # before the manifest goes with the other run files
        for name in RUN_FILES:
            remove_own(self.path, self.file(name))
        self.checkpoints.prune(listed)
        if os.path.isdir(self.path):
            for name in os.listdir(self.path):
                if _RUN_TMP.match(name):
                    remove_own(self.path, self.file(name))

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
            dirs = [path] + ([self.checkpoints.dir] if os.path.isdir(self.checkpoints.dir) else [])
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
        for name in (*RUN_FILES, CHECKPOINTS_DIR, TENSORBOARD_DIR, LOCK_FILE):
            path = self.file(name)
            if os.path.islink(path):
                raise ConfigError(f"run.dir: {path} is a symlink (to {os.readlink(path)}); the run writes its files "
                                  "only inside run.dir: move the link away, or put run.dir where the files should go")
            if name != CHECKPOINTS_DIR and name != TENSORBOARD_DIR and os.path.isdir(path):
                raise ConfigError(f"run.dir: {path} is a directory where the run keeps a file; move it away or use "
                                  "another run.dir")
