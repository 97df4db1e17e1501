"""What the hardware a process runs on decides: the precision its shards run in, how often it exchanges with
the parameter server (train.sync_every: auto), its peak memory."""
from __future__ import annotations

import math
import resource
import warnings
from typing import Any

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls and convolutions in hardware: a CUDA GPU from compute capability 8.0
    (Ampere) on or a ROCm GPU, or a CPU with AVX512-BF16 or AMX. Elsewhere torch emulates bf16, slower than
    fp32 (several times on a CPU)."""
    if device.type == "cuda":
        try:
            # Asked plainly (including_emulation defaults to True), torch also answers True on a GPU that only
            # emulates bf16 (Volta, Turing: compute capability 7.x), where autocast to bf16 would slow training.
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a torch whose is_bf16_supported takes no argument: decide as the argument would
            return _native_bf16_gpu(device)
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


def _native_bf16_gpu(device: torch.device) -> bool:
    """``is_bf16_supported(including_emulation=False)`` for a torch without that argument: ROCm GPUs compute
    bf16 natively; NVIDIA ones from compute capability 8.0 (Ampere) on. The plain call alone is not enough:
    torch 2.3 answers True wherever a bf16 tensor can be made, emulated or not."""
    if not torch.cuda.is_bf16_supported():
        return False
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision as the shards on ``device`` run it: "bf16" or "fp32" ("auto": bf16 where native).

    An explicit bf16 on a device without native bf16 is kept (the user asked for it) with a warning, since
    there it is slower than fp32, not faster."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        warnings.warn(f"train.precision=bf16 on {device}, which has no native bf16 (no AVX512-BF16 or AMX on a "
                      "CPU): torch emulates it, slower than fp32; set train.precision=auto or fp32", stacklevel=2)
    return precision


# train.sync_every: auto on a GPU (auto_sync_every). A worker with B shards, block step time tau and sync_every S
# exchanges every S x B x tau seconds; one server core, spending c seconds of CPU per exchange, then serves
# G_max = S x B x tau / c such workers (benchmarks/README.md, "What a cluster of G GPUs needs"). Aiming every
# worker's exchange interval at 50 ms puts G_max near 35 GPUs for learned embeddings (c about 1.4 ms): one node's
# GPUs use a fraction of one server core. Prototypes (c about 6 ms, a state of megabytes) reach it near 8 GPUs;
# larger clusters with them set train.sync_every higher by hand. Longer would buy server headroom with
# staleness: the replicas drift apart by up to three intervals of another worker's training (the sync bound,
# 3 x S x B block steps per worker), 0.15 s here.
AUTO_EXCHANGE_INTERVAL_S = 0.05
# The cap bounds that staleness, and how late a non-finite loss is noticed (losses are read back per exchange),
# when a mini-batch's block steps take under 50 ms / 64, about 0.8 ms.
MAX_AUTO_SYNC_EVERY = 64


def auto_sync_every(tau_s: float, shards: int, device_type: str) -> int:
    """train.sync_every for ``auto``: mini-batches between a worker's exchanges with the parameter server.

    tau_s: the measured time of one block step (seconds); shards: the blocks the worker steps per mini-batch;
    device_type: its torch device type. On a GPU ("cuda"): the smallest S with S x shards x tau_s >=
    AUTO_EXCHANGE_INTERVAL_S, in [1, MAX_AUTO_SYNC_EVERY]. Elsewhere 1: a CPU block step takes tens to hundreds of
    milliseconds, so every mini-batch is already an interval the server hardly notices, and the protocol stays
    as it was (runs repeat bit for bit whatever the timing).
    """
    if device_type != "cuda":
        return 1
    stretch = shards * tau_s  # one mini-batch: a step of each shard
    if not stretch > 0:  # no shard stepped (all stopped), or a clock that did not move: nothing to pace
        return MAX_AUTO_SYNC_EVERY
    return min(MAX_AUTO_SYNC_EVERY, math.ceil(AUTO_EXCHANGE_INTERVAL_S / stretch))  # a positive ratio's ceil >= 1


def on_host(state: Any) -> Any:
    """``state`` (nested dicts, lists and tuples of tensors and plain values) with every tensor copied to the
    CPU: what leaves a worker (checkpoints, optimizer and replica states) must unpickle on a driver or a head
    node that has no GPU and no CUDA. Tensors already on the CPU are returned as they are, not copied."""
    if isinstance(state, torch.Tensor):
        return state if state.device.type == "cpu" and type(state) is torch.Tensor else state.cpu()
    if isinstance(state, dict):
        return {k: on_host(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_host(v) for v in state)
    return state


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
