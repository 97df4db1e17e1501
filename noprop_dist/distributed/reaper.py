"""A watchdog for the local Ray cluster a driver starts: when the driver dies without shutting it down (SIGKILL,
an OOM kill, a crash), it stops what is left of the cluster.

Ray's processes are the driver's descendants while it lives, but a driver killed alone leaves some of them
behind: its dashboard and runtime-env agents outlive the raylet, re-parented, and keep their ports open. This
process, started beside the driver in a session of its own, notes the Ray processes among the driver's
descendants every second and, once the driver is gone, terminates every one it saw that is still the same
process (pid and start time); the driver's other children are left alone. A driver that shuts its cluster down leaves it nothing to do. Run as
``python -m noprop_dist.distributed.reaper DRIVER_PID``.

:func:`kill_ray_process` stops one Ray worker process of this machine that ``ray.kill`` left running (the
supervisor runs it as a task on the process's node).
"""
from __future__ import annotations

import os
import sys
import time

import psutil

POLL_SECONDS = 1.0
GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL


def _is_ray(p: psutil.Process) -> bool:
    """Whether a process is one of Ray's: its GCS, raylet, workers (``ray::...``) or the agents and monitors Ray
    runs from its package or its session directory. Other children of the driver are the user's business."""
    name = p.name()
    if name in ("gcs_server", "raylet") or name.startswith("ray::"):
        return True
    return any("/ray/" in arg for arg in p.cmdline())


def _tree(driver: psutil.Process) -> dict[int, float]:
    """pid -> start time of the driver's Ray descendants now (the start time tells a reused pid apart)."""
    out = {}
    try:
        children = driver.children(recursive=True)
    except psutil.Error:
        return out
    for p in children:
        if p.pid == os.getpid():  # the reaper is the driver's child too
            continue
        try:
            if _is_ray(p):
                out[p.pid] = p.create_time()
        except psutil.Error:
            pass
    return out


def _stop(seen: dict[int, float]) -> None:
    """SIGTERM every process of ``seen`` that is still the one seen, then SIGKILL those left after the grace."""
    procs = []
    for pid, started in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started:
                procs.append(p)
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=GRACE_SECONDS)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def kill_ray_process(pid: int) -> bool:
    """SIGKILL process ``pid`` of this machine if it is still one of Ray's workers (its title ``ray::...``: a pid
    taken since by another process is left alone); waits up to 10 s for it to go. Returns whether it was there."""
    try:
        p = psutil.Process(pid)
        if not p.name().startswith("ray::"):
            return False
        p.kill()  # also ends a stopped (SIGSTOP) process
    except psutil.Error:
        return False
    psutil.wait_procs([p], timeout=10)
    return True


def watch(driver_pid: int) -> None:
    """Follow the driver until it exits, then stop what is left of the processes it had started."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return
    seen: dict[int, float] = {}
    while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        seen |= _tree(driver)  # union: a process that left the tree (re-parented) is still the cluster's
        seen = {pid: t for pid, t in seen.items() if psutil.pid_exists(pid)}
        time.sleep(POLL_SECONDS)
    _stop(seen)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
