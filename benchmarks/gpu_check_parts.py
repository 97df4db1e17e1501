"""The measurements of benchmarks/gpu_check.py, one function per part (see that file's docstring for what each
answers, how to run it and how long it takes). Kept apart from the runner so that the processes part 7 spawns
import this module, not the runner script.

Every part has the signature ``part(ctx, budget, res)``: it writes its figures into the dict ``res`` as it goes,
calls ``ctx.save()`` after each figure (the runner writes the JSON file then, so a timeout keeps what was done) and
``ctx.emit(line)`` to print one line per result. ``budget`` is the part's time cap: a part checks it before each
sub-measurement and stops with :class:`Cut` (or skips what no longer fits) rather than overrunning it.
"""
from __future__ import annotations

import copy
import json
import math
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from common import epoch_batches, plain_loop
from torch.utils._python_dispatch import TorchDispatchMode

from noprop_dist.config import Config, TrainConfig, load_config
from noprop_dist.core import DTSchedule, build_shard, build_shared, evaluate_chain
from noprop_dist.core.blocks import ModelSpec
from noprop_dist.data import IDX_FILES, ImageDataset, dataset_for, normalize
from noprop_dist.registry import get_method
from noprop_dist.training import (
    ShardTrainer,
    ShardGroup,
    initial_prototypes,
    model_spec,
    native_bf16,
)
from noprop_dist.training.evaluation import assemble_chain
from noprop_dist.training.shared_state import (
    LocalClient,
    SharedReplica,
    SharedStateServer,
)

# (``common`` above is benchmarks/common.py: gpu_check.py puts benchmarks/ on sys.path, and spawned children
# inherit that path.)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_CUDA = "skipped: no CUDA"


# ---------------------------------------------------------------------------------------------- plumbing

class Cut(Exception):
    """A part's time cap ran out; what it measured before stays in its results."""


class Skipped(Exception):
    """A part cannot run here (no CUDA, no data): its message is the one line the runner prints."""


class Budget:
    """A part's time cap, checked cooperatively between sub-measurements (a CUDA call cannot be interrupted
    safely; gpu_check.sh's ``timeout`` is the hard stop behind it)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.last = 0.0  # seconds of the last sub-measurement (measure)

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, before: str) -> None:
        if self.left() <= 0:
            raise Cut(f"time cap of {self.seconds:.0f} s reached before {before}")

    def affords(self, need_s: float) -> bool:
        return self.left() >= need_s

    def measure(self, ctx: "Ctx", rows: list[dict], label: str, key: dict, margin: float, floor: float,
                run: Callable[[], dict], skipped: str = "time cap", error_chars: int = 300) -> dict | None:
        """One sub-measurement of a part, capped: skipped (a row saying ``skipped``) when the cap cannot afford
        ``margin`` x the seconds the previous one took (``self.last``, at least ``floor``); else ``run()``'s row,
        or a row with its error, which does not stop the part. The row gets ``key``, its seconds, goes into
        ``rows`` and the JSON file. Returns the row measured, None when skipped or failed."""
        if not self.affords(margin * self.last):
            rows.append(key | {"skipped": skipped})
            ctx.emit(f"{label}: skipped (time cap)")
            return None
        t0 = time.monotonic()
        try:
            row, ok = key | run(), True
        except Exception as e:  # one configuration failing leaves the others' figures
            row, ok = key | {"error": brief(e)}, False
            ctx.emit(f"{label}: error {brief(e, error_chars)}")
        self.last = max(time.monotonic() - t0, floor)
        row["seconds"] = self.last
        rows.append(row)
        ctx.save()
        return row if ok else None


@dataclass
class Ctx:
    """What every part gets from the runner."""

    device: torch.device
    quick: bool
    fashion_root: str | None
    emit: Callable[[str], None]  # print one result line (the runner also keeps it in the JSON)
    save: Callable[[], None]  # write the JSON file now
    scratch: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="gpu_check_"))

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def shape(self, shape: str) -> str:
        """CxHxW as measured, or Cx8x8 in a dry run (--quick): the same code on a 12th of the convolution work."""
        return shape if not self.quick else shape.split("x")[0] + "x8x8"

    def timing(self) -> dict[str, int]:
        """time_steps' warm-up and fewest timed steps: a dry run only has to go through the code."""
        return {"warmup": 1, "min_steps": 2} if self.quick else {"warmup": 3, "min_steps": 5}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def brief(e: BaseException, limit: int = 400) -> str:
    """One line naming an exception, for the JSON and the log. An error raised while another was being handled
    (a graph capture's end failing after the captured code failed) names the first one too: it is the cause."""
    text = f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"
    first = e.__context__
    if first is not None and not e.__suppress_context__:
        text += f" (while handling {type(first).__name__}: {' '.join(str(first).split())[:limit]})"
    return text


def fmt(value: Any, spec: str = ".3f") -> str:
    """A figure for a result line, or what stands in its place ("skipped: no CUDA", a missing one)."""
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def synthetic_dataset(shape: str, n: int, seed: int = 0) -> ImageDataset:
    """Random uint8 images of shape CxHxW with 10 classes: step time does not depend on the pixels, and no file
    needs to travel. Built positionally, as tests/test_your_data.py checks still works."""
    c, h, w = (int(v) for v in shape.split("x"))
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    return ImageDataset("synthetic", x, y, x[:256], y[:256], 10, (0.5,) * c, (0.25,) * c)


def make_group(cfg: Config, data: ImageDataset, blocks: list[int], device: torch.device,
               log: Callable[[str], None] = print) -> tuple[ShardGroup, SharedStateServer]:
    """A shard group against an in-process parameter server: the code a Ray worker runs, without Ray."""
    spec = model_spec(cfg, data.image_shape, data.num_classes)
    server = SharedStateServer(spec, cfg.train.seed, initial_prototypes(spec, data, cfg.train.seed),
                               sources=["w0"], mode=cfg.train.sync_mode)
    group = ShardGroup(spec, blocks, cfg.train, data.train_x, data.train_y, data.mean, data.std,
                       LocalClient(server), device=device, log=log)
    return group, server


