"""A block whose loss turns NaN: nothing of it reaches the shared state, it rolls back or stops, others go on.

The losses and non-finite flags are read back at every exchange (train.sync_every mini-batches), so a NaN is
handled at the end of its stretch; with sync_every = 1 that is the mini-batch it happened in."""
import io
import math

import pytest
import torch

from noprop_dist.config import load_config
from noprop_dist.data import load_dataset
from noprop_dist.training import ShardGroup, model_spec
from noprop_dist.training.shared_state import LocalClient, SharedStateServer


def _group(policy: str, max_nonfinite: int = 3, sync_every: int = 1):
    cfg = load_config(None, ["model.num_blocks=3", "cluster.num_workers=1", f"train.on_nonfinite={policy}",
                             f"train.max_nonfinite={max_nonfinite}", "train.batch_size=64",
                             f"train.sync_every={sync_every}"])
    data = load_dataset("digits", train_limit=640)
    spec = model_spec(cfg, data.image_shape, data.num_classes)
    server = SharedStateServer(spec, cfg.train.seed)
    logs: list[str] = []
    group = ShardGroup(spec, [1, 2, 3], cfg.train, data.train_x, data.train_y, data.mean, data.std,
                       LocalClient(server), log=logs.append)
    return group, server, logs, cfg


def _poison(group: ShardGroup, t: int, at_batch: int):
    """on_step callback that fills block t's weights with NaN after batch `at_batch`."""
    seen = {"n": 0}

    def on_step():
        seen["n"] += 1
        if seen["n"] == at_batch:
            with torch.no_grad():
                for p in group.trainers[t].block.parameters():
                    p.fill_(float("nan"))
    return on_step


def _all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("sync_every, poisoned_steps", [(1, 1), (4, 4)])
def test_rollback_restores_epoch_start_lowers_lr_and_keeps_others_going(sync_every, poisoned_steps):
    group, server, logs, cfg = _group("rollback", sync_every=sync_every)
    group.train_epoch(0)
    start_of_epoch_1 = {k: v.clone() for k, v in group.trainers[2].block.state_dict().items()}
    stats = group.train_epoch(1, on_step=_poison(group, 2, at_batch=4))
    assert stats[2]["nonfinite_events"] == 1 and not stats[2]["stopped"]
    assert stats[1]["nonfinite_events"] == stats[3]["nonfinite_events"] == 0
    assert stats[1]["total_steps"] == stats[3]["total_steps"] == 20  # 2 epochs x 10 batches, none lost
    # Poisoned after batch 4: its steps until the stretch's end (batch 5, or 5-8) were skipped on the device.
    assert stats[2]["total_steps"] == 20 - poisoned_steps
    assert group.trainers[2].optimizer.param_groups[0]["lr"] == pytest.approx(cfg.train.lr * 0.5)
    assert _all_finite(group.trainers[2].block.state_dict())
    # It trained on after the rollback: its weights moved away from the start-of-epoch copy.
    assert any(not torch.equal(v, start_of_epoch_1[k]) for k, v in group.trainers[2].block.state_dict().items()
               if v.is_floating_point())
    assert bool(torch.isfinite(server.pull().flat).all()), "a NaN reached the shared state"
    assert server.version == sum(s["total_steps"] for s in stats.values())
    assert len(logs) == 1 and "block 2" in logs[0] and "rolled back" in logs[0] and "epoch 2" in logs[0]


def test_stop_policy_names_the_block_and_the_others_finish():
    group, server, logs, _ = _group("stop")
    stats = group.train_epoch(0, on_step=_poison(group, 3, at_batch=2))
    stats = group.train_epoch(1)
    assert "block 3" in stats[3]["stopped"] and "train.on_nonfinite=stop" in stats[3]["stopped"]
    assert stats[3]["total_steps"] == 2
    assert stats[1]["total_steps"] == stats[2]["total_steps"] == 20
    assert _all_finite(group.trainers[3].block.state_dict())
    assert logs == [stats[3]["stopped"]]
    assert bool(torch.isfinite(server.pull().flat).all())


def test_too_many_rollbacks_stop_the_block():
    group, _, logs, _ = _group("rollback", max_nonfinite=1)
    group.train_epoch(0, on_step=_poison(group, 1, at_batch=1))
    stats = group.train_epoch(1, on_step=_poison(group, 1, at_batch=1))
    assert stats[1]["nonfinite_events"] == 2
    assert "train.max_nonfinite=1" in stats[1]["stopped"]
    assert "rolled back" in logs[0] and "stopped" in logs[1]
    assert not math.isnan(stats[2]["loss"])


