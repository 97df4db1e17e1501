"""The shards' AdamW against torch's AdamW(fused=True): the same numbers, the same state dicts, each loading the
other's; and a process that trains shards never imports torch._dynamo (the reason the class exists)."""
import io
import subprocess
import sys

import pytest
import torch

from noprop_dist.training.optimizer import FusedAdamW


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(4, 3, 3, 3, generator=g).to(memory_format=torch.channels_last)
    return [conv.requires_grad_(), torch.randn(4, generator=g).requires_grad_(),
            torch.randn(5, 2, generator=g).requires_grad_()]


def _step(opt, params: list[torch.Tensor], k: int, bad: bool = False, skip_last: bool = False) -> None:
    """One step on gradients fixed by ``k`` (the last parameter without one if ``skip_last``); skipped if bad."""
    g = torch.Generator().manual_seed(100 + k)
    opt.zero_grad(set_to_none=True)
    for p in params[:-1] if skip_last else params:
        p.grad = torch.randn(p.shape, generator=g) * (k + 1)
    opt.found_inf = torch.tensor(1.0 if bad else 0.0)
    opt.step()


def _same_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for k, v in a["state"][i].items():
            assert v.dtype == b["state"][i][k].dtype and torch.equal(v, b["state"][i][k]), (i, k)


def test_the_same_steps_and_state_dicts_as_torchs_fused_adamw_and_each_loads_the_others():
    ours_p, torch_p = _params(0), _params(0)
    ours = FusedAdamW(ours_p, lr=1e-3, weight_decay=1e-2)
    ref = torch.optim.AdamW(torch_p, lr=1e-3, weight_decay=1e-2, fused=True)
    plan = [dict(), dict(skip_last=True), dict(bad=True), dict(), dict()]
    for k, kw in enumerate(plan):
        if k == 3:  # the lr schedule's way of changing it
            for opt in (ours, ref):
                opt.param_groups[0]["lr"] = 3e-4
        _step(ours, ours_p, k, **kw)
        _step(ref, torch_p, k, **kw)
        for a, b in zip(ours_p, torch_p):
            assert torch.equal(a, b), f"step {k}"
    _same_state(ours.state_dict(), ref.state_dict())
    assert float(ours.state[0]["step"]) == 4 and float(ours.state[2]["step"]) == 3  # the skipped step not counted

    # A checkpoint of either optimizer goes on in the other exactly as in its own kind.
    for source, source_p in ((ref, torch_p), (ours, ours_p)):
        mine_p = [p.detach().clone().requires_grad_() for p in source_p]
        theirs_p = [p.detach().clone().requires_grad_() for p in source_p]
        mine = FusedAdamW(mine_p, lr=1.0, weight_decay=0.0)
        theirs = torch.optim.AdamW(theirs_p, lr=1.0, weight_decay=0.0, fused=True)
        mine.load_state_dict(torch.load(_roundtrip(source.state_dict()), weights_only=True))
        theirs.load_state_dict(torch.load(_roundtrip(source.state_dict()), weights_only=True))
        for k in (5, 6):
            _step(mine, mine_p, k)
            _step(theirs, theirs_p, k)
        for a, b in zip(mine_p, theirs_p):
            assert torch.equal(a, b)


def _roundtrip(state: dict) -> io.BytesIO:
    """``state`` as torch.save writes it to a checkpoint file, ready for torch.load."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_a_state_dict_of_other_parameters_is_refused_naming_both_counts():
    saved = FusedAdamW(_params(0), lr=1e-3, weight_decay=0.0).state_dict()
    with pytest.raises(ValueError, match=r"holds \[3\] parameters .* has 2"):
        FusedAdamW(_params(0)[:2], lr=1e-3, weight_decay=0.0).load_state_dict(saved)


def test_training_shards_in_a_fresh_process_does_not_import_torch_dynamo():
    """torch.optim's Optimizer imports torch._dynamo on its first use, about a CPU-second in every worker process
    a run starts (each run and each restart starts new ones)."""
    program = """
import sys
from noprop_dist.config import load_config
from noprop_dist.data import load_dataset
from noprop_dist.training import train_in_process
cfg = load_config(None, ["model.num_blocks=2", "train.epochs=1", "data.train_limit=128", "data.test_limit=32",
                         "train.batch_size=64"])
train_in_process(cfg, load_dataset("digits", train_limit=128, test_limit=32))
print("torch._dynamo" in sys.modules)
"""
    p = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "False", p.stdout
