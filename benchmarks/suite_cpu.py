"""Where a command's CPU time goes, by kind of process: by default the test suite, as the pytest command of
scripts/test.sh runs it.

Every process on the machine is sampled from /proc a few times a second while the command runs; each one's
last reading of user + system time counts, less what it had used before the command started. Ray's processes
outlive the test that started them only briefly and are re-parented, so a process tree or `time` would miss
them; sampling does not (a process living less than one interval is missed, a few hundredths of a second).

    python benchmarks/suite_cpu.py --label parallel_pass
    python benchmarks/suite_cpu.py --label one_file -- python3 -m pytest -q tests/test_ray.py

Writes benchmarks/results/suite_cpu_<label>.json.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time

from common import write_result

PARALLEL_PASS = ["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
                 "--no-loadscope-reorder"]
TICKS = os.sysconf("SC_CLK_TCK")


def read_all() -> dict[int, tuple[float, str]]:
    """pid -> (CPU seconds used so far, its command line as it reads now: Ray renames its workers ray::...;
    a kernel thread's or an exiting process's is empty, and its name in brackets stands for it)."""
    seen = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after the command name, which may hold spaces
        seen[int(name)] = ((int(fields[11]) + int(fields[12])) / TICKS,
                           cmd or "[" + stat[stat.find("(") + 1:stat.rfind(")")] + "]")
    return seen


def kind(cmd: str) -> str:
    """The kind of process a command line belongs to."""
    if cmd.startswith(("ray::Dashboard", "ray::RuntimeEnv")):  # titles are cut to the length of the argv
        return "Ray agents"
    if cmd.startswith("ray::"):
        return "Ray worker " + cmd.split()[0].split(".")[0]  # ray::Worker.train_epoch -> ray::Worker
    if "default_worker.py" in cmd:
        return "Ray worker (not yet named)"
    for part in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py"):
        if part in cmd:
            return "Ray " + part
    if "pytest" in cmd or "exec(eval(sys.stdin" in cmd:  # the xdist workers' command line
        return "pytest and its xdist workers"
    if " -m noprop_dist" in cmd:
        return "noprop_dist entry points"
    if "ray.scripts.scripts" in cmd:
        return "ray command line"
    if cmd.startswith("["):
        return "kernel threads, and processes seen only as they exited"
    words = cmd.split()
    return "other: " + " ".join(_short(w) for w in words[:2]) if words else "other"


def _short(word: str) -> str:
    """A word of a command line without the machine's paths: a path's file name, an option's name."""
    if word.startswith("-"):
        return word.split("=")[0]
    return word if word.startswith("/dev/") else os.path.basename(word)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="names the result file: suite_cpu_<label>.json")
    p.add_argument("--interval", type=float, default=0.3, help="seconds between two samples")
    p.add_argument("command", nargs="*", help="what to run (default: the pytest command of scripts/test.sh)")
    args = p.parse_args()
    command = args.command or PARALLEL_PASS
    before = {pid: cpu for pid, (cpu, _) in read_all().items()}
    last: dict[int, tuple[float, str]] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        for pid, (cpu, cmd) in read_all().items():
            # An exiting process's command line reads empty: it keeps the last one it showed.
            keep = cmd.startswith("[") and pid in last
            last[pid] = (cpu, last[pid][1] if keep else cmd)
        time.sleep(args.interval)
    wall = time.perf_counter() - t0
    seconds, processes = collections.Counter(), collections.Counter()
    for pid, (cpu, cmd) in last.items():
        used = cpu - before.get(pid, 0.0)
        if used > 0 and pid != os.getpid():
            seconds[kind(cmd)] += used
            processes[kind(cmd)] += 1
    total = sum(seconds.values())
    print(f"{' '.join(command)}: exit {proc.returncode}, {wall:.0f} s, {total:.0f} CPU-seconds "
          f"({total / wall / (os.cpu_count() or 1):.0%} of {os.cpu_count()} cores)")
    for name, s in seconds.most_common():
        print(f"{s:8.1f} s {s / total:6.1%} {processes[name]:5d} processes  {name}")
    print(write_result(f"suite_cpu_{args.label}", {
        "command": command, "exit": proc.returncode, "wall_seconds": wall, "cpu_seconds": total,
        "by_kind": {name: {"cpu_seconds": s, "processes": processes[name]} for name, s in seconds.most_common()}}))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
