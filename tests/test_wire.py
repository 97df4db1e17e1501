"""What crosses between Ray's processes: the states gathered at an epoch's end travel as numpy buffers (out of
band, which Ray's object store carries without pickling them) and come back equal, in their dtype and in their
memory layout."""
import pickle

import torch

from noprop_dist.distributed.wire import state_from_wire, state_to_wire


def _through_pickle5(obj):
    """``obj`` pickled as Ray pickles a task's result (protocol 5, buffers out of band) and read back."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=buffers), buffers


def test_a_state_comes_back_equal_in_dtype_and_layout_and_travels_out_of_band():
    """Bug seen: tensors sent contiguous came back in the standard layout; a channels-last weight's AdamW moments
    then came back in another layout than the weight, and the fused step, which walks memory in order, updated
    them against the wrong elements (runs resumed from such a checkpoint differed from uninterrupted ones)."""
    state = {1: {"block": {"conv": torch.randn(8, 3, 5, 5).contiguous(memory_format=torch.channels_last),
                           "bias": torch.randn(8).to(torch.bfloat16),
                           "num_batches_tracked": torch.tensor(7)},
                 "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(6, 4)[:, :2]}},
                               "param_groups": [{"lr": 0.1, "params": [0]}]},
                 "generator": torch.ByteTensor([1, 2, 3]), "empty": torch.empty(0, 3),
                 "nonfinite": {"events": 0, "stopped": ""}}}
    back, buffers = _through_pickle5(state_to_wire(state))
    back = state_from_wire(back)
    assert len(buffers) == 7, "every tensor's bytes travel out of band"
    tensors = [("block", "conv"), ("block", "bias"), ("block", "num_batches_tracked"), ("generator",), ("empty",)]
    for path in tensors + [("optimizer", "state", 0, "step"), ("optimizer", "state", 0, "exp_avg")]:
        a, b = state[1], back[1]
        for key in path:
            a, b = a[key], b[key]
        assert torch.equal(a, b) and a.dtype == b.dtype and a.shape == b.shape, path
    conv = back[1]["block"]["conv"]
    assert conv.stride() == state[1]["block"]["conv"].stride()
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert back[1]["optimizer"]["param_groups"] == state[1]["optimizer"]["param_groups"]
    assert back[1]["nonfinite"] == state[1]["nonfinite"]
    conv.add_(1)  # its own memory, writable (not Ray's read-only buffer)
