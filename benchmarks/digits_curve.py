"""Test accuracy of the in-process reference run on digits against epochs (the quickstart's model).

    python benchmarks/digits_curve.py --epochs 30 --every 2
"""
from __future__ import annotations

import argparse
import time

from common import write_result

from noprop_dist.config import load_config
from noprop_dist.data import load_dataset
from noprop_dist.shared_server import LocalClient, SharedStateServer
from noprop_dist.training import ShardGroup, evaluate_states, initial_prototypes, model_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    cfg = load_config(None, [f"train.epochs={args.epochs}", "cluster.num_workers=1", *args.overrides])
    data = load_dataset(cfg.data.name)
    spec = model_spec(cfg, data.image_shape, data.num_classes)
    server = SharedStateServer(spec, cfg.train.lr, cfg.train.weight_decay, cfg.train.seed,
                               initial_prototypes(spec, data, cfg.train.seed))
    group = ShardGroup(spec, list(range(1, spec.num_blocks + 1)), cfg.train, data.train_x, data.train_y,
                       data.mean, data.std, LocalClient(server))
    curve, t0 = [], time.perf_counter()
    for epoch in range(cfg.train.epochs):
        group.train_epoch(epoch)
        if (epoch + 1) % args.every == 0 or epoch + 1 == cfg.train.epochs:
            _, acc = evaluate_states(spec, data, group.state_dicts(), server.state_dict(),
                                     cfg.eval.batch_size, cfg.eval.seed)
            curve.append({"epoch": epoch + 1, "test_accuracy": acc, "seconds": time.perf_counter() - t0})
            print(f"epoch {epoch + 1:3d}  test accuracy {100 * acc:.2f} %  ({curve[-1]['seconds']:.0f} s)", flush=True)
    print("written:", write_result("digits_curve", {"args": vars(args), "curve": curve}))


if __name__ == "__main__":
    main()
