"""The shards' optimizer: AdamW with torch's fused kernel, without torch.optim's Optimizer class.

Every method of ``torch.optim.Optimizer`` that a training step goes through (its constructor, ``step``,
``zero_grad``, ``state_dict``) imports ``torch._dynamo`` on its first call, in case it runs under
``torch.compile``: about a CPU-second in every process that builds one. Each run starts a new process per worker,
and so does each restart; the steps here never run under ``torch.compile``. So this class calls the same kernel
as ``torch.optim.AdamW(fused=True)`` (``torch._fused_adamw_``) and keeps its state in torch's state-dict format:
the numbers are torch's bit for bit, and a checkpoint written by either loads into the other.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


class FusedAdamW:
    """AdamW over one group of parameters, as ``torch.optim.AdamW(params, lr, weight_decay=..., fused=True)``.

    ``found_inf``: set it (a 0-d float tensor on the parameters' device, 1 or 0) before :meth:`step` to have the
    step skip itself on the device when it is 1, as torch's fused optimizers do with ``GradScaler``. Set
    ``param_groups[0]["lr"]`` to change the learning rate.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        # The keys and defaults torch's AdamW(fused=True) writes in a state dict, so that each loads the other's.
        self.param_groups = [{"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": False,
                              "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                              "fused": True, "decoupled_weight_decay": True}]
        self.state: dict[int, dict[str, torch.Tensor]] = {}  # parameter index -> step, exp_avg, exp_avg_sq
        self.found_inf: torch.Tensor | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step of every parameter with a gradient (the others, and their state, are left alone)."""
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        # torch's kernel takes lists of tensors on one device and of one dtype.
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            if p.grad is not None:
                by_kind.setdefault((p.device, p.dtype), []).append(i)
        for (device, _), indices in by_kind.items():
            states = [self._state(i) for i in indices]
            steps = [s["step"] for s in states]
            found_inf = None if self.found_inf is None else self.found_inf.to(device, non_blocking=True)
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                [self.params[i] for i in indices], [self.params[i].grad for i in indices],
                [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [], steps,
                amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                eps=group["eps"], maximize=False, grad_scale=None, found_inf=found_inf)
            if found_inf is not None:  # a skipped step does not count
                torch._foreach_sub_(steps, [found_inf] * len(steps))

    def _state(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self.state:
            p = self.params[i]
            self.state[i] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                             "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return self.state[i]

    def state_dict(self) -> dict:
        """torch.optim's format: {"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}
        (the tensors themselves, not copies, as torch returns them)."""
        return {"state": {i: dict(s) for i, s in self.state.items()},
                "param_groups": [self.param_groups[0] | {"params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Take a state dict of this class or of torch's AdamW over the same parameters, in the same order."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"the optimizer state holds {[len(g['params']) for g in groups]} parameters in "
                             f"{len(groups)} groups; this optimizer has {len(self.params)} in one")
        self.param_groups = [{k: v for k, v in groups[0].items() if k != "params"}]
        self.state = {}
        for i, saved in state_dict["state"].items():
            p = self.params[int(i)]
            # As torch places a loaded state: the step count in float32, the moments as the parameter is.
            self.state[int(i)] = {k: v.to(dtype=torch.float32, device=p.device) if k == "step"
                                  else v.to(dtype=p.dtype, device=p.device) for k, v in saved.items()}