def _round_trip(states: dict) -> dict:
    """The block states as a checkpoint file holds them: torch.save, then torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(states, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("policy, max_nonfinite", [("stop", 3), ("rollback", 0)])
def test_a_stopped_block_stays_stopped_after_a_restart(policy, max_nonfinite):
    """Guards: the stop flag and event count were not in the block's checkpoint, so a block stopped for NaN
    (train.on_nonfinite=stop, or past train.max_nonfinite rollbacks) trained again after a restart or resume."""
    group, _, _, _ = _group(policy, max_nonfinite=max_nonfinite)
    group.train_epoch(0, on_step=_poison(group, 2, at_batch=2))
    assert group.stats[2].stopped
    fresh, server, _, _ = _group(policy, max_nonfinite=max_nonfinite)  # the restarted worker
    fresh.load_state_dicts(_round_trip(group.state_dicts()))
    kept = {k: v.clone() for k, v in fresh.trainers[2].block.state_dict().items()}
    steps_before = {t: st.total_steps for t, st in fresh.stats.items()}  # the whole run's, from the checkpoint
    assert steps_before == {t: st.total_steps for t, st in group.stats.items()}
    stats = fresh.train_epoch(1)
    assert stats[2]["stopped"] == group.stats[2].stopped and stats[2]["nonfinite_events"] == 1
    assert stats[2]["total_steps"] == steps_before[2], "the stopped block trained again after the restart"
    assert all(torch.equal(v, kept[k]) for k, v in fresh.trainers[2].block.state_dict().items())
    assert [stats[t]["total_steps"] - steps_before[t] for t in (1, 3)] == [10, 10]  # the others go on


def test_rollbacks_before_a_restart_count_towards_max_nonfinite_and_keep_the_lowered_lr():
    """Guards: after a restart the event count began at 0 again, so a block could roll back
    train.max_nonfinite more times per restart instead of stopping; its lowered learning rate is kept too."""
    group, _, _, cfg = _group("rollback", max_nonfinite=1)
    group.train_epoch(0, on_step=_poison(group, 1, at_batch=1))
    assert group.stats[1].nonfinite_events == 1 and not group.stats[1].stopped
    fresh, _, logs, _ = _group("rollback", max_nonfinite=1)
    fresh.load_state_dicts(_round_trip(group.state_dicts()))
    assert fresh.trainers[1].optimizer.param_groups[0]["lr"] == pytest.approx(cfg.train.lr * 0.5)
    stats = fresh.train_epoch(1, on_step=_poison(fresh, 1, at_batch=1))
    assert stats[1]["nonfinite_events"] == 2 and "train.max_nonfinite=1" in stats[1]["stopped"], logs


def test_a_checkpoint_from_before_the_nonfinite_record_loads_as_not_stopped():
    """Block checkpoints written before the record (and the run's counters) were kept have no "nonfinite" (nor
    "counters") entry: not stopped, 0 events, counting from 0."""
    group, _, _, _ = _group("stop")
    group.train_epoch(0, on_step=_poison(group, 3, at_batch=2))
    old = {t: {k: v for k, v in s.items() if k not in ("nonfinite", "counters")} for t, s in group.state_dicts().items()}
    fresh, _, _, _ = _group("stop")
    fresh.load_state_dicts(_round_trip(old))
    assert all(st.nonfinite_events == 0 and st.stopped == "" for st in fresh.stats.values())
    assert fresh.train_epoch(1)[3]["total_steps"] == 10


def test_the_lr_cut_does_not_compound_across_epochs():
    """Guards: the cut was a multiply of the rate restored from the epoch-start state, which already held
    the earlier cuts, so a second rollback gave lr x 0.5 x 0.25 (0.125) where the README says 0.5 ** 2."""
    group, _, _, cfg = _group("rollback", max_nonfinite=5)
    group.train_epoch(0, on_step=_poison(group, 1, at_batch=2))
    group.train_epoch(1, on_step=_poison(group, 1, at_batch=2))
    assert group.stats[1].nonfinite_events == 2
    assert group.trainers[1].optimizer.param_groups[0]["lr"] == pytest.approx(cfg.train.lr * 0.25)


def test_cosine_lr_schedule_warms_up_decays_to_zero_and_reaches_block_and_shared_state():
    from noprop_dist.training import lr_schedule_factor

    cfg = load_config(None, ["train.lr_schedule=cosine", "train.warmup_epochs=1", "train.epochs=5"])
    factors = [lr_schedule_factor(cfg.train, p) for p in (0.0, 0.5, 1.0, 3.0, 5.0)]
    assert factors == pytest.approx([1e-3, 0.5, 1.0, 0.5, 0.0], abs=1e-12)
    assert lr_schedule_factor(load_config(None, []).train, 3.7) == 1.0  # constant by default
    group, _, _, _ = _group("rollback")
    group.train = load_config(None, ["model.num_blocks=3", "cluster.num_workers=1", "train.lr_schedule=cosine",
                                     "train.epochs=2", "train.batch_size=64"]).train
    lrs = []
    group.train_epoch(1, on_step=lambda: lrs.append((group.trainers[2].optimizer.param_groups[0]["lr"],
                                                     group.replica.optimizer.param_groups[0]["lr"])))
    # epoch 2 of 2: half a cosine from 0.5 down towards 0, the block's and the shared state's alike
    assert lrs[0][0] == pytest.approx(group.train.lr * 0.5) and lrs[-1][0] < 0.02 * group.train.lr
    assert all(b == pytest.approx(s) for b, s in lrs) and all(a > b for (a, _), (b, _) in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("override,needle", [
    ("train.lr_schedule=step", "train.lr_schedule: 'step' is not allowed; allowed: constant, cosine"),
    ("train.warmup_epochs=20", "train.warmup_epochs: must be in [0, train.epochs = 20), got 20"),
])
def test_bad_lr_schedule_keys_name_the_key(override, needle):
    from noprop_dist.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