def time_steps(step: Callable[[int], Any], device: torch.device, target_s: float, warmup: int = 3,
               min_steps: int = 5, max_steps: int = 200) -> dict[str, float]:
    """Time per step of ``step(i)``: CUDA events around the timed steps on a GPU (the stream's time, gaps where
    it waited for the host included: that is what a step costs), the host clock on a CPU. Also the host's
    time to issue the steps: close to the step time means the step is bound by launching, not by the GPU.
    The number of timed steps is chosen so that they take about ``target_s``."""
    for i in range(warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    step(0)
    sync(device)
    est = max(time.perf_counter() - t0, 1e-5)
    n = int(min(max(target_s / est, min_steps), max_steps))
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        host = time.perf_counter() - t0
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / n
    else:
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        host = time.perf_counter() - t0
        ms = host * 1e3 / n
    return {"ms_per_step": ms, "host_issue_ms_per_step": host * 1e3 / n, "timed_steps": n}


_MEM_OPS = ("Memcpy", "Memset")


def profile_counts(step: Callable[[int], Any], device: torch.device, n: int) -> dict[str, Any]:
    """Kernels per step from torch.profiler over ``n`` steps: CUDA kernel events (copies and memsets apart),
    the kernels' summed GPU time (busy time, against the step time: the rest is idle waiting for launches), and
    the CUDA runtime calls the host made. On a CPU the aten ops per step instead (nested ones included).
    A profiler that fails is recorded in place of the counts: the timings beside them stay."""
    try:
        return _profile_counts(step, device, n)
    except Exception as e:
        return {"kernels_per_step": f"profiler failed: {brief(e, 200)}"}


def _profile_counts(step: Callable[[int], Any], device: torch.device, n: int) -> dict[str, Any]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        for i in range(n):
            step(i)
        sync(device)
    events = prof.events()
    if device.type != "cuda":
        return {"kernels_per_step": NO_CUDA,
                "aten_ops_per_step": sum(1 for e in events if e.name.startswith("aten::")) / n}
    on_gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    kernels = [e for e in on_gpu if not e.name.startswith(_MEM_OPS)]
    source = "device events"
    if not on_gpu:  # older layouts attach kernels to the CPU op that launched them only
        kernels = [k for e in events for k in getattr(e, "kernels", []) if not k.name.startswith(_MEM_OPS)]
        source = "kernels attached to CPU ops"
    runtime = Counter(e.name for e in events if e.device_type == DeviceType.CPU and e.name.startswith("cu"))
    busy_us = 0.0
    for k in kernels:
        tr = getattr(k, "time_range", None)
        busy_us += tr.elapsed_us() if tr is not None else float(getattr(k, "duration", 0.0))
    return {
        "kernels_per_step": len(kernels) / n,
        "memcpy_memset_per_step": sum(1 for e in on_gpu if e.name.startswith(_MEM_OPS)) / n,
        "kernel_busy_ms_per_step": busy_us / 1e3 / n,
        "runtime_calls_per_step": {k: v / n for k, v in runtime.most_common(8)},
        "profiled_steps": n,
        "counted_from": source,
    }


def state_devices(obj: Any, path: str = "") -> dict[str, str]:
    """path -> device of every tensor in a nested checkpoint (dicts, lists, tuples)."""
    found: dict[str, str] = {}
    if isinstance(obj, torch.Tensor):
        found[path or "/"] = str(obj.device)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            found |= state_devices(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found |= state_devices(v, f"{path}/{i}")
    return found


# ---------------------------------------------------------------------------------------------- 1. environment

def environment(ctx: Ctx, budget: Budget, res: dict) -> None:
    """torch / CUDA versions, the GPU, its memory and native bf16, the CPU count."""
    res.update(python=platform.python_version(), torch=torch.__version__, cuda_runtime=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               cpu_count=os.cpu_count(),
               cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
               cuda_available=torch.cuda.is_available(), device=str(ctx.device),
               cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
               # fp32 matmuls and convolutions may run as TF32 on a GPU: it decides the fp32 figures below
               tf32_matmul=getattr(torch.backends.cuda.matmul, "allow_tf32", None),
               tf32_cudnn=getattr(torch.backends.cudnn, "allow_tf32", None),
               cpu_native_bf16=native_bf16(torch.device("cpu")))
    if not ctx.cuda:
        res.update(gpu=None, bf16_native=NO_CUDA)
        ctx.emit(f"torch {torch.__version__}, no CUDA device in use ({ctx.device}); {os.cpu_count()} CPUs; "
                 f"GPU bf16: {NO_CUDA}")
        return
    props = torch.cuda.get_device_properties(ctx.device)
    free, total = torch.cuda.mem_get_info(ctx.device)
    try:
        bf16_native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument
        bf16_native = f"unknown: {torch.__version__} has no including_emulation"
    res.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
               multiprocessors=props.multi_processor_count, memory_total_gib=total / 2**30,
               memory_free_gib=free / 2**30, bf16_native=bf16_native,
               bf16_with_emulation=torch.cuda.is_bf16_supported(), gpu_count=torch.cuda.device_count())
    ctx.emit(f"{props.name} (sm {props.major}.{props.minor}, {props.multi_processor_count} SMs), "
             f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} free), bf16 native {bf16_native}; "
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {res['cudnn']}; {os.cpu_count()} CPUs")


# ---------------------------------------------------------------------------------------------- 2. portability

# Runs in a process with CUDA_VISIBLE_DEVICES="": loads a checkpoint as a driver without a GPU would
# (weights_only, no map_location) and reports every tensor's device.
_LOADER = r"""
import json, sys, torch
out = {"cuda_available": torch.cuda.is_available()}
try:
    obj = torch.load(sys.argv[1], weights_only=True)
except Exception as e:
    out.update(ok=False, error=type(e).__name__ + ": " + " ".join(str(e).split())[:300])
else:
    devs = {}
    def walk(o, path):
        if isinstance(o, torch.Tensor):
            devs[path or "/"] = str(o.device)
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, path + "/" + str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, path + "/" + str(i))
    walk(obj, "")
    out.update(ok=True, tensors=len(devs), devices=sorted(set(devs.values())), tensor_devices=devs)
print("RESULT " + json.dumps(out))
"""


def _load_without_cuda(path: str, timeout_s: float) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _LOADER, path], env=env, capture_output=True, text=True,
                          timeout=max(timeout_s, 5))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"ok": False, "error": f"loader exited {proc.returncode}: {proc.stderr.strip()[-400:]}"}


