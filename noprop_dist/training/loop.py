"""Training of one process's shards, the same code for a Ray worker and for the in-process reference run.

A *shard group* is the set of blocks one process trains; it visits them in turn on every mini-batch
(round-robin), so all its blocks progress together and the shared state hears from each of them.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..config import TrainConfig
from ..core import ModelSpec, build_shard
from ..core.blocks import prefers_channels_last
from ..core.seeds import block_noise_seed, epoch_order_seed, global_rng_seed
from ..data import normalize
from ..registry import get_method
from .assignment import replica_key
from .hardware import auto_sync_every, on_host, resolve_precision
from .optimizer import FusedAdamW
from .shared_state import SharedReplica, SharedStateClient, SyncEveryChoice

# train.sync_every=auto on a GPU: the first mini-batches of the run exchange every batch (as on a CPU) while the
# block step time is measured; the first WARMUP ones are left out (CUDA's lazy start, cuDNN's algorithm search,
# the caching allocator's growth), the next TIMED ones are timed, each between two device synchronisations.
AUTO_WARMUP_BATCHES = 2
AUTO_TIMED_BATCHES = 4
AUTO_MEASURED_BATCHES = AUTO_WARMUP_BATCHES + AUTO_TIMED_BATCHES


def lr_schedule_factor(train: TrainConfig, progress: float) -> float:
    """train.lr_schedule's learning-rate factor after ``progress`` epochs (a float, epoch + fraction done):
    constant 1; cosine: a linear warm-up over train.warmup_epochs, then half a cosine from 1 to 0 at
    train.epochs, so the last updates are small and the chain as evaluated is not caught mid-oscillation."""
    if train.lr_schedule == "constant":
        return 1.0
    if progress < train.warmup_epochs:
        return max(progress / train.warmup_epochs, 1e-3)
    span = max(train.epochs - train.warmup_epochs, 1e-9)
    return 0.5 * (1 + math.cos(math.pi * min((progress - train.warmup_epochs) / span, 1.0)))


def nonfinite(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """1.0 if the loss or any gradient of ``params`` is NaN or infinite, else 0.0: a 0-d float tensor on the
    device, never read back here (no host sync per step).

    One fused kernel over every tensor: the check torch.amp.GradScaler runs before an optimizer step (with a
    scale of 1 it leaves the gradients as they are).
    """
    found = torch.zeros((), device=loss.device)
    tensors = [loss.detach().float().reshape(1), *(p.grad for p in params if p.grad is not None)]
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones((), device=loss.device))
    return found


class ShardTrainer:
    """Shard t's network (a DT block or a CT/FM time interval's network), its own AdamW and its own noise
    generator: everything the shard owns. ``spec.method`` picks the network and the loss (registry.METHODS)."""

    def __init__(self, spec: ModelSpec, t: int, train: TrainConfig, device: torch.device) -> None:
        self.spec, self.t, self.device = spec, t, device
        self.block = build_shard(spec, t, train.seed).to(device)
        self.loss = get_method(spec.method).shard_loss  # resolved once here, not on every step
        # The conv weights' layout decides the layout of the activations they produce (core.blocks).
        self.channels_last = prefers_channels_last(self.block)
        if self.channels_last:
            self.block = self.block.to(memory_format=torch.channels_last)
        self.params = list(self.block.parameters())
        # fused: the step takes ``found_inf`` and skips itself on the device (see ``step``).
        self.optimizer = FusedAdamW(self.params, lr=train.lr, weight_decay=train.weight_decay)
        self.base_lr = train.lr
        self.generator = torch.Generator(device=device).manual_seed(block_noise_seed(train.seed, t))
        self.precision = resolve_precision(train.precision, device)
        self.bf16 = self.precision == "bf16"

    def step(self, x: torch.Tensor, y: torch.Tensor, replica: SharedReplica) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of the block, and of the worker's shared-state replica, on (x (B,C,H,W), y (B,)).

        Returns (loss, found_inf) as 0-d tensors on the device, left there: the caller reads them back in
        batches. When the loss or any gradient is not finite, both optimizers skip the step on the device
        (``found_inf`` = 1): a NaN reaches neither this block's weights nor the shared state.
        """
        self.block.train()
        replica.zero_grad()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            total, _ = self.loss(self.block, replica.shared, self.spec, self.t, x, y, self.generator)
        total.backward()
        found_inf = nonfinite(total, [*self.params, *replica.params.values()])
        self.optimizer.found_inf = found_inf
        self.optimizer.step()
        replica.step(found_inf)
        return total.detach(), found_inf

    def set_lr(self, factor: float) -> float:
        """Learning rate = train.lr x ``factor`` (the lr schedule's times the non-finite cut); returns it."""
        lr = self.base_lr * factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {
            "block": self.block.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.block.load_state_dict(state["block"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


# ShardStats' counters of the whole run: checkpointed with each shard, so that a resumed or restarted run's
# summary counts every step its weights took (the steps redone after a restart once, as the weights do).
RUN_COUNTERS = ("total_steps", "samples", "compute_seconds", "sync_seconds")


@dataclass
class ShardStats:
    """Counters of one shard over the run: progress, throughput, compute vs parameter-server time."""

    shard: int
    epochs_done: int = 0
    step: int = 0  # steps done in the epoch under way (0 between epochs)
    steps_per_epoch: int = 0
    total_steps: int = 0
    samples: int = 0
    compute_seconds: float = 0.0
    sync_seconds: float = 0.0
    loss: float = float("nan")
    loss_ema: float = float("nan")
    epoch_loss_sum: float = 0.0
    last_epoch_mean_loss: float = float("nan")
    nonfinite_events: int = 0
    stopped: str = ""  # why the shard stopped training (empty while it trains)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.compute_seconds if self.compute_seconds > 0 else 0.0

    def record(self, loss: float, batch: int, compute_s: float, sync_s: float = 0.0) -> None:
        """One finite step; the shard loop adds its share of each exchange to ``sync_seconds`` separately."""
        self.step += 1
        self.total_steps += 1
        self.samples += batch
        self.compute_seconds += compute_s
        self.sync_seconds += sync_s
        self.loss = loss
        self.epoch_loss_sum += loss
        self.loss_ema = loss if math.isnan(self.loss_ema) else 0.9 * self.loss_ema + 0.1 * loss

    def start_epoch(self, steps: int) -> None:
        self.step, self.steps_per_epoch, self.epoch_loss_sum = 0, steps, 0.0

    def end_epoch(self) -> None:
        if self.stopped:  # its steps stopped counting; report the epoch as gone through
            self.step = self.steps_per_epoch
        self.last_epoch_mean_loss = self.epoch_loss_sum / self.step if self.step else float("nan")
        self.epochs_done += 1
        self.step = 0

    def as_dict(self) -> dict:
        """The counters as metrics.jsonl and the progress lines read them: the shard under its shipped key
        ``block``."""
        d = asdict(self)
        return {"block": d.pop("shard"), **d, "samples_per_second": self.samples_per_second}


class TrainingData:
    """The training set where the shard loop gathers its batches: on the GPU when it fits there, else on the
    host (the CPU: a zero-copy view of the arrays, e.g. of Ray's object store).

    x: uint8 (N, C, H, W), y: int64 (N,). ``batch(idx)`` gathers, normalises and moves one mini-batch.
    """

    # On a GPU the set may take this share of the free memory; the blocks' activations need the rest.
    GPU_SHARE = 0.5

    def __init__(self, train_x: np.ndarray, train_y: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device, channels_last: bool = True) -> None:
        self.device, self.channels_last = device, channels_last
        with warnings.catch_warnings():  # a read-only view (the object store's); it is never written
            warnings.simplefilter("ignore", UserWarning)
            x, y = torch.from_numpy(train_x), torch.from_numpy(np.asarray(train_y, dtype=np.int64))
        fits = device.type == "cuda" and x.nbytes + y.nbytes <= self.GPU_SHARE * torch.cuda.mem_get_info(device)[0]
        self.where = device if (device.type == "cpu" or fits) else torch.device("cpu")
        self.x, self.y = x.to(self.where), y.to(self.where)
        c = x.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, c, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, c, 1, 1)

    @property
    def on_device(self) -> bool:
        return self.where == self.device

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx: (B,) int64 on ``self.where`` -> (normalised float images (B, C, H, W), labels (B,)) on the device;
        channels last for blocks that convolve them (core.blocks.prefers_channels_last)."""
        x = self.x.index_select(0, idx).to(self.device, non_blocking=True)
        y = self.y.index_select(0, idx).to(self.device, non_blocking=True)
        x = normalize(x, self.mean, self.std)
        return (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y


@dataclass
class ShardGroup:
    """The blocks one process trains, with its replica of the shared state (``training.shared_state.SharedReplica``).

    train_x: uint8 (N, C, H, W) (read-only, possibly a zero-copy view of Ray's object store), train_y: (N,).
    Every ``train.sync_every`` mini-batches the group exchanges with the parameter server; losses and
    non-finite flags are read back from the device then, in one batch. ``auto`` is 1 on a CPU; on a GPU the
    group measures its block step time over its first mini-batches and the run takes the first worker's
    :func:`~.hardware.auto_sync_every` from the server (:meth:`sync_every`, :meth:`cadence`).
    """

    spec: ModelSpec
    shard_ids: list[int]
    train: TrainConfig
    train_x: np.ndarray
    train_y: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    client: SharedStateClient
    device: torch.device = torch.device("cpu")
    log: Callable[[str], None] = print  # in a Ray worker, print reaches the driver's log
    # Whether sync_every=auto is agreed through the server (measured on GPUs): a run-wide decision, so that every
    # worker of a run takes the same exchange cadence, a CPU worker in a run with GPU workers too (alone, its
    # every-batch cadence would leave them waiting at the epoch's end for rounds it never pushes). None: decided
    # by this group's device (cuda).
    paced: bool | None = None
    trainers: dict[int, ShardTrainer] = field(init=False)
    stats: dict[int, ShardStats] = field(init=False)

    def __post_init__(self) -> None:
        self.trainers = {t: ShardTrainer(self.spec, t, self.train, self.device) for t in self.shard_ids}
        self.stats = {t: ShardStats(shard=t) for t in self.shard_ids}
        self.replica = SharedReplica(self.spec, self.train, self.client, self.device, self.log)
        self.data = TrainingData(self.train_x, self.train_y, self.mean, self.std, self.device,
                                 channels_last=any(tr.channels_last for tr in self.trainers.values()))
        # sync_every=auto measured and agreed through the server: in runs with GPUs only (in CPU runs auto is 1,
        # and the loop makes no call and no measurement: they are exactly as with sync_every=1).
        paced = self.device.type == "cuda" if self.paced is None else self.paced
        self.auto_sync = self.train.sync_every == "auto" and paced
        self.sync_choice: SyncEveryChoice | None = None  # (sync_every, epoch measured in), once the server has one

    # --- the exchange cadence --------------------------------------------------------------
    @property
    def sync_every(self) -> int:
        """Mini-batches between this group's exchanges: train.sync_every, or what ``auto`` resolved to (1 on a
        CPU; on a GPU the run's measured value, 1 while it is still being measured)."""
        if self.train.sync_every != "auto":
            return int(self.train.sync_every)
        return self.sync_choice[0] if self.sync_choice is not None else 1

    def cadence(self, epoch: int, batches: int) -> tuple[int, int]:
        """(head, every): in epoch ``epoch`` of ``batches`` mini-batches the group exchanges after each of the
        first ``head`` mini-batches, then after every ``every`` and after the last. A function of the run's
        choice alone, the same on every worker and for a restarted one: rounds are numbered by exchange, and
        in sync mode round k must be every worker's k-th (a worker exchanging less often would leave the
        others waiting for rounds it never pushes)."""
        if not self.auto_sync:
            return 0, self.sync_every
        if self.sync_choice is None:  # measuring, or an epoch too short to: every mini-batch, as on a CPU
            return batches, 1
        every, measured_in = self.sync_choice
        if epoch < measured_in:  # redone by a restarted worker: the run exchanged every batch then
            return batches, 1
        if epoch == measured_in:
            return min(AUTO_MEASURED_BATCHES, batches), every
        return 0, every

    def _propose_sync_every(self, epoch: int, timed: list[tuple[float, int]]) -> None:
        """The measurement is done: propose auto_sync_every for it; the server keeps the run's first proposal.

        timed: (seconds, block steps) of each timed mini-batch."""
        seconds, steps = sum(s for s, _ in timed), sum(n for _, n in timed)
        shards = max(1, round(steps / len(timed)))  # blocks stepped per mini-batch (stopped ones do not)
        tau = seconds / steps if steps else 0.0
        self.sync_choice = self.replica.settle_sync_every((auto_sync_every(tau, shards, self.device.type), epoch))

    # --- state ---------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """"bf16" or "fp32": train.precision as this group's shards run it on its device."""
        return next(iter(self.trainers.values())).precision

    @property
    def key(self) -> str:
        """Names the group in checkpoints (its replica's optimizer state belongs to this set of blocks)."""
        return replica_key(self.shard_ids)

    def state_dicts(self) -> dict[int, dict]:
        """Each block's checkpoint: its trainer's state (weights, AdamW with its possibly lowered learning
        rate, noise generator) and its non-finite record, so that a block stopped for NaN stays stopped, and
        keeps counting towards train.max_nonfinite, across a restart or resume."""
        return {t: on_host(tr.state_dict()) | {"nonfinite": {"events": self.stats[t].nonfinite_events,
                                                             "stopped": self.stats[t].stopped},
                                               "counters": {k: getattr(self.stats[t], k) for k in RUN_COUNTERS}}
                for t, tr in self.trainers.items()}

    def load_state_dicts(self, states: dict[int, dict]) -> None:
        """Inverse of :meth:`state_dicts`; a checkpoint written before the non-finite record was kept loads as
        "not stopped, no events"."""
        for t, state in states.items():
            self.trainers[int(t)].load_state_dict(state)
            record = state.get("nonfinite") or {}
            self.stats[int(t)].nonfinite_events = int(record.get("events", 0))
            self.stats[int(t)].stopped = str(record.get("stopped", ""))
            for key, value in (state.get("counters") or {}).items():  # absent in older checkpoints
                if key in RUN_COUNTERS:
                    setattr(self.stats[int(t)], key, type(getattr(self.stats[int(t)], key))(value))

    def _nonfinite(self, t: int, loss: float, epoch: int, good: dict) -> None:
        """Block t produced a NaN/inf: roll it back to ``good`` (its state at the epoch start), lower its
        learning rate, or stop it, as train.on_nonfinite says. Nothing of the bad step was applied."""
        st, trainer = self.stats[t], self.trainers[t]
        st.nonfinite_events += 1
        where = f"block {t}: loss {loss} (non-finite) at epoch {epoch + 1} step {st.step + 1}"
        if self.train.on_nonfinite == "stop" or st.nonfinite_events > self.train.max_nonfinite:
            reason = ("train.on_nonfinite=stop" if self.train.on_nonfinite == "stop"
                      else f"more than train.max_nonfinite={self.train.max_nonfinite} non-finite losses")
            st.stopped = f"{where}; stopped ({reason}); it keeps its weights from the start of that epoch"
            trainer.load_state_dict(clone_state(good))
            self.log(st.stopped)
            return
        trainer.load_state_dict(clone_state(good))
        steps = max(st.steps_per_epoch, 1)
        lr = trainer.set_lr(lr_schedule_factor(self.train, epoch + min(st.step, steps) / steps) * self._lr_cut(t))
        self.log(f"{where}; rolled back to the start of epoch {epoch + 1}, learning rate now {lr:.3g}")

    def _lr_cut(self, t: int) -> float:
        """Block t's non-finite cut of its learning rate, train.nonfinite_lr_factor ** (its non-finite events),
        which multiplies the lr schedule's factor. Recomputed, never compounded, so a cut is the same after a
        restart or resume (the events are checkpointed)."""
        return self.train.nonfinite_lr_factor ** self.stats[t].nonfinite_events

    # --- training ------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The same sample order for every block and worker in an epoch (seeded by seed and epoch)."""
        gen = torch.Generator().manual_seed(epoch_order_seed(self.train.seed, epoch))
        return torch.randperm(self.train_x.shape[0], generator=gen)

    def _settle(self, taken: list[tuple[int, torch.Tensor, torch.Tensor, int, float]], epoch: int,
                good: dict[int, dict]) -> int:
        """Read back the losses and non-finite flags of the steps since the last exchange (one host sync),
        record them, and roll back or stop the blocks that had a non-finite one; returns the finite steps.

        taken: (block, loss, found_inf, batch size, host seconds) per step, in the order they ran.
        """
        if not taken:
            return 0
        t0 = time.perf_counter()
        values = torch.stack([torch.stack([loss.float(), bad]) for _, loss, bad, _, _ in taken]).tolist()
        # On a GPU the steps ran while the host went ahead: the wait for them is their compute time too.
        wait, host = time.perf_counter() - t0, sum(s for *_, s in taken) or 1.0
        finite, flagged = 0, set()
        for (t, _, _, batch, seconds), (loss, bad) in zip(taken, values):
            if bad:  # skipped on the device; the block is rolled back (or stopped) once per stretch
                if t not in flagged:
                    flagged.add(t)
                    self._nonfinite(t, loss, epoch, good[t])
                continue
            # A finite step counts even after a flagged one of the same stretch: it was applied (to the
            # shared replica too) before the rollback was known.
            self.stats[t].record(loss, batch, seconds + wait * seconds / host)
            finite += 1
        return finite

    def train_epoch(self, epoch: int, on_step: Callable[[], None] | None = None) -> dict[int, dict]:
        """Train every owned block for one epoch; returns per-block stats (dicts)."""
        # Dropout draws from the global RNG: seed it per (epoch, group) so runs and resumes repeat.
        torch.manual_seed(global_rng_seed(self.train.seed, epoch, self.shard_ids[0]))
        order = self.epoch_order(epoch).to(self.data.where)
        n, bs = order.numel(), self.train.batch_size
        # BatchNorm cannot train on a batch of one: a trailing singleton batch is dropped.
        full = [s for s in range(0, n, bs) if min(bs, n - s) > 1]
        starts = full[: self.train.batches_in(epoch, len(full))]  # a partial last epoch is cut short
        for st in self.stats.values():
            st.epochs_done = epoch  # also right after a resume
            st.start_epoch(len(starts))
        self.replica.begin_epoch()
        if self.auto_sync:
            # The run's choice (a new or restarted worker learns it here); one already made is offered again,
            # for a server that restarted from a checkpoint older than the choice.
            self.sync_choice = self.replica.settle_sync_every(self.sync_choice)
        # Measure this epoch when the run has no value yet and the epoch is long enough to (every worker has
        # as many batches, so all measure in the same epoch; a shorter one exchanges every batch, as on a CPU).
        measure = self.auto_sync and self.sync_choice is None and len(starts) >= AUTO_MEASURED_BATCHES
        timed: list[tuple[float, int]] = []  # (seconds, block steps) per timed batch
        head, every = self.cadence(epoch, len(starts))
        # Last good state of each block, for a rollback after a non-finite loss (copied only once per epoch).
        good = {t: clone_state(tr.state_dict()) for t, tr in self.trainers.items() if not self.stats[t].stopped}
        taken: list[tuple[int, torch.Tensor, torch.Tensor, int, float]] = []
        for i, start in enumerate(starts):
            timing = measure and AUTO_WARMUP_BATCHES <= i < AUTO_MEASURED_BATCHES
            if timing:  # only here does the loop wait for the device: a few batches, once per run
                _synchronize(self.device)
                t_batch, before = time.perf_counter(), len(taken)
            x, y = self.data.batch(order[start : start + bs])
            schedule = lr_schedule_factor(self.train, epoch + i / len(full))  # the blocks' and the shared state's
            self.replica.set_lr(schedule)
            for t, trainer in self.trainers.items():
                if self.stats[t].stopped:
                    continue
                t0 = time.perf_counter()
                trainer.set_lr(schedule * self._lr_cut(t))
                loss, bad = trainer.step(x, y, self.replica)
                taken.append((t, loss, bad, y.shape[0], time.perf_counter() - t0))
            if timing:
                _synchronize(self.device)
                timed.append((time.perf_counter() - t_batch, len(taken) - before))
            last = i == len(starts) - 1
            if i < head or (i + 1 - head) % every == 0 or last:
                stepped = sorted({t for t, *_ in taken})
                steps = self._settle(taken, epoch, good)
                taken = []
                t0 = time.perf_counter()
                # Round: the exchange's number in the epoch (with head = 0, i // every + 1).
                round_ = i + 1 if i < head else head + (i - head) // every + 1
                self.replica.exchange((epoch, round_), steps, last)
                for t in stepped:  # the exchange served the blocks that stepped since the last one
                    self.stats[t].sync_seconds += (time.perf_counter() - t0) / len(stepped)
            if measure and i == AUTO_MEASURED_BATCHES - 1:
                self._propose_sync_every(epoch, timed)
                # Another worker may have proposed first, and in another epoch only if the server lost the
                # choice meanwhile: this epoch then goes on exchanging every batch, as it began.
                if self.sync_choice is not None and self.sync_choice[1] == epoch:
                    head, every = self.cadence(epoch, len(starts))
            if on_step is not None:
                on_step()
        for st in self.stats.values():
            st.end_epoch()
        return {t: st.as_dict() for t, st in self.stats.items()}


def _synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a CPU computes as it goes: nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clone_state(state: Any) -> Any:
    """A copy of a (nested) state dict whose tensors are cloned: deepcopy's work at a third of its cost."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(clone_state(v) for v in state)
    return copy.deepcopy(state)
