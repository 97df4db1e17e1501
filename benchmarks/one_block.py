"""A tuning proxy a tenth the cost of a run: NoProp-DT's block 1 trained on its own (with the shared state it
updates: embedding and head), in process, one torch thread per variant, variants side by side (two at a time
on two cores). After each epoch it prints block 1's own test accuracy: the block reads z_0 ~ N(0, I), which
carries no label, so its prediction is an honest classifier of the test images, and on the full Fashion-MNIST
it stood within a point of the whole chain's accuracy (benchmarks/README.md, "Tuning on one block").

    python benchmarks/one_block.py --epochs 2 --variant base --variant drop0:model.dropout=0 \\
        --variant lr2e-3:train.lr=0.002 --name one_block_fashion
    python benchmarks/one_block.py --dataset digits --epochs 3 --variant base --variant drop0:model.dropout=0

Each --variant is NAME or NAME:KEY=VALUE,KEY=VALUE (config overrides on top of --config and --set). Writes
benchmarks/results/<name>.json.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_result  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    """"NAME:KEY=VALUE,KEY=VALUE" -> (NAME, ["KEY=VALUE", ...])."""
    name, _, rest = text.partition(":")
    overrides = [kv for kv in rest.split(",") if kv]
    bad = [kv for kv in overrides if "=" not in kv]
    if not name or bad:
        raise SystemExit(f"--variant {text!r}: expected NAME or NAME:KEY=VALUE,KEY=VALUE")
    return name, overrides


def train_variant(name: str, config: str, overrides: list[str], epochs: int, train_limit: int | None) -> dict:
    """Train block 1 alone for ``epochs``; returns {"variant", "overrides", "epochs": [{epoch, seconds,
    own_accuracy}]}. Runs in its own process, one torch thread."""
    import numpy as np
    import torch

    from noprop_dist.config import load_config
    from noprop_dist.data import load_dataset, normalize
    from noprop_dist.registry import get_method
    from noprop_dist.training import initial_prototypes, model_spec
    from noprop_dist.training.loop import ShardGroup
    from noprop_dist.training.shared_state import LocalClient, SharedStateServer

    torch.set_num_threads(1)
    cfg = load_config(config, [*overrides, f"train.epochs={epochs}"])
    method = get_method(cfg.model.method)
    if not method.noprop or method.time_conditioned:  # a DT block: no time input, its own block loss
        raise SystemExit(f"{config}: model.method is {cfg.model.method!r}; this proxy trains a NoProp-DT block")
    d = cfg.data
    dataset = load_dataset(d.name, d.root, d.download, train_limit or d.train_limit, d.test_limit)
    spec = model_spec(cfg, dataset.image_shape, dataset.num_classes)
    server = SharedStateServer(spec, cfg.train.seed, initial_prototypes(spec, dataset, cfg.train.seed),
                               sources=["w0"], mode=cfg.train.sync_mode)
    group = ShardGroup(spec, [1], cfg.train, dataset.train_x, dataset.train_y, dataset.mean, dataset.std,
                       LocalClient(server, "w0"), log=lambda _: None)
    test_x = torch.from_numpy(np.ascontiguousarray(dataset.test_x))
    test_y = torch.from_numpy(dataset.test_y)
    rows, trained = [], 0.0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        group.train_epoch(epoch)
        trained += time.perf_counter() - t0
        block = group.trainers[1].block.eval()
        gen = torch.Generator().manual_seed(1234)
        right = 0
        with torch.no_grad():
            for i in range(0, test_x.shape[0], 500):
                x = normalize(test_x[i : i + 500], dataset.mean, dataset.std)
                z0 = torch.randn(x.shape[0], spec.embed_dim, generator=gen)
                right += int((block(z0, x).argmax(dim=1) == test_y[i : i + 500]).sum())
        acc = right / test_x.shape[0]
        rows.append({"epoch": epoch + 1, "seconds": round(trained, 1), "own_accuracy": acc})
        print(f"{name:<14} epoch {epoch + 1}: block 1's own test accuracy {100 * acc:.2f} % "
              f"({trained:.0f} s of training)", flush=True)
    return {"variant": name, "overrides": overrides, "epochs": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="fashion_mnist", help="a packaged config's name or a YAML path")
    p.add_argument("--dataset", help="shorthand for --set data.name=...")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--variant", action="append", required=True, help="NAME or NAME:KEY=VALUE,KEY=VALUE")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, help="the first k training images (default: all)")
    p.add_argument("--parallel", type=int, default=2, help="variants trained at once (one thread each)")
    p.add_argument("--name", default="one_block", help="results file name")
    args = p.parse_args()
    base = [*([f"data.name={args.dataset}"] if args.dataset else []), *args.overrides]
    variants = [parse_variant(v) for v in args.variant]
    if len({n for n, _ in variants}) != len(variants):
        raise SystemExit("--variant: each name once")
    results: dict[str, dict] = {}
    with ProcessPoolExecutor(max_workers=args.parallel, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(train_variant, n, args.config, [*base, *o], args.epochs, args.train_limit): n
                   for n, o in variants}
        for f in as_completed(futures):
            results[futures[f]] = f.result()
    rows = [results[n] for n, _ in variants]
    print(f"\n{'variant':<14} " + " ".join(f"epoch {e + 1:>2}" for e in range(args.epochs)))
    for r in rows:
        print(f"{r['variant']:<14} " + " ".join(f"{100 * e['own_accuracy']:7.2f}%" for e in r["epochs"]))
    path = write_result(args.name, {
        "date": datetime.date.today().isoformat(), "config": args.config, "set": base, "epochs": args.epochs,
        "train_limit": args.train_limit, "parallel": args.parallel, "variants": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