def portability(ctx: Ctx, budget: Budget, res: dict) -> None:
    """Checkpoints of a group trained on the device load in a process that sees no CUDA device."""
    cfg = load_config(None, ["model.num_blocks=2", "train.batch_size=64", "model.dropout=0.0", "train.sync_every=1"])
    data = synthetic_dataset(ctx.shape("1x28x28"), 128 if ctx.quick else 256)
    group, server = make_group(cfg, data, [1, 2], ctx.device, ctx.emit)
    group.train_epoch(0)
    sync(ctx.device)
    payload = {"blocks": group.state_dicts(), "replica": group.replica.state_dict(), "server": server.state_dict()}
    before = state_devices(payload)
    res["in_process"] = {"tensors": len(before), "by_device": dict(Counter(before.values()))}
    # The control: a trainer's own state_dict, not copied to the host. On a GPU it holds CUDA tensors, so its
    # load must fail where no CUDA is visible: that shows the subprocess really sees none.
    control = {"trainer_state_as_is": group.trainers[1].state_dict()}
    res["control_in_process"] = dict(Counter(state_devices(control).values()))
    files = {"worker_states": payload, "control_raw_trainer_state": control}
    for name, obj in files.items():
        budget.check(f"loading {name}")
        path = os.path.join(ctx.scratch, f"{name}.pt")
        torch.save(obj, path)
        got = _load_without_cuda(path, min(60.0, budget.left()))
        got["file_mb"] = os.path.getsize(path) / 2**20
        res[name] = got
        ctx.save()
        if got.get("ok"):
            by_dev = Counter(got["tensor_devices"].values())
            ctx.emit(f"{name}: loads without CUDA (cuda visible there: {got['cuda_available']}): "
                     f"{got['tensors']} tensors, devices {dict(by_dev)}")
        else:
            ctx.emit(f"{name}: does NOT load without CUDA: {got.get('error')}")
    ok = res["worker_states"].get("ok") and res["worker_states"].get("devices") == ["cpu"]
    res["verdict"] = ("worker states leave on the CPU and load without CUDA" if ok
                      else "worker states do not load as CPU tensors without CUDA")
    if not ctx.cuda:
        res["verdict"] += f" (on the CPU, trivially; the GPU case is {NO_CUDA})"
    elif res["control_raw_trainer_state"].get("ok"):
        res["verdict"] += "; but the control (CUDA tensors) loaded too: the check did not hide CUDA, re-examine"
    else:
        res["verdict"] += "; the control (a trainer's CUDA state as is) fails there, as it must"
    ctx.emit(f"verdict: {res['verdict']}")


# ---------------------------------------------------------------------------------------------- 3. sync audit

class SyncWarnings:
    """Counts torch.cuda.set_sync_debug_mode("warn")'s warnings (one per synchronising CUDA call: a read of a
    value, a copy to the host, an explicit wait) and where in the Python code each came from."""

    def __init__(self) -> None:
        self.count = 0
        self.sites: Counter[str] = Counter()
        self.other: list[str] = []

    def __enter__(self) -> SyncWarnings:
        self._caught = warnings.catch_warnings()
        self._caught.__enter__()
        warnings.simplefilter("always")  # every occurrence, not one per site
        warnings.showwarning = self._seen  # restored by catch_warnings on exit
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._caught.__exit__(*exc)

    def _seen(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
              line: Any = None) -> None:
        if "synchroniz" not in str(message):
            self.other.append(str(message)[:200])
            return
        self.count += 1
        self.sites[self._caller()] += 1

    @staticmethod
    def _caller() -> str:
        """The innermost frame outside torch, warnings and this class: the project's line that synchronised."""
        torch_dir = os.path.dirname(torch.__file__)
        for fr in reversed(traceback.extract_stack()):
            if fr.filename.startswith(torch_dir) or fr.filename.endswith(("warnings.py", "gpu_check_parts.py")):
                continue
            where = os.path.relpath(fr.filename, REPO) if fr.filename.startswith(REPO) else fr.filename
            return f"{where}:{fr.lineno} {fr.name}: {(fr.line or '').strip()[:90]}"
        return "?"


