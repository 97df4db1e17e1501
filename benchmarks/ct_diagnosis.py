"""Why NoProp-CT learns slowly: the schedule, the loss by time and the chain, epoch by epoch.

    python benchmarks/ct_diagnosis.py --name digits_paper --preset paper --dataset digits --epochs 10 --shards 2
    python benchmarks/ct_diagnosis.py --name sigmoid --set model.ct_loss_weight=sigmoid ...

Trains in one process (the reference run, ``training.train_in_process``: the code a Ray worker runs, with the
shared state in process) and after every epoch records, on the test set:
- the chain's test accuracy with the mean sampler (``--steps`` steps; CT's mean sampler gives the same
  accuracy from 10 to 1000 steps) and with Eq. 3's noise;
- the schedule's endpoints g0 = gamma(1), g1 = gamma(0), abar(0), abar(1) and the loss weight at 0, 1/2, 1;
- by time bin (``--bins`` equal bins of [0, 1]): the unweighted denoising error ||u_hat - u_y||^2, the
  weighted term the loss trains on, and the accuracy of the network's own prediction at that time
  (argmax of its logits: does it know the class at that noise level?).
Writes benchmarks/results/ct_diagnosis_<name>.json.

    python benchmarks/ct_diagnosis.py --plot OUT.png NAME [NAME ...]

draws the chain's test accuracy by epoch and, at the last epoch, the networks' own accuracy by time bin, one
line per result file ``ct_diagnosis_<NAME>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from common import write_result

from noprop_dist.config import load_config
from noprop_dist.core import evaluate_chain, evaluate_stages
from noprop_dist.core.losses import ct_loss_weight
from noprop_dist.core.paths import ct_marginal, denoised_estimate, randn_like, shard_bounds
from noprop_dist.data import load_dataset, normalize
from noprop_dist.registry import get_method
from noprop_dist.training import evaluate_states, model_spec, train_in_process


@torch.no_grad()
def per_time(spec, group, shared, x: torch.Tensor, y: torch.Tensor, bins: int, seed: int) -> list[dict]:
    """Per time bin: mean ||u_hat - u_y||^2, mean weighted term, own accuracy; x normalised (N, C, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    bounds = shard_bounds(spec, shared)
    u_y = shared.embed[y]
    out = []
    for b in range(bins):
        t = ((b + torch.rand(y.shape[0], generator=gen)) / bins).float()
        # the shard whose interval holds t (with overlap the first one that does)
        k = torch.bucketize(t, bounds[1:-1].float(), right=True)
        z = ct_marginal(u_y, shared.schedule.abar(t), randn_like(u_y, gen))
        logits = torch.empty(y.shape[0], spec.num_classes)
        for j, trainer in enumerate(group.trainers.values()):
            sel = k == j
            if sel.any():
                net = trainer.block.eval()
                logits[sel] = net(z[sel], x[sel], t[sel])
        err = (denoised_estimate(logits, shared.embed) - u_y).pow(2).sum(dim=1)
        w = ct_loss_weight(spec, shared.schedule, t)
        out.append({"t": (b + 0.5) / bins, "error": float(err.mean()),
                    "weighted": float((w * err).mean() * spec.eta / 2),
                    "own_accuracy": float((logits.argmax(1) == y).float().mean())})
    return out


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def plot(out: str, names: list[str]) -> None:
    """Left: chain accuracy (the run's sampler) by epoch; right: own accuracy by t at the last epoch (CT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        with open(os.path.join(RESULTS, f"ct_diagnosis_{name}.json"), encoding="utf-8") as f:
            rows = json.load(f)["epochs"]
        line, = left.plot([r["epoch"] for r in rows], [100 * r["mean_accuracy"] for r in rows], marker="o",
                          ms=3, label=name)
        if "nearest_readout_accuracy" in rows[-1]:
            left.plot([r["epoch"] for r in rows], [100 * r["nearest_readout_accuracy"] for r in rows], ls=":",
                      color=line.get_color(), label=f"{name}, nearest-embedding readout")
        if "by_time" in rows[-1]:
            right.plot([b["t"] for b in rows[-1]["by_time"]], [100 * b["own_accuracy"] for b in rows[-1]["by_time"]],
                       marker="o", ms=3, color=line.get_color(), label=name)
            for b in rows[-1]["bounds"][1:-1]:
                right.axvline(b, color=line.get_color(), alpha=0.3, ls="--")
    left.set(xlabel="epoch", ylabel="test accuracy of the chain (%)", title="the chain, epoch by epoch")
    right.set(xlabel="t (0 = noise, 1 = clean); dashed: shard boundaries", ylabel="own accuracy (%)",
              title="each network's own prediction on z_t ~ q(z_t | y), last epoch")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"written: {out}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--plot":
        plot(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--bins", type=int, default=10)
    ap.add_argument("--preset", default=None, help="paper: the paper's settings (config.preset_values)")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides, key=value")
    args = ap.parse_args()
    cfg = load_config("mnist_ct", [
        f"data.name={args.dataset}", "data.root=null", f"train.epochs={args.epochs}", f"model.num_shards={args.shards}",
        f"model.inference_steps={args.steps}", "eval.sampler=mean", "metrics.enabled=false",
        "cluster.threads_per_worker=1", *([f"data.train_limit={args.train_limit}"] if args.train_limit else []),
        f"data.test_limit={args.test_limit}", *args.set], args.preset)
    data = load_dataset(cfg.data.name, cfg.data.root, train_limit=cfg.data.train_limit, test_limit=cfg.data.test_limit)
    spec = model_spec(cfg, data.image_shape, data.num_classes)
    tx = normalize(torch.from_numpy(np.ascontiguousarray(data.test_x)), data.mean, data.std)
    ty = torch.from_numpy(data.test_y)
    rows: list[dict] = []

    def norm(xb: torch.Tensor) -> torch.Tensor:
        return normalize(xb, data.mean, data.std)

    t_start = time.perf_counter()
    train_s = [0.0]

    def on_epoch(epoch: int, group, server) -> None:
        train_s[0] = time.perf_counter() - t_start - sum(r["eval_seconds"] for r in rows)
        t0 = time.perf_counter()
        states = {t: tr.state_dict() for t, tr in group.trainers.items()}
        shared_state = server.state_dict()
        chain, acc = evaluate_states(spec, data, states, shared_state, 1000, cfg.eval.seed)
        test_u8 = torch.from_numpy(np.ascontiguousarray(data.test_x))
        method = get_method(spec.method)
        eq3 = None if "eq3" not in method.samplers else evaluate_chain(
            chain, test_u8, ty, 1000, cfg.eval.seed, norm, sampler="eq3")[0]
        # the chain stopped after each shard, read out by the head, and each shard's own last prediction
        _, _, stages = evaluate_stages(chain, test_u8, ty, 1000, cfg.eval.seed, norm)
        row = {"epoch": epoch + 1, "train_seconds": train_s[0], "mean_accuracy": acc, "eq3_accuracy": eq3,
               "bounds": shard_bounds(spec, chain.shared).tolist(), "stages": stages}
        if not method.learned_schedule:  # FM: no schedule, no noise term: the chain's accuracy only
            row["eval_seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(f"epoch {epoch + 1}: {100 * acc:.2f}%", flush=True)
            return
        sched = chain.shared.schedule
        g0, g1 = (float(v) for v in sched.endpoints())  # noqa
        ends = torch.tensor([0.0, 0.5, 1.0])
        with torch.no_grad():  # the head on z_1 ~ q(z_1 | y), what its CE trains on (uses the label: diagnosis only)
            emb, ab1 = chain.shared.embed[ty], sched.abar(torch.ones(1))
            noise = torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
            z1 = ab1.sqrt() * emb + (1 - ab1).sqrt() * noise
            head_q = float((chain.readout(z1).argmax(1) == ty).float().mean())
            nearest = float((torch.cdist(z1, chain.shared.embed).argmin(1) == ty).float().mean())
        # the same chain read out by the nearest class embedding instead of the head (FM's readout)
        head_readout = chain.readout
        chain.readout = lambda z: torch.log_softmax(-torch.cdist(z, chain.shared.embed).pow(2), dim=1)
        nearest_chain, _ = evaluate_chain(chain, test_u8, ty, 1000, cfg.eval.seed, norm)
        chain.readout = head_readout
        row |= {"head_on_q_z1": head_q, "nearest_embedding_on_q_z1": nearest, "nearest_readout_accuracy": nearest_chain}
        row |= {"g0": g0, "g1": g1, "abar": [float(v) for v in sched.abar(torch.tensor([0.0, 1.0]))],
                "weight_at_0_half_1": [float(v) for v in ct_loss_weight(spec, sched, ends)],
                "by_time": per_time(spec, group, chain.shared, tx, ty, args.bins, epoch)}
        row["eval_seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"epoch {epoch + 1}: mean {100 * acc:.2f}% eq3 {100 * eq3:.2f}% last shard's own "
              f"{100 * stages[-1]['own_accuracy']:.2f}% head on q(z_1|y) {100 * head_q:.1f}% "
              f"nearest {100 * nearest:.1f}% "
              f"chain read out by the nearest embedding {100 * nearest_chain:.2f}%  g0 {g0:.2f} g1 {g1:.2f}  "
              f"own acc by t " + " ".join(f"{100 * r['own_accuracy']:.0f}" for r in row["by_time"])
              + "  weighted " + " ".join(f"{r['weighted']:.3g}" for r in row["by_time"]), flush=True)

    train_in_process(cfg, data, on_epoch=on_epoch, device="cpu")
    path = write_result(f"ct_diagnosis_{args.name}", {"args": vars(args), "config": cfg.to_dict(), "epochs": rows})
    print(path)


if __name__ == "__main__":
    main()
