"""What the hardware a process runs on decides: the precision its shards run in, its peak memory."""
from __future__ import annotations

import resource
import warnings
from typing import Any

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls and convolutions in hardware: a CUDA GPU that supports bf16, or a
    CPU with AVX512-BF16 or AMX. Elsewhere torch emulates bf16 on the CPU, several times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


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
