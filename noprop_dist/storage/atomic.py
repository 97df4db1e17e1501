"""Files that survive a crash at any byte: atomic rewrites, durable appends, torn-line repair, checksums.

One place for the run directory, the saved chain and the reports.
- An atomically rewritten file is written to a fresh temporary name, fsynced, renamed over the old one, and
  its directory fsynced. A reader, or a crash, sees the old file or the new one, never half.
- An appended file (one JSON object per line) is fsynced after every append. A crash mid-append leaves at
  most a torn last line; :func:`repair_torn_tail` cuts it off before the next append, and
  :func:`read_jsonl` skips lines that do not parse.
- A file is deleted only when it is a regular file inside the run's directory (:func:`remove_own`): never
  through a symlink, never outside it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import Any, Callable

# Temporary files of _atomically: "." + the target's name + "." + mkstemp's random part + ".tmp".
TMP_SUFFIX = ".tmp"


def tmp_pattern(name_pattern: str) -> re.Pattern[str]:
    """The names of the temporary files left by a crash while writing a file whose name matches
    ``name_pattern`` (a regular expression without anchors)."""
    return re.compile(rf"^\.(?:{name_pattern})\.[A-Za-z0-9_]+{re.escape(TMP_SUFFIX)}$")


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _new_file_mode() -> int:
    """The mode open() would give a new file (mkstemp's is 0600): the user's umask decides who may read."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename over ``path``: readers see the old file or the new one, never half.

    The temporary file is created exclusively (O_EXCL) under a random name in the target's directory, so
    another process cannot predict it or plant a symlink there for the write to follow.
    """
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=directory)
    os.fchmod(fd, _new_file_mode())
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomically(path, write)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj: Any, path: str) -> str:
    """Save with torch.save atomically; returns the file's sha256."""
    import torch  # here, not at the top: the JSON writers serve callers that should not wait for torch

    digest = ""

    def write(tmp: str) -> None:
        nonlocal digest
        torch.save(obj, tmp)
        digest = sha256_file(tmp)

    _atomically(path, write)
    return digest


def atomic_save_with(path: str, save: Callable[[str], None]) -> None:
    """``save(tmp)`` writes the whole file (e.g. a figure's ``savefig``), then it replaces ``path`` atomically."""
    _atomically(path, save)


def _open_own(path: str, flags: int) -> int:
    """os.open that does not follow a symlink at ``path`` (ELOOP, an OSError naming it): a run appends to and
    repairs only its own files, never one a link points at."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), _new_file_mode())


def append_lines(path: str, lines: list[str]) -> None:
    """Append ``lines`` (each without its newline) and fsync: an append that returned survives a crash."""
    with os.fdopen(_open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def repair_torn_tail(path: str) -> int:
    """Cut off a last line that a crash left without its newline; returns the bytes removed (0: intact).

    Without this the next append would glue a whole line to the torn one, and both would be lost.
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with os.fdopen(_open_own(path, os.O_RDWR), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        # Scan back to the last newline (a torn line is short: at most one append's worth).
        end, keep, chunk = size, 0, 1 << 16
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            block = f.read(end - start)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def read_jsonl(path: str, warn: Callable[[str], None] = print) -> list[dict]:
    """The JSON objects of ``path``, one per line; lines that do not parse (a torn line from a crash, a
    line damaged by hand) are skipped, and ``warn`` is told once how many and where the first was."""
    if not os.path.exists(path):
        return []
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad.append(number)
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad.append(number)
    if bad:
        warn(f"{path}: skipped {len(bad)} unreadable line{'s' if len(bad) > 1 else ''} "
             f"(first: line {bad[0]}); the rest is used")
    return rows


def remove_own(root: str, path: str) -> bool:
    """Delete ``path`` if it is a regular file (not a symlink) inside ``root``, symlinks resolved on both;
    else leave it. Returns whether it was deleted."""
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        return False
    os.remove(path)
    return True


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