class HostTraffic(TorchDispatchMode):
    """Counts, on any device, the ops that read one value back (.item(), bool()), tensors built from host data
    (torch.tensor([...]): on a GPU an upload that waits) and copies from a GPU to the host."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __init__(self) -> None:
        super().__init__()
        self.reads, self.uploads, self.to_host = 0, 0, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.READS:
            self.reads += 1
        elif func == torch.ops.aten.lift_fresh.default:
            self.uploads += 1
        elif func == torch.ops.aten._to_copy.default:
            dst = kwargs.get("device")
            if dst is not None and torch.device(dst).type == "cpu" and args[0].device.type != "cpu":
                self.to_host += 1
        elif func == torch.ops.aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            self.to_host += 1
        return func(*args, **kwargs)


SYNC_CASES: list[tuple[str, list[str]]] = [  # as tests/test_step_loop.py's host-read test builds them
    ("noprop_dt", []),
    ("noprop_ct", ["model.num_shards=2"]),
    ("noprop_fm", ["model.num_shards=2", "model.shard_partition=equal_mass", "model.shard_overlap=0.2"]),
]


def sync_audit(ctx: Ctx, budget: Budget, res: dict) -> None:
    """Synchronising CUDA calls per step of the shard loop (DT, CT, FM), after a warm-up epoch."""
    every, bs, n, shape = 3, 64, 320 if ctx.quick else 640, ctx.shape("1x28x28")
    res["setup"] = {"blocks": 2, "batch_size": bs, "images": n, "sync_every": every, "shape": shape}
    rows = res.setdefault("rows", [])
    for method, extra in SYNC_CASES:
        budget.check(method)
        cfg = load_config(None, [f"model.method={method}", "model.num_blocks=2", f"train.batch_size={bs}",
                                 f"train.sync_every={every}", "model.dropout=0.0", *extra])
        group, _ = make_group(cfg, synthetic_dataset(shape, n), [1, 2], ctx.device, ctx.emit)
        group.train_epoch(0)  # warm-up: what is built or cached once is not counted
        sync(ctx.device)
        batches = len(epoch_batches(cfg, n, 1))
        row: dict[str, Any] = {"method": method, "mini_batches": batches, "block_steps": 2 * batches,
                               "exchanges": math.ceil(batches / every)}
        if ctx.cuda:
            with SyncWarnings() as sw:
                group.train_epoch(1)
            sync(ctx.device)  # outside the audit: the harness's own wait is not the loop's
            row.update(syncs=sw.count, syncs_per_block_step=sw.count / row["block_steps"],
                       syncs_per_exchange=sw.count / row["exchanges"], sites=dict(sw.sites.most_common()),
                       other_warnings=sw.other[:5])
        else:
            group.train_epoch(1)  # the same epoch, unaudited: sync debug mode exists for CUDA only
            row["syncs"] = NO_CUDA
        with HostTraffic() as ht:
            group.train_epoch(2)
        sync(ctx.device)
        row.update(host_reads=ht.reads, uploads=ht.uploads, copies_to_host=ht.to_host)
        rows.append(row)
        ctx.save()
        if ctx.cuda:
            ctx.emit(f"{method}: {sw.count} synchronising calls in an epoch of {row['block_steps']} block steps and "
                     f"{row['exchanges']} exchanges ({row['syncs_per_block_step']:.2f} per step, "
                     f"{row['syncs_per_exchange']:.2f} per exchange); single-value reads {ht.reads}, uploads "
                     f"{ht.uploads}, copies to host {ht.to_host}")
            for site, c in sw.sites.most_common(6):
                ctx.emit(f"    {c:3d} x {site}")
        else:
            ctx.emit(f"{method}: sync debug mode {NO_CUDA}; single-value reads {ht.reads}, uploads {ht.uploads} in "
                     f"{row['block_steps']} block steps")


# ---------------------------------------------------------------------------------------------- 4. graphs

def _device_batches(shape: tuple[int, int, int], batch: int, k: int, device: torch.device,
                    channels_last: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """k different normalised image batches (as TrainingData.batch gives them) and labels, on the device."""
    gen = torch.Generator().manual_seed(batch)
    out = []
    for _ in range(k):
        x = torch.randn((batch, *shape), generator=gen).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, 10, (batch,), generator=gen).to(device)))
    return out


class PlainStep:
    """Shard t's training step in plain torch: its loss (the method's shard_loss, the same ops), backward, a
    fused AdamW step of the block and one of the shared state, as ShardTrainer.step does, without the project's
    non-finite check, found_inf skip and replica. Noise comes from the default CUDA generator and autocast
    keeps no weight-cast cache, so that the step can be captured as it is."""

    def __init__(self, spec: ModelSpec, t: int, train: TrainConfig, device: torch.device, bf16: bool) -> None:
        self.spec, self.t, self.device, self.bf16 = spec, t, device, bf16
        self.block = build_shard(spec, t, train.seed).to(device).to(memory_format=torch.channels_last)
        self.shared = build_shared(spec, train.seed).to(device)
        capturable = device.type == "cuda"  # graph capture refuses an optimizer that is not capturable
        self.opts = [torch.optim.AdamW(m.parameters(), lr=train.lr, weight_decay=train.weight_decay, fused=True,
                                       capturable=capturable) for m in (self.block, self.shared)]

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def body(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward, backward, optimizer steps (no zero_grad: a captured step writes the same .grad buffers)."""
        self.block.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            total, _ = get_method(self.spec.method).shard_loss(self.block, self.shared, self.spec, self.t, x, y, None)
        total.backward()
        for o in self.opts:
            o.step()
        return total.detach()


