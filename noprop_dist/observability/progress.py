"""Per-block progress on the driver: live lines on a terminal, periodic plain lines elsewhere (CI, job logs)."""
from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """An ETA as 1h05m or 4m09s; "?" when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressDisplay:
    """Renders one line per block from the workers' counters (``ShardStats.as_dict()``).

    On a terminal the lines are redrawn in place; otherwise a block of lines is printed every
    ``interval`` seconds, so `ray job logs` and CI logs stay readable.
    """

    def __init__(self, total_epochs: int, stream: TextIO | None = None, interval: float = 5.0,
                 tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.total_epochs = total_epochs
        self.interval = interval
        self.last_print = -math.inf
        self.drawn = 0
        self.first: dict[int, tuple[float, int]] = {}  # block -> (time, total_steps) when first seen

    def line(self, b: dict, worker: int | None, now: float) -> str:
        """One block's line from its ``ShardStats.as_dict()``; ETA from the steps/s seen since its first step."""
        t, spe, total = b["block"], b["steps_per_epoch"], self.total_epochs
        done = b["epochs_done"] * spe + b["step"]
        who = f" w{worker}" if worker is not None else ""
        if spe == 0:
            return f"block {t:2d}{who} | starting"
        if b["total_steps"] > 0:
            self.first.setdefault(t, (now, b["total_steps"]))
        t0, steps0 = self.first.get(t, (now, b["total_steps"]))
        rate = (b["total_steps"] - steps0) / (now - t0) if now > t0 else 0.0
        left = total * spe - done
        eta = 0.0 if left <= 0 else (left / rate if rate > 0 else math.inf)
        where = "done" if b["epochs_done"] >= total else f"epoch {b['epochs_done'] + 1}/{total} step {b['step']}/{spe}"
        return (f"block {t:2d}{who} | {where} | loss {b['loss_ema']:.4g} | "
                f"{b['samples_per_second']:.0f} samples/s | ETA {duration(eta)}")

    def update(self, blocks: dict[int, dict], workers: dict[int, int] | None = None, force: bool = False) -> None:
        """blocks: block -> stats dict; workers: block -> worker rank (optional)."""
        now = time.monotonic()
        lines = [self.line(blocks[t], (workers or {}).get(t), now) for t in sorted(blocks)]
        if self.tty:
            if self.drawn:
                self.stream.write(f"\x1b[{self.drawn}F")
            self.stream.write("".join(f"\x1b[2K{ln}\n" for ln in lines))
            self.drawn = len(lines)
            self.stream.flush()
        elif force or now - self.last_print >= self.interval:
            stamp = time.strftime("%H:%M:%S")
            self.stream.write("".join(f"[{stamp}] {ln}\n" for ln in lines))
            self.stream.flush()
            self.last_print = now

    def message(self, text: str) -> None:
        """A line that stays above the live block (tty) or just a line (plain)."""
        self.drawn = 0
        self.stream.write(text + "\n")
        self.stream.flush()
