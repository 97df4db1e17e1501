"""Fault injection for tests and fault benchmarks: real faults (SIGKILL, NaN weights) at exact points.

The driver reads the plan from the environment variable ``NOPROP_FAULTS`` (never from the config: it
is not something a run should carry) and hands each worker its part. Comma-separated items:

    kill:W@E.S       worker W kills its own process (SIGKILL) after step S of epoch E (1-based;
                     S = 0: before the epoch's first step; S = end: after the epoch ended, when the driver
                     gathers the worker's states for the checkpoint; S = eval: when the worker is asked
                     to score its part of the chain of epoch E, E = the last epoch: the final evaluation)
    kill_ps:W@E.S    worker W SIGKILLs the parameter server's process at that point
    stop:W@E.S       worker W stops its own process (SIGSTOP: a hang, not a death) at that point
    nan:W:B@E.S      worker W fills block B's weights with NaN at that point
    kill_driver@E.save  the driver SIGKILLs itself (alone: not its process group) while it saves the checkpoint
                     of epoch E, after the checkpoint files are written and before the manifest that lists them

Each item fires once, in the worker's first incarnation only (a restarted worker runs clean).
"""
from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from typing import Callable

import torch

ENV_VAR = "NOPROP_FAULTS"
_ITEM = re.compile(r"^(kill|kill_ps|stop|nan):(\d+)(?::(\d+))?@(\d+)\.(\d+|end|eval)$")
_DRIVER_ITEM = re.compile(r"^kill_driver@(\d+)\.save$")
END = -1  # the step number of ".end": after the epoch, at the gather of the worker's states
SAVE = -2  # the step number of ".save": inside the driver's save of the epoch's checkpoint
EVAL = -3  # the step number of ".eval": the worker scoring its part of the chain of that epoch
_NAMED_STEPS = {"end": END, "eval": EVAL}
DRIVER = -1  # the "worker" of a fault the driver fires itself


@dataclass(frozen=True)
class Fault:
    kind: str  # kill | kill_ps | stop | nan
    worker: int
    epoch: int  # 1-based, as progress lines count
    step: int  # 1-based step (mini-batch) within the epoch; 0: before the first; END: at the gather after it;
    # EVAL: scoring the chain of that epoch
    block: int | None = None


def parse_faults(text: str | None) -> list[Fault]:
    """``"kill:1@2.5,nan:0:2@1.3"`` -> faults; raises ValueError naming a malformed item."""
    faults = []
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        d = _DRIVER_ITEM.match(item)
        if d:
            faults.append(Fault("kill_driver", DRIVER, int(d.group(1)), SAVE))
            continue
        m = _ITEM.match(item)
        if m is None or (m.group(1) == "nan") != (m.group(3) is not None):
            raise ValueError(f"{ENV_VAR}: malformed item {item!r}; expected kill:W@E.S, kill_ps:W@E.S, stop:W@E.S, "
                             "nan:W:B@E.S (S: a step number, end or eval) or kill_driver@E.save")
        kind, w, b, e, s = m.groups()
        step = _NAMED_STEPS[s] if s in _NAMED_STEPS else int(s)
        faults.append(Fault(kind, int(w), int(e), step, int(b) if b else None))
    return faults


def faults_from_env() -> list[Fault]:
    return parse_faults(os.environ.get(ENV_VAR))


def driver_save_hook(faults: list[Fault], epochs_done: int) -> Callable[[], None] | None:
    """What the driver's save of the checkpoint of ``epochs_done`` epochs runs before its manifest: a SIGKILL of
    the driver alone when the plan says ``kill_driver@E.save`` for that epoch, else nothing (None)."""
    if not any(f.kind == "kill_driver" and f.epoch == epochs_done for f in faults):
        return None

    def kill() -> None:
        print(f"fault injection: kill_driver while saving the checkpoint of epoch {epochs_done}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    return kill


def fault_hook(
    faults: list[Fault], blocks: dict[int, torch.nn.Module], server_pid: Callable[[], int],
    log: Callable[[str], None],
) -> Callable[[int, int], None]:
    """A per-step callback ``(epoch 0-based, step) -> None`` that fires this worker's faults (step END: the
    driver gathers the states after that epoch; EVAL: the worker scores the chain of that epoch)."""
    pending = list(faults)

    def hook(epoch: int, step: int) -> None:
        for f in [f for f in pending if (f.epoch, f.step) == (epoch + 1, step)]:
            pending.remove(f)
            where = {END: "end", EVAL: "evaluation"}.get(f.step, f"step {f.step}")
            log(f"fault injection: {f.kind} at epoch {f.epoch} {where}")
            if f.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif f.kind == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            elif f.kind == "kill_ps":
                os.kill(server_pid(), signal.SIGKILL)
            else:
                with torch.no_grad():
                    for p in blocks[f.block].parameters():
                        p.fill_(float("nan"))

    return hook