def _capture(body: Callable[[], Any], generators: list[torch.Generator],
             zero_grad: Callable[[], None] | None = None) -> tuple[Any, Any]:
    """A CUDA graph of ``body()`` after 3 warm-up runs on a side stream (cuBLAS / cuDNN handles, the optimizers'
    lazily built state and the allocator settle there, as capture requires); returns (graph, body's output).

    zero_grad: for a body that does not clear the gradients itself. It runs before each warm-up and once more
    right before the capture, so that the captured backward writes fresh .grad buffers (in the graph's pool)
    instead of adding to gradients left from the warm-up at every replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            if zero_grad is not None:
                zero_grad()
            body()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if zero_grad is not None:
        zero_grad()
    graph = torch.cuda.CUDAGraph()
    for gen in generators:  # a generator other than the default one is captured only when registered
        graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        out = body()
    torch.cuda.synchronize()
    return graph, out


def _graph_config(ctx: Ctx, shape: tuple[int, int, int], batch: int, precision: str, state: dict) -> dict:
    """Eager against a whole-step CUDA graph for one (shape, batch, precision)."""
    dev, t, k = ctx.device, 5, 4
    cfg = load_config(None, ["model.num_blocks=10", f"train.precision={precision}", "model.dropout=0.0",
                             f"train.batch_size={batch}"])
    spec = model_spec(cfg, shape, 10)
    batches = _device_batches(shape, batch, k, dev, channels_last=True)
    target = 0.0 if ctx.quick else 0.3
    n_prof = 1 if ctx.quick else 5
    row: dict[str, Any] = {"shape": "x".join(map(str, shape)), "batch": batch, "precision": precision, "block": t}

    # The project's step, as the shard loop runs it (ShardTrainer.step with a replica of the shared state).
    trainer = ShardTrainer(spec, t, cfg.train, dev)
    replica = SharedReplica(spec, cfg.train, LocalClient(SharedStateServer(spec, 0)), dev)
    row["resolved_precision"] = trainer.precision

    def eager(i: int) -> None:
        trainer.step(*batches[i % k], replica)

    row["eager"] = time_steps(eager, dev, target, **ctx.timing()) | profile_counts(eager, dev, n_prof)

    plain = PlainStep(spec, t, cfg.train, dev, trainer.bf16)

    def plain_eager(i: int) -> None:
        plain.zero_grad()
        plain.body(*batches[i % k])

    row["plain_eager"] = time_steps(plain_eager, dev, target, **ctx.timing())
    if not ctx.cuda:
        row["graph"] = NO_CUDA
        return row

    xs, ys = batches[0][0].clone(), batches[0][1].clone()  # the graph's static inputs
    graph, out, what, probe = None, None, None, None
    if state.get("project_capture_error") is None:
        try:
            g_trainer = ShardTrainer(spec, t, cfg.train, dev)
            g_replica = SharedReplica(spec, cfg.train, LocalClient(SharedStateServer(spec, 0)), dev)
            for opt in (g_trainer.optimizer, g_replica.optimizer):
                for group in opt.param_groups:  # the project's optimizers are fused but not capturable
                    group["capturable"] = True
            # step() sets the gradients to None itself, so the captured backward allocates them in the pool
            graph, out = _capture(lambda: g_trainer.step(xs, ys, g_replica), [g_trainer.generator])
            what, probe = "the project's ShardTrainer.step (optimizers made capturable)", g_trainer.params[0]
        except Exception as e:  # recorded once; the plain step stands in from then on
            state["project_capture_error"] = brief(e)
            ctx.emit(f"capturing ShardTrainer.step failed ({brief(e, 200)}); capturing the plain-torch step instead")
            graph = None
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
    if graph is None:
        try:
            p = PlainStep(spec, t, cfg.train, dev, trainer.bf16)
            graph, out = _capture(lambda: p.body(xs, ys), [], zero_grad=p.zero_grad)
            what, probe = "the plain-torch step (PlainStep)", next(p.block.parameters())
        except Exception as e:  # the eager figures above stay
            row["graph"] = f"error: {brief(e)}"
            return row

    def replay(i: int) -> None:
        x, y = batches[i % k]
        xs.copy_(x)  # new data into the static inputs: part of a graphed step's cost
        ys.copy_(y)
        graph.replay()

    before = probe.detach().clone()
    row["graph"] = time_steps(replay, dev, target, **ctx.timing()) | profile_counts(replay, dev, n_prof)
    loss = out[0] if isinstance(out, tuple) else out
    row["graph"].update(captured=what, loss_finite=bool(torch.isfinite(loss).item()),
                        weights_changed=not torch.equal(before, probe.detach()))
    row["graph_speedup"] = row["eager"]["ms_per_step"] / row["graph"]["ms_per_step"]
    return row


def graphs(ctx: Ctx, budget: Budget, res: dict) -> None:
    """One Fig. 6 block step eager against a whole-step CUDA graph: fp32 / bf16, batch 32 / 128 / 512, 28x28x1 and
    32x32x3; GPU time and kernels per step."""
    if ctx.quick:  # a dry run: each shape once, each precision once
        configs = [((1, 8, 8), 16, "bf16"), ((3, 8, 8), 16, "fp32")]
    else:  # the configs' batch (128) first: it matters most
        configs = [(s, b, p) for s in [(1, 28, 28), (3, 32, 32)] for b in (128, 32, 512) for p in ("bf16", "fp32")]
    rows = res.setdefault("rows", [])
    state: dict = {}
    res["state"] = state
    budget.last = 4.0
    for shape, batch, precision in configs:
        name = f"{'x'.join(map(str, shape))} b{batch} {precision}"
        row = budget.measure(ctx, rows, name, {"config": name}, 1.3, 0.5,
                             lambda: _graph_config(ctx, shape, batch, precision, state),
                             skipped=f"time cap: {budget.left():.0f} s left, a config took {budget.last:.0f} s",
                             error_chars=200)
        if row is not None and "eager" in row:
            e, pe, g = row["eager"], row["plain_eager"], row["graph"]
            kern = (f"{fmt(e['kernels_per_step'], '.0f')} kernels, busy {fmt(e.get('kernel_busy_ms_per_step'))} ms"
                    if ctx.cuda else f"{fmt(e.get('aten_ops_per_step'), '.0f')} aten ops")
            line = (f"{name}: eager {e['ms_per_step']:.3f} ms/step ({kern}, host issue "
                    f"{e['host_issue_ms_per_step']:.3f} ms), plain eager {pe['ms_per_step']:.3f} ms")
            if isinstance(g, dict):
                line += (f"; graph {g['ms_per_step']:.3f} ms/step ({fmt(g['kernels_per_step'], '.0f')} kernels, "
                         f"weights changed {g['weights_changed']}) -> {row['graph_speedup']:.2f}x "
                         f"[{'project' if 'project' in g['captured'] else 'plain'} step]")
            else:
                line += f"; graph {g}"
            ctx.emit(line)
        if ctx.cuda:
            torch.cuda.empty_cache()
    if ctx.cuda:
        res["project_step_capturable"] = state.get("project_capture_error") is None
        if state.get("project_capture_error"):
            ctx.emit(f"ShardTrainer.step could not be captured: {state['project_capture_error']}")
        # A captured step bakes the learning rate in as a constant: the shard loop sets it every step (cosine
        # schedule), so a graphed loop would need it as a device tensor.
        res["note"] = "lr is a Python float baked into the graph; a graphed loop needs a tensor lr"


# ---------------------------------------------------------------------------------------------- 5. shard loop

def used_sync_every(group: ShardGroup, cfg: Config) -> Any:
    """The mini-batches between exchanges the group ran with: train.sync_every, or what ``auto`` resolved to."""
    return getattr(group, "sync_every", cfg.train.sync_every)


def accepts(overrides: list[str]) -> bool:
    """Whether this version of noprop_dist takes these config overrides (train.sync_every=auto is new)."""
    try:
        load_config(None, overrides)
    except ValueError:  # ConfigError
        return False
    return True


def loop_rate(cfg: Config, data: ImageDataset, blocks: list[int], device: torch.device, epochs: int,
              log: Callable[[str], None]) -> tuple[float, dict]:
    """Block-samples/s of the shard loop over ``epochs`` epochs after one warm-up epoch, and what it reports."""
    group, _ = make_group(cfg, data, blocks, device, log)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    group.train_epoch(0)
    sync(device)
    samples0 = sum(st.samples for st in group.stats.values())
    t0 = time.perf_counter()
    for e in range(1, epochs + 1):
        group.train_epoch(e)
    sync(device)
    rate = (sum(st.samples for st in group.stats.values()) - samples0) / (time.perf_counter() - t0)
    step = sum(st.compute_seconds + st.sync_seconds for st in group.stats.values())
    return rate, {"data_on_device": group.data.on_device, "protocol_share": group.replica.stats.seconds / step,
                  "precision": group.precision, "sync_every_used": used_sync_every(group, cfg),
                  "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def shard_loop(ctx: Ctx, budget: Budget, res: dict) -> None:
    """The shard loop against the plain torch loop (benchmarks/common.py), train.sync_every 1 and 8 (and auto,
    the default, where this version has it: on a GPU it measures the step and picks the cadence itself)."""
    n, nblocks, epochs = (256, 2, 1) if ctx.quick else (6_400, 10, 2)
    data = synthetic_dataset(ctx.shape("1x28x28"), n)
    blocks = list(range(1, nblocks + 1))
    res["setup"] = {"images": n, "shape": ctx.shape("1x28x28"), "blocks": nblocks, "timed_epochs": epochs,
                    "batch_size": 128}
    rows = res.setdefault("rows", [])
    budget.last = 5.0
    for precision in ("bf16", "fp32"):  # bf16 first: precision auto gives it on a GPU
        base = [f"model.num_blocks={nblocks}", f"train.precision={precision}", "model.dropout=0.0"]
        per_epoch = sum(len(b) for b in epoch_batches(load_config(None, base), n, 0)) * nblocks
        plain = None
        cadences: list[Any] = [1, 8] + (["auto"] if accepts([*base, "train.sync_every=auto"]) else [])
        for what in ["plain", *cadences]:
            label = f"{precision} {'plain loop' if what == 'plain' else f'shard loop sync_every {what}'}"

            def run(what: Any = what, label: str = label) -> dict:
                nonlocal plain
                if what == "plain":
                    seconds = plain_loop(load_config(None, base), data, epochs + 1, blocks, ctx.device)
                    plain = per_epoch / (sum(seconds[1:]) / epochs)  # the first epoch warms up
                    ctx.emit(f"{label}: {plain:,.0f} block-samples/s")
                    return {"what": "plain", "block_samples_per_s": plain}
                cfg = load_config(None, [*base, f"train.sync_every={what}"])
                rate, info = loop_rate(cfg, data, blocks, ctx.device, epochs, ctx.emit)
                ctx.emit(f"{label}: {rate:,.0f} block-samples/s"
                         + (f" ({rate / plain:.2f} of plain)" if plain else "")
                         + f", exchanging every {info['sync_every_used']}, protocol "
                         f"{100 * info['protocol_share']:.1f} % of step time, data on device "
                         f"{info['data_on_device']}")
                return {"what": f"shard loop, sync_every {what}", "sync_every": what, "block_samples_per_s": rate,
                        "of_plain": rate / plain if plain else None, **info}

            budget.measure(ctx, rows, label, {"precision": precision, "what": str(what)}, 1.2, 1.0, run)


# ---------------------------------------------------------------------------------------------- 6. Fashion-MNIST

class _StopEpoch(Exception):
    """Raised from the shard loop's per-step callback when the part's time cap nears: the chain is still
    assembled and evaluated from the steps done."""


def _has_fashion(root: str | None) -> bool:
    return bool(root) and all(os.path.isfile(os.path.join(root, f)) or os.path.isfile(os.path.join(root, f + ".gz"))
                              for f in IDX_FILES)


def fashion_mnist(ctx: Ctx, budget: Budget, res: dict) -> None:
    """One Fashion-MNIST epoch of 10 blocks in one process, then the assembled chain evaluated on the device."""
    root = ctx.fashion_root
    if not _has_fashion(root):
        raise Skipped(f"Fashion-MNIST not found in {root!r} (needs {', '.join(f + '.gz' for f in IDX_FILES)}; "
                      "copy them to data/fashion_mnist/ and carry that folder)")
    limits = ["data.train_limit=256", "data.test_limit=100"] if ctx.quick else []
    cfg = load_config("fashion_mnist", [f"data.root={root}", "train.epochs=1", "cluster.num_workers=1", *limits])
    t0 = time.perf_counter()
    data = dataset_for(cfg)
    res["load_seconds"] = time.perf_counter() - t0
    blocks = list(range(1, cfg.model.num_blocks + 1))
    total = len(epoch_batches(cfg, len(data.train_y), 0))
    res.update(train_images=int(len(data.train_y)), test_images=int(len(data.test_y)), blocks=len(blocks),
               batches=total, sampler=cfg.eval.sampler, sync_every_configured=cfg.train.sync_every)
    reserve = 10.0  # kept for the evaluation: a cut epoch is still evaluated
    done = 0

    def on_step() -> None:
        nonlocal done
        done += 1
        if budget.left() < reserve:
            raise _StopEpoch()

    # The config as shipped first (its sync_every may be "auto", which is new); should that fail, once more with
    # an exchange every mini-batch, so that the epoch's time and accuracy are still measured.
    for attempt in range(2):
        group, server = make_group(cfg, data, blocks, ctx.device, ctx.emit)
        done, t0 = 0, time.perf_counter()
        try:
            group.train_epoch(0, on_step=on_step)
        except _StopEpoch:
            res["cut"] = f"time cap: stopped after {done} of {total} mini-batches"
        except Exception as e:
            if attempt == 1 or cfg.train.sync_every == 1 or not budget.affords(3 * reserve):
                raise
            res["error_as_configured"] = brief(e)
            ctx.emit(f"the epoch failed with train.sync_every={cfg.train.sync_every} ({brief(e, 200)}); "
                     "again with train.sync_every=1")
            cfg = load_config("fashion_mnist", [f"data.root={root}", "train.epochs=1", "train.sync_every=1",
                                                "cluster.num_workers=1", *limits])
            continue
        break
    sync(ctx.device)
    res.update(train_seconds=time.perf_counter() - t0, batches_done=done, precision=group.precision,
               data_on_device=group.data.on_device, sync_every_used=used_sync_every(group, cfg),
               block_samples_per_s=sum(st.samples for st in group.stats.values()) / (time.perf_counter() - t0))
    ctx.save()
    ctx.emit(f"trained {done}/{total} mini-batches x {len(blocks)} blocks in {res['train_seconds']:.1f} s "
             f"({res['block_samples_per_s']:,.0f} block-samples/s, {group.precision}, exchanging every "
             f"{res['sync_every_used']}, data on device {group.data.on_device}; load {res['load_seconds']:.1f} s)")
    spec = model_spec(cfg, data.image_shape, data.num_classes)
    chain = assemble_chain(spec, group.state_dicts(), server.state_dict())
    test_x = torch.from_numpy(np.ascontiguousarray(data.test_x))
    test_y = torch.from_numpy(np.asarray(data.test_y))

    def norm(xb: torch.Tensor) -> torch.Tensor:
        return normalize(xb, data.mean, data.std)

    evals = []
    for _ in range(2):  # the first pays cuDNN's and the allocator's start on the device; the second is the rate
        t0 = time.perf_counter()
        acc, _ = evaluate_chain(chain, test_x, test_y, cfg.eval.batch_size, cfg.eval.seed, norm, device=ctx.device)
        sync(ctx.device)
        evals.append({"seconds": time.perf_counter() - t0, "accuracy": acc})
    res.update(eval_seconds_first=evals[0]["seconds"], eval_seconds_second=evals[1]["seconds"],
               test_accuracy=evals[0]["accuracy"], eval_device=str(ctx.device),
               eval_repeatable=evals[0]["accuracy"] == evals[1]["accuracy"])
    ctx.save()
    ctx.emit(f"test accuracy {evals[0]['accuracy']:.4f} ({cfg.eval.sampler}, {len(data.test_y)} images) after "
             f"{res['train_seconds']:.1f} s of training; evaluation on {ctx.device}: {evals[0]['seconds']:.2f} s "
             f"first, {evals[1]['seconds']:.2f} s second")


# ---------------------------------------------------------------------------------------------- 7. processes

def _share_child(rank: int, overrides: list[str], shape: str, n: int, blocks: list[int], device: str,
                 epochs: int, barrier: Any, results: Any, wait_s: float) -> None:
    """One of k processes sharing the device: builds and warms up its blocks, waits at the barrier for the
    others, then trains its timed epochs. Reports its samples and its wall-clock start and end."""
    try:
        torch.set_num_threads(1)  # k processes on 16 cores; each drives the GPU from one thread
        began = time.time()
        cfg = load_config(None, overrides)
        group, _ = make_group(cfg, synthetic_dataset(shape, n), blocks, torch.device(device), lambda s: None)
        group.train_epoch(0)  # warm-up, before the barrier: kernels, cuDNN and the allocator settle
        sync(torch.device(device))
        ready = time.time()
        barrier.wait(timeout=wait_s)
        s0 = sum(st.samples for st in group.stats.values())
        t0 = time.time()
        for e in range(1, epochs + 1):
            group.train_epoch(e)
        sync(torch.device(device))
        t1 = time.time()
        results.put({"rank": rank, "ok": True, "samples": sum(st.samples for st in group.stats.values()) - s0,
                     "t0": t0, "t1": t1, "ready_s": ready - began, "blocks": blocks, "precision": group.precision})
    except BaseException as e:
        try:
            barrier.abort()  # the others stop waiting for this one
        except Exception:
            pass
        results.put({"rank": rank, "ok": False, "error": brief(e)})


def processes(ctx: Ctx, budget: Budget, res: dict) -> None:
    """1, 2, 5 and 10 processes sharing the device (spawned, barrier-aligned): aggregate block-samples/s."""
    n, nblocks, epochs = (256, 2, 1) if ctx.quick else (3_200, 10, 2)
    counts = [1, 2] if ctx.quick else [1, 10, 2, 5]  # 1 and 10 first: the two ends matter most
    # A fixed cadence: with auto each process would pick its own from a step time that the sharing itself
    # changes, and the rows for different k would not compare like with like.
    overrides = [f"model.num_blocks={nblocks}", "train.precision=auto", "model.dropout=0.0", "train.sync_every=8"]
    res["setup"] = {"images": n, "shape": ctx.shape("1x28x28"), "blocks": nblocks, "timed_epochs": epochs,
                    "precision": "auto", "sync_every": 8,
                    "note": "no MPS: the processes' CUDA contexts time-slice the GPU"}
    rows = res.setdefault("rows", {})
    mpc = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    need = 20.0
    for k in counts:
        if not budget.affords(need):
            rows[str(k)] = {"skipped": f"time cap: {budget.left():.0f} s left, the last count took {need:.0f} s"}
            ctx.emit(f"{k} processes: skipped (time cap)")
            ctx.save()
            continue
        t_start = time.monotonic()
        groups = [[int(t) for t in g] for g in np.array_split(np.arange(1, nblocks + 1), k)]
        barrier, results = mpc.Barrier(k), mpc.Queue()
        wait_s = max(budget.left() - 5, 5)
        child_args = [(r, overrides, ctx.shape("1x28x28"), n, g, str(ctx.device), epochs, barrier, results, wait_s)
                      for r, g in enumerate(groups)]
        procs = [mpc.Process(target=_share_child, args=a, daemon=True) for a in child_args]
        got: list[dict] = []
        try:
            for p in procs:
                p.start()
            while len(got) < k:
                left = budget.left()
                if left <= 0:
                    raise Cut(f"time cap reached with {len(got)} of {k} processes reported")
                try:
                    got.append(results.get(timeout=min(left, 5)))
                except queue_mod.Empty:
                    if any(p.exitcode not in (None, 0) for p in procs):
                        barrier.abort()  # a child died without reporting: the others stop waiting for it
                    if not any(p.is_alive() for p in procs) and results.empty():
                        raise RuntimeError(f"processes exited with {[p.exitcode for p in procs]}, "
                                           f"{len(got)} of {k} reported") from None
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():  # only this part's own children, past the time cap
                    p.terminate()
            took = time.monotonic() - t_start
            need = 1.3 * took
        bad = [g for g in got if not g["ok"]]
        if bad:
            rows[str(k)] = {"error": bad[0]["error"], "seconds": took}
            ctx.emit(f"{k} processes: error {bad[0]['error'][:200]}")
            ctx.save()
            continue
        span = max(g["t1"] for g in got) - min(g["t0"] for g in got)
        agg = sum(g["samples"] for g in got) / span
        per = [g["samples"] / (g["t1"] - g["t0"]) for g in sorted(got, key=lambda g: g["rank"])]
        rows[str(k)] = {"aggregate_block_samples_per_s": agg, "per_process": per, "timed_span_s": span,
                        "start_spread_s": max(g["t0"] for g in got) - min(g["t0"] for g in got),
                        "startup_s": max(g["ready_s"] for g in got), "seconds": took,
                        "precision": got[0]["precision"]}
        ctx.save()
        ctx.emit(f"{k} process{'es' if k > 1 else ''} sharing {ctx.device}: {agg:,.0f} block-samples/s aggregate "
                 f"(per process {', '.join(f'{r:,.0f}' for r in per)}; start spread "
                 f"{1e3 * rows[str(k)]['start_spread_s']:.0f} ms; startup {rows[str(k)]['startup_s']:.1f} s)")
    base = rows.get("1", {}).get("aggregate_block_samples_per_s")
    if base:
        res["relative_to_1"] = {k: r["aggregate_block_samples_per_s"] / base for k, r in rows.items()
                                if "aggregate_block_samples_per_s" in r}


# ---------------------------------------------------------------------------------------------- 8. vmap

def _vmap_case(ctx: Ctx, nblocks: int, batch: int, precision: str, target: float) -> dict:
    """Fig. 6 DT blocks 1..B forward+backward on one batch: one after another against torch.func.vmap over
    their stacked weights. Each block gets its own noise level (its z), all share the images."""
    dev = ctx.device
    cfg = load_config(None, ["model.num_blocks=10", "model.dropout=0.0"])
    shape = tuple(int(v) for v in ctx.shape("1x28x28").split("x"))
    spec = model_spec(cfg, shape, 10)
    bf16 = precision == "bf16"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
    embed = (torch.randn(10, spec.embed_dim, generator=gen) / spec.embed_dim**0.5).to(dev)
    u = embed[y]
    abar = DTSchedule.cosine(10, spec.abar_max).abar_values
    z = torch.stack([math.sqrt(abar[t % 10]) * u + math.sqrt(1 - abar[t % 10]) *
                     torch.randn(u.shape, generator=gen).to(dev) for t in range(nblocks)])  # (B, N, d)

    def losses(logits: torch.Tensor) -> torch.Tensor:
        """(..., N, m) logits -> (...) each block's denoising error, as core.losses.block_loss forms it."""
        return (torch.softmax(logits.float(), -1) @ embed - u).pow(2).sum(-1).mean(-1)

    models = [build_shard(spec, t + 1, 0).to(dev) for t in range(nblocks)]
    params, buffers = torch.func.stack_module_state(models)  # copies: the two variants train apart
    base = copy.deepcopy(models[0]).to("meta")

    def one(p: dict, b: dict, zt: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(base, (p, b), (zt, xx))

    batched = torch.func.vmap(one, in_dims=(0, 0, 0, None), randomness="different")

    name = next(n for n, _ in models[0].named_parameters())

    def seq_grads(autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequential blocks' losses and the gradients of weight ``name`` (B, ...), from cleared gradients."""
        for m in models:
            for p in m.parameters():
                p.grad = None
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            out = torch.stack([losses(m(z[t], x)) for t, m in enumerate(models)])
        out.sum().backward()
        return out.detach(), torch.stack([dict(m.named_parameters())[name].grad for m in models])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))

    def vmap_forward() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            return losses(batched(params, buffers, z, x))

    # Same function first: the first step's per-block losses and one weight's gradients of the two variants.
    ls, g_seq = seq_grads(bf16)
    lv = vmap_forward()
    lv.sum().backward()
    check = {"loss_rel_diff": rel(lv.detach(), ls), "grad_rel_diff": rel(params[name].grad, g_seq), "grad_of": name}
    if bf16:  # bf16 alone moves that gradient (the sequential blocks against fp32): the scale to judge it by
        check["bf16_noise_grad_rel_diff"] = rel(g_seq, seq_grads(False)[1])

    def seq_step(i: int) -> None:
        for m in models:
            for p in m.parameters():
                p.grad = None
        for t, m in enumerate(models):  # one after another: each block's forward then its backward
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                out = losses(m(z[t], x))
            out.backward()

    def vmap_step(i: int) -> None:
        for p in params.values():
            p.grad = None
        vmap_forward().sum().backward()

    seq = time_steps(seq_step, dev, target, **ctx.timing())
    vm = time_steps(vmap_step, dev, target, **ctx.timing())
    return {"blocks": nblocks, "batch": batch, "precision": precision, "sequential_ms": seq["ms_per_step"],
            "vmap_ms": vm["ms_per_step"], "vmap_speedup": seq["ms_per_step"] / vm["ms_per_step"],
            "winner": "vmap" if vm["ms_per_step"] < seq["ms_per_step"] else "sequential", "check": check,
            "sequential_host_issue_ms": seq["host_issue_ms_per_step"],
            "vmap_host_issue_ms": vm["host_issue_ms_per_step"]}


