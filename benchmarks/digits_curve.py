"""Test accuracy of the in-process reference run on digits against epochs (the quickstart's model).

    python benchmarks/digits_curve.py --epochs 30 --every 2
"""
from __future__ import annotations

import argparse
import time

from common import write_result

from noprop_dist.config import load_config
from noprop_dist.data import load_dataset
from noprop_dist.training import (
    ShardGroup,
    evaluate_states,
    model_spec,
    train_in_process,
)
from noprop_dist.training.shared_state import SharedStateServer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    cfg = load_config(None, [f"train.epochs={args.epochs}", "cluster.num_workers=1", *args.overrides])
    data = load_dataset(cfg.data.name)
    spec = model_spec(cfg, data.image_shape, data.num_classes)
    curve, t0 = [], time.perf_counter()

    def on_epoch(epoch: int, group: ShardGroup, server: SharedStateServer) -> None:
        if (epoch + 1) % args.every and epoch + 1 != cfg.train.epochs:
            return
        _, acc = evaluate_states(spec, data, group.state_dicts(), server.state_dict(),
                                 cfg.eval.batch_size, cfg.eval.seed)
        curve.append({"epoch": epoch + 1, "test_accuracy": acc, "seconds": time.perf_counter() - t0})
        print(f"epoch {epoch + 1:3d}  test accuracy {100 * acc:.2f} %  ({curve[-1]['seconds']:.0f} s)", flush=True)

    train_in_process(cfg, data, on_epoch)
    print("written:", write_result("digits_curve", {"args": vars(args), "curve": curve}))


if __name__ == "__main__":
    main()
