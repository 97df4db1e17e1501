"""What crosses between Ray's processes, in the forms that Ray moves cheaply: numpy arrays, whose buffers its
object store carries without pickling them. torch's own pickling of a tensor writes a serialized copy of it
(torch.save into bytes) and reads it back on the other side: several times the cost of a memory copy, paid on
the path the workers wait on (the parameter server's exchanges; the states gathered at every epoch's end)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from ..training.shared_state import Round, Snapshot

# A flat float32 vector on the wire: bytes when small (cheaper to pickle than an array); a numpy array when
# large (Ray passes its buffer without pickling); for a state answered to many workers, [a reference to it in
# the object store] (put once, read there by every worker).
Wire = bytes | np.ndarray | list
WireSnapshot = tuple[int, Wire, Round, str]  # (version, state, holds, incarnation)
INLINE_BYTES = 100 * 1024  # Ray's own limit for passing an object inline with a call


def to_wire(flat: torch.Tensor, put: bool = False) -> Wire:
    array = flat.detach().cpu().numpy()
    if array.nbytes <= INLINE_BYTES:
        return array.tobytes()
    return [ray.put(array)] if put else array


def from_wire(wire: Wire) -> torch.Tensor:
    """The flat tensor, sharing memory with what Ray delivered (read-only: it is only ever read)."""
    if isinstance(wire, list):
        wire = ray.get(wire[0])
    array = np.frombuffer(wire, dtype=np.float32) if isinstance(wire, bytes) else wire
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about read-only arrays
        return torch.from_numpy(array)


def snapshot_from_wire(wire: WireSnapshot) -> Snapshot:
    version, flat, holds, incarnation = wire
    return Snapshot(version, from_wire(flat), tuple(holds), incarnation)


@dataclass(frozen=True)
class TensorOnWire:
    """A CPU tensor as it travels: its bytes in memory order (uint8, any dtype, bfloat16 included, which numpy
    lacks), its dtype, and its shape in that order (``order``: the dimensions from the largest stride down)."""

    data: np.ndarray
    dtype: torch.dtype
    shape: tuple[int, ...]
    order: tuple[int, ...]


def _tensor_to_wire(t: torch.Tensor) -> TensorOnWire:
    # Memory order kept: a channels-last weight comes back channels-last, and so do its AdamW moments, which
    # torch's fused AdamW steps element by element in memory order (a moment in another layout than its weight
    # would be updated against the wrong elements).
    order = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    in_order = t.detach().permute(order)
    if not in_order.is_contiguous():  # not dense (a strided view): sent as a contiguous copy
        order, in_order = tuple(range(t.dim())), t.detach().contiguous()
    return TensorOnWire(in_order.reshape(-1).view(torch.uint8).numpy(), t.dtype, tuple(in_order.shape), order)


def state_to_wire(state: Any) -> Any:
    """``state`` (nested dicts, lists and tuples of CPU tensors and plain values: a checkpoint's states) with
    every tensor as a :class:`TensorOnWire`, sharing the tensor's memory until Ray copies it out."""
    if isinstance(state, torch.Tensor):
        return _tensor_to_wire(state)
    if isinstance(state, dict):
        return {k: state_to_wire(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(state_to_wire(v) for v in state)
    return state


def state_from_wire(state: Any) -> Any:
    """Inverse of :func:`state_to_wire`: tensors of their own (writable) memory, copied out of Ray's read-only
    buffers."""
    if isinstance(state, TensorOnWire):
        in_order = (torch.from_numpy(state.data.copy()).view(state.dtype).reshape(state.shape) if state.data.size
                    else torch.empty(state.shape, dtype=state.dtype))
        return in_order.permute(sorted(range(len(state.order)), key=state.order.__getitem__))
    if isinstance(state, dict):
        return {k: state_from_wire(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(state_from_wire(v) for v in state)
    return state