def vmap_blocks(ctx: Ctx, budget: Budget, res: dict) -> None:
    """B = 5 and 10 Fig. 6 blocks batched with torch.func.vmap against one after another."""
    cases = ([(2, 8, "fp32")] if ctx.quick else
             [(b, n, p) for n in (128, 32) for p in ("bf16", "fp32") for b in (5, 10)])
    rows = res.setdefault("rows", [])
    budget.last = 3.0
    for nblocks, batch, precision in cases:
        name = f"B={nblocks} batch {batch} {precision}"
        row = budget.measure(ctx, rows, name, {"case": name}, 1.3, 0.5,
                             lambda: _vmap_case(ctx, nblocks, batch, precision, 0.0 if ctx.quick else 0.25))
        if row is not None and "winner" in row:
            c = row["check"]
            noise = (f"; bf16 itself moves the grad {c['bf16_noise_grad_rel_diff']:.1e}"
                     if "bf16_noise_grad_rel_diff" in c else "")
            ctx.emit(f"{name}: sequential {row['sequential_ms']:.2f} ms, vmap {row['vmap_ms']:.2f} ms per forward+"
                     f"backward -> vmap at {row['vmap_speedup']:.2f}x of sequential speed, {row['winner']} wins "
                     f"(same function: loss rel diff {c['loss_rel_diff']:.1e}, grad {c['grad_rel_diff']:.1e}{noise})")
        if ctx.cuda:
            torch.cuda.empty_cache()
    won = Counter(r["winner"] for r in rows if "winner" in r)
    res["verdict"] = (f"vmap wins {won['vmap']} of {sum(won.values())} cases on {ctx.device}" if won
                      else "no case measured")
    ctx.emit(res["verdict"])


# The parts in order: (name, function, time cap in seconds on one H100; gpu_check.sh's timeouts wrap them).
PARTS: list[tuple[str, Callable[[Ctx, Budget, dict], None], float]] = [
    ("environment", environment, 10),
    ("portability", portability, 30),
    ("sync_audit", sync_audit, 30),
    ("graphs", graphs, 70),
    ("shard_loop", shard_loop, 55),
    ("fashion_mnist", fashion_mnist, 60),
    ("processes", processes, 70),
    ("vmap", vmap_blocks, 30),
]
