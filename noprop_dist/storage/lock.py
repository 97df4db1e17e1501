"""One driver per run directory: an flock on ``<run.dir>/.lock``, held from the run's first write to its last.

The lock is an flock on the open file, so the kernel drops it when its process dies, however it dies: a stale
lock file is simply taken over. (flock is reliable on local file systems; on NFS it depends on the server.)
The holder writes who it is into the file, so that a refused process can name it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from typing import Iterator

from ..config import ConfigError

LOCK_FILE = ".lock"


def refuse_a_file(run_dir: str) -> None:
    """ConfigError (one line) when ``run_dir`` is a file: neither a run nor its lock can go there."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run.dir: {run_dir} is a file, not a directory; use another run.dir")


class RunLock:
    """The lock of the run directory ``run_dir``: :meth:`hold` takes it, :meth:`refuse_if_held_elsewhere`
    probes it without creating anything."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.held = False  # inside hold(): the probe then need not (and must not) test this process's own lock

    @contextlib.contextmanager
    def hold(self, what: str = "a run") -> Iterator[None]:
        """Hold the lock while the body runs (take it just before the first write: it creates run.dir); a
        second holder is refused with ConfigError naming the process that holds it (``what``, pid, host)."""
        refuse_a_file(self.run_dir)
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as e:
            raise ConfigError(f"run.dir: cannot create or lock {self.path} ({e.strerror or e}); "
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
            self.held = True
            yield
        finally:
            self.held = False
            os.close(fd)  # releases the flock

    def refuse_if_held_elsewhere(self) -> None:
        """ConfigError naming the holder when another process holds the lock; creates nothing (the lock
        itself is taken by :meth:`hold`, just before the first write)."""
        if self.held:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return  # no lock file (or none we may open): nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise self._in_use(fd) from None
        finally:
            os.close(fd)

    def _in_use(self, fd: int) -> ConfigError:
        """The refusal naming who holds the lock, from what the holder wrote into the file (``fd``)."""
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            holder = f"{info['what']} (pid {info['pid']} on {info['host']}, since {info['since']})"
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            holder = "another process"
        return ConfigError(f"run.dir: {self.run_dir} is in use by {holder}; wait for it to finish or use another "
                           "run.dir")
