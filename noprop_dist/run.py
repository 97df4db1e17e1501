"""Entry point: ``python -m noprop_dist.run [--config FILE] [--preset paper] [--set KEY=VALUE ...]``.

With no --config it runs the quickstart default (noprop_dist/configs/quickstart.yaml's values are the defaults).
Every run gets a directory of its own (runs/<config>/<date>-<time>) unless run.dir names one; ``--resume DIR``
continues a run with its own config. Config and data errors, and a run directory or data file it cannot read or
write, end with one line on stderr and exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

import yaml

from .api import run_config
from .config import PRESETS, ConfigError, key_table, load_config, resume_config
from .data import DatasetFileError, DatasetNotFoundError
from .distributed.restart_policy import (
    TrainingFailed,  # no Ray import: the CLI stays fast on bad input
)
from .registry import get_method
from .storage.checkpoints import CheckpointError
from .storage.summary import describe_model


def _keys_epilog() -> str:
    """Every config key, its default and what it takes (config.key_table), for --help."""
    rows = key_table()
    width = max(len(k) for k, _, _ in rows)
    lines = [f"  {key:<{width}}  {default:<10} {takes}" for key, default, takes in rows]
    return ("config keys (--set KEY=VALUE; default, then what it takes; docs/usage.md says what each does):\n"
            + "\n".join(lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m noprop_dist.run", description=__doc__.splitlines()[0],
                                epilog=_keys_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a packaged config's name (mnist, fashion_mnist_ct, ...; see noprop_dist/configs/) "
                   "or a YAML file; default: the quickstart")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its own config "
                   "(RUN_DIR/config.yaml; --set still overrides keys, e.g. train.epochs to train longer)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML) and exit without training")
    p.add_argument("--preset", choices=PRESETS, help="paper: the paper's Table 3 settings and inference sampler "
                   "on top of the config (--set still overrides them)")
    # nargs + extend: "--set a=1 b=2" and "--set a=1 --set b=2" both work, as in reproduce and the benchmarks
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override keys, e.g. --set train.epochs=3 cluster.num_workers=1 (repeatable)")
    return p.parse_args(argv)


# A disk or quota that is full: the write that fails names no file (ENOSPC, EDQUOT from write(), EFBIG).
STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _os_error(e: OSError) -> str:
    """One line naming the path(s) of an OSError and what went wrong, e.g. ``runs/x/config.yaml: Permission denied``."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return f"{paths}: {e.strerror or e.__class__.__name__}; check the path and its permissions"


def resolved_config(args: argparse.Namespace):  # noqa: ANN201 - config.Config
    """The config the command line asks for: --config (or the quickstart), --preset and --set; with --resume the
    run directory's own config.yaml, its run.dir the directory. ConfigError (one line) when they conflict."""
    if args.resume is None:
        return load_config(args.config, args.overrides, args.preset)
    if args.config is not None or args.preset is not None:
        raise ConfigError(f"--resume {args.resume}: continues that run with its own config "
                          f"({os.path.join(args.resume, 'config.yaml')}); change keys with --set, not --config or "
                          "--preset")
    return resume_config(args.resume, args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = None
    try:
        cfg = resolved_config(args)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        summary = run_config(cfg)  # imports torch and Ray: only once the config is known good
    except (ConfigError, DatasetNotFoundError, DatasetFileError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None and e.errno in STORAGE_FULL:  # a write() names no file: say where the run writes
            where = f" (run.dir: {cfg.run.dir})" if cfg is not None else ""
            print(f"error: {e.strerror or 'storage full'} while the run wrote its files{where}; free space or use "
                  "another run.dir (writes are atomic: the last complete checkpoint is kept)", file=sys.stderr)
            return 2
        if e.filename is None:  # not about a path the user gave (run.dir, data.root): a bug, keep its traceback
            raise
        print(f"error: {_os_error(e)}", file=sys.stderr)
        return 2
    except TrainingFailed as e:  # a fault the run could not absorb: not the user's input, so exit 1
        print(f"error: training failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: Ray was shut down on the way out
        where = f"; continue it with: python -m noprop_dist.run --resume {cfg.run.dir}" if cfg is not None else ""
        print(f"stopped ({e or 'interrupted'}){where}", file=sys.stderr)
        return 130
    baseline, workers = not get_method(cfg.model.method).noprop, summary["num_workers"]
    block = f" ({summary['block']} blocks)" if summary.get("block", "fig6") != "fig6" else ""
    val = f"; validation {summary['val_accuracy']:.4f}" if summary.get("val_accuracy") is not None else ""
    print(f"test accuracy of the {'model' if baseline else 'assembled chain'}: {summary['test_accuracy']:.4f} "
          f"({summary.get('data', {}).get('name', summary['dataset'])}, "
          f"{describe_model(summary['method'], summary['num_shards'])}{block}, "
          f"{workers} worker{'' if workers == 1 else 's'}, {summary['train_seconds']:.1f}s training{val})")
    if baseline:
        print(f"run saved in {summary['run_dir']} (summary.json, checkpoints)")
    else:
        print(f"run saved in {summary['run_dir']} (summary.json, chain.pt); "
              f"evaluate again with: python -m noprop_dist.evaluate {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
