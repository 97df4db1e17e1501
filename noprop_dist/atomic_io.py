"""Atomic file writes (temporary file, then rename) and checksums: one place for both the run
directory and the saved chain. A reader, or a crash, sees the old file or the new one, never half."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import torch


def _atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename over ``path``: readers see the old file or the new one, never half."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _atomically(path, write)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj: Any, path: str) -> str:
    """Save with torch.save atomically; returns the file's sha256."""
    digest = ""

    def write(tmp: str) -> None:
        nonlocal digest
        torch.save(obj, tmp)
        digest = sha256_file(tmp)

    _atomically(path, write)
    return digest


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
