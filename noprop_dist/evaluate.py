"""Evaluate or use a saved chain without Ray: ``python -m noprop_dist.evaluate RUN_DIR [--predict FILE.npy]``.

Prints the test accuracy of ``RUN_DIR/chain.pt`` on the dataset it was trained on (same noise seed and
batch size as at the end of training, hence the same predictions), or writes predicted classes for
the images in a ``.npy`` file (uint8 (N, C, H, W), or floats in [0, 1]; see :func:`predict`).
``--sampler eq3|mean|ensemble|stage_average|ode`` (``--draws N``) chooses the inference sampler, ``--stages``
adds the accuracy along the chain, block by block, and NoProp-CT / FM chains take ``--steps N`` to measure
accuracy against the number of inference steps. ``--predict`` runs the chain as the run saved it (it refuses
those options), in batches, and writes exactly the file ``--out`` names.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable

import numpy as np
import torch

from .config import MAX_ENSEMBLE_DRAWS, shown
from .core import evaluate_stages, load_chain_file
from .core.samplers import Z0_ONLY_SAMPLERS
from .data import DatasetNotFoundError, load_dataset, normalize
from .registry import METHODS, get_method

PREDICT_BATCH = 1000  # images per call of the chain in TrainedChain.predict and --predict


class TrainedChain(torch.nn.Module):
    """A run's saved chain with its training set's statistics: it takes raw images, not normalised ones.

    ``chain``: the inference chain (core), ``extra``: what the run saved with it (dataset, mean, std, seeds),
    ``spec``: its ModelSpec. Images are uint8 (N, C, H, W), (N, H, W) for one channel, or floats of that
    shape in [0, 1] (see :func:`as_chain_images`), as a numpy array or a torch tensor.
    """

    def __init__(self, chain: torch.nn.Module, extra: dict) -> None:
        super().__init__()
        self.chain, self.extra = chain, extra

    @property
    def spec(self):  # noqa: ANN201 - core.ModelSpec
        return self.chain.spec

    @property
    def class_names(self) -> list[str] | None:
        """The dataset's class names in label order (npz ``class_names``, image_folder's folders), if it had any."""
        return self.extra.get("class_names")

    def raw_images(self, images: object, source: str = "images") -> torch.Tensor:
        """Raw images -> uint8 (N, C, H, W) as the chain's dataset stores them (ValueError naming ``source``)."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        return torch.from_numpy(as_chain_images(images, self.spec.image_shape, source))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> the normalised float32 (N, C, H, W) the chain takes (the run's mean and std)."""
        return normalize(images, self.extra["mean"], self.extra["std"])

    def inputs(self, images: object, source: str = "images") -> torch.Tensor:
        """Raw images -> the normalised float (N, C, H, W) batch the chain takes (ValueError naming ``source``)."""
        return self.normalize(self.raw_images(images, source))

    def z0(self, n: int, seed: int) -> torch.Tensor:
        """z_0 (n, d) float32 that ``predict(images, seed)`` starts n images from: :func:`draw_z0`."""
        return draw_z0(n, self.spec.embed_dim, seed)

    def forward(self, images: object, generator: torch.Generator | None = None,
                z0: torch.Tensor | None = None) -> torch.Tensor:
        """Class log-probabilities (N, m) of raw ``images``; ``generator`` seeds the sampler's noise, ``z0`` (N, d)
        replaces its first draw, z_0 (core.chain.SavedChain.forward)."""
        return self.chain(self.inputs(images), generator, z0=z0)

    def predict(self, images: object, seed: int = 0, source: str = "images",
                batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Predicted classes (N,) int64 of raw ``images``, the sampler's noise seeded by ``seed``.

        The predictions of one call of the chain on all N images with ``torch.Generator().manual_seed(seed)``.
        Samplers whose only noise is z_0 (core.samplers.Z0_ONLY_SAMPLERS) run in batches of ``batch_size``, each
        with its rows of the one z_0 (N, d) drawn for all N images (:func:`draw_z0`), so memory does not grow
        with N; eq3 and the ensemble draw noise at every step and run on all N at once to keep those draws.
        """
        low, high = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not low <= int(seed) <= high:
            raise ValueError(f"seed: must be an integer in [{low}, {high}], got {seed!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        x = self.raw_images(images, source)
        n = len(x)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if self.chain.sampler_name() not in Z0_ONLY_SAMPLERS:
            return self.chain.predict(self.normalize(x), torch.Generator().manual_seed(int(seed))).numpy()
        z0 = self.z0(n, int(seed))
        out = np.empty(n, dtype=np.int64)
        for i in range(0, n, batch_size):
            out[i : i + batch_size] = self.chain.predict(self.normalize(x[i : i + batch_size]),
                                                         z0=z0[i : i + batch_size]).numpy()
        return out


def draw_z0(n: int, embed_dim: int, seed: int) -> torch.Tensor:
    """z_0 (n, embed_dim) float32 that ``load_chain(run_dir).predict(images, seed)`` starts n images from:
    ``torch.randn((n, d), generator=torch.Generator().manual_seed(seed))``, the chain's own first draw for a
    batch of n (core.samplers.start_noise). An exported chain (noprop_dist.export) takes it as its input z0."""
    return torch.randn((n, embed_dim), generator=torch.Generator().manual_seed(int(seed)))


def _check_extra(path: str, extra: dict, channels: int, keys: tuple[str, ...] = ("mean", "std")) -> None:
    """What a chain file records beside the networks, checked before it is used: a ValueError naming the file and
    the key for a missing or mistyped value. ``keys``: those the caller uses (predicting needs the normalisation
    statistics; evaluating again also the dataset and the evaluation's seed and batch size)."""
    def numbers(v: object) -> bool:
        return isinstance(v, (list, tuple)) and len(v) == channels and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)

    checks = {"mean": numbers, "std": lambda v: numbers(v) and all(x > 0 for x in v),
              "dataset": lambda v: isinstance(v, str),
              "eval_seed": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "eval_batch_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0}
    for key, ok in ((k, checks[k]) for k in keys):
        if key not in extra:
            raise ValueError(f"{path}: the chain file's extra lacks {key!r}; not a chain a run saved")
        if not ok(extra[key]):
            raise ValueError(f"{path}: the chain file's extra has {key}={shown(extra[key])}, which a run does not "
                             "write; not a chain a run saved")


def load_chain(run_dir: str | os.PathLike, steps: int | None = None, sampler: str | None = None,
               draws: int | None = None, block: Callable | None = None) -> TrainedChain:
    """The run's chain (``<run_dir>/chain.pt``), ready for raw images; no Ray needed. steps (CT / FM), sampler
    and draws (ensemble) override the chain's inference settings. A value that does not apply to the chain is
    a ValueError naming it. The shard networks are built by the block the chain records (``model.block``: a
    registered name or an import path, imported here; a ValueError names the module and why when it cannot be)
    or by ``block``, the factory itself (for a function defined in the training script)."""
    path = os.path.join(run_dir, "chain.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no chain.pt in {run_dir}: has the run finished?")
    chain, extra = load_chain_file(path, block=block)
    _check_extra(path, extra, chain.spec.image_shape[0])
    method = get_method(chain.spec.method)
    if steps is not None and not method.takes_steps:
        takers = " / ".join(name for name, m in METHODS.items() if m.noprop and m.takes_steps)
        raise ValueError(f"--steps applies to {takers} chains; {path} is {method.name}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if draws is not None and not 1 <= draws <= MAX_ENSEMBLE_DRAWS:
        raise ValueError(f"--draws must be in [1, {MAX_ENSEMBLE_DRAWS}], got {draws}")
    name = chain.sampler_name(sampler)  # refuses a sampler the method has not
    if draws is not None and name != "ensemble":
        raise ValueError(f"--draws applies to the ensemble sampler; this evaluation runs {name!r}")
    chain.spec = dataclasses.replace(chain.spec, inference_steps=steps or chain.spec.inference_steps,
                                     sampler=name, ensemble_draws=draws or chain.spec.ensemble_draws)
    return TrainedChain(chain, extra)


def evaluate_run(run_dir: str, seed: int | None = None, steps: int | None = None, sampler: str | None = None,
                 draws: int | None = None) -> float:
    """Test accuracy of the run's saved chain, measured again from scratch (:func:`evaluation`'s)."""
    return evaluation(run_dir, seed, steps, sampler, draws)["test_accuracy"]


def evaluation(run_dir: str, seed: int | None = None, steps: int | None = None, sampler: str | None = None,
               draws: int | None = None, stages: bool = False) -> dict:
    """Test accuracy of the run's saved chain, measured again from scratch, with the settings it ran.

    seed: the noise seed of z_0 and the chain's steps; None = the one saved with the run (the same
    predictions as at the end of training). Other seeds give the spread over inference runs.
    steps / sampler / draws: inference settings (None: those the run was trained with).
    Returns {"test_accuracy", "sampler", "steps" (CT / FM, else None), "seed"} and, with ``stages``,
    "stages": the accuracy along the chain (:func:`noprop_dist.core.evaluate_stages`).
    """
    trained = load_chain(run_dir, steps, sampler, draws)
    chain, extra = trained.chain, trained.extra
    _check_extra(os.path.join(run_dir, "chain.pt"), extra, chain.spec.image_shape[0],
                 ("dataset", "eval_seed", "eval_batch_size"))
    if extra["dataset"] == "arrays":
        raise ValueError(f"{run_dir}: the run trained on arrays given to the Python API, which it did not keep; "
                         "measure it with noprop_dist.load_chain(run_dir).predict(test_images)")
    data = load_dataset(extra["dataset"], extra["data_root"], test_limit=extra["test_limit"],
                        path=extra.get("data_path"), image_size=extra.get("image_size"))
    seed = extra["eval_seed"] if seed is None else seed
    acc, _, table = evaluate_stages(
        chain, torch.from_numpy(np.ascontiguousarray(data.test_x)), torch.from_numpy(data.test_y),
        extra["eval_batch_size"], seed, lambda xb: normalize(xb, extra["mean"], extra["std"]), stages=stages,
    )
    out = {"test_accuracy": acc, "sampler": chain.spec.sampler,
           "steps": get_method(chain.spec.method).steps(chain.spec.inference_steps), "seed": seed}
    if chain.spec.sampler == "ensemble":
        out["draws"] = chain.spec.ensemble_draws
    return out | ({"stages": table} if stages else {})


PREDICT_INPUT = ("uint8 images (N, C, H, W) with the chain's C, H, W (or (N, H, W) when C = 1), or float images "
                 "of that shape with values in [0, 1] (x 255, rounded: the same images as uint8)")


def as_chain_images(images: object, image_shape: tuple[int, int, int], source: str = "images") -> np.ndarray:
    """``images`` as the uint8 (N, C, H, W) array a chain of ``image_shape`` (C, H, W) takes, or a one-line
    ValueError naming ``source`` (a file name), the shape and dtype found and what is expected.

    Accepted: uint8 (N, C, H, W); (N, H, W) when C = 1 (the channel axis is added); float (N, C, H, W) or
    (N, H, W) with every value in [0, 1], scaled by 255 and rounded, so that the float form of a uint8 image
    (u / 255) gives the same predictions as the image itself. Anything else is refused: other dtypes (ints
    other than uint8, bool, non-numeric), other shapes, floats outside [0, 1] or NaN.
    """
    c, h, w = (int(v) for v in image_shape)
    shapes = f"(N, {c}, {h}, {w})" + (f" or (N, {h}, {w})" if c == 1 else "")
    expected = f"expected uint8 images {shapes}, or float images {shapes} with values in [0, 1]"
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{source}: got a {type(images).__name__}, not a numpy array; {expected}")
    found = f"{source}: got {images.dtype} {images.shape}"
    if images.dtype != np.uint8 and images.dtype.kind != "f":
        raise ValueError(f"{found}: dtype {images.dtype} is not uint8 or float; {expected}")
    if images.ndim == 3 and c == 1 and images.shape[1:] == (h, w):
        images = images[:, None]
    if images.ndim != 4 or images.shape[1:] != (c, h, w):
        raise ValueError(f"{found}: the shape is not {shapes}; {expected}")
    if images.dtype.kind == "f":
        if images.size and not np.isfinite(images).all():
            raise ValueError(f"{found}: holds NaN or infinite values; {expected}")
        if images.size and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"{found}: values in [{images.min():.4g}, {images.max():.4g}], not in [0, 1]; "
                             f"{expected}")
        images = np.rint(images.astype(np.float64) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(images)


def predict(run_dir: str, images: np.ndarray, seed: int = 0, source: str = "images") -> np.ndarray:
    """Predicted classes (N,) int64 of raw ``images`` by the run's chain (:meth:`TrainedChain.predict`)."""
    return load_chain(run_dir).predict(images, seed, source)


def load_images(path: str) -> np.ndarray:
    """The array in the ``.npy`` file ``path``, read without unpickling (a pickled array could run code):
    FileNotFoundError, or a one-line ValueError naming the file for anything that is not one plain array."""
    try:
        images = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"--predict {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - np.load raises many types for a file that is not a .npy array
        first = " ".join(str(e).split())[:200] or e.__class__.__name__
        raise ValueError(f"{path}: not a readable .npy array without pickle ({first}); expected "
                         f"{PREDICT_INPUT}") from None
    if not isinstance(images, np.ndarray):  # an .npz archive
        getattr(images, "close", lambda: None)()
        raise ValueError(f"{path}: a {type(images).__name__}, not one .npy array; expected {PREDICT_INPUT}")
    return images


def refuse_with_predict(args: argparse.Namespace) -> None:
    """A one-line ValueError when an option that --predict would ignore was given: --predict runs the chain with
    the inference settings the run saved."""
    given = [f"--{name}" for name in ("sampler", "steps", "draws") if getattr(args, name) is not None]
    given += ["--stages"] if args.stages else []
    if given:
        raise ValueError(f"{', '.join(given)} does not apply to --predict, which runs the chain as the run saved it "
                         "(its sampler and steps); --predict takes --out and --seed")


def write_predictions(out: str, preds: np.ndarray) -> None:
    """``preds`` as a .npy array in exactly the file ``out`` (np.save given a name adds .npy to one without it)."""
    try:
        with open(out, "wb") as f:
            np.save(f, preds)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot be written ({e.strerror or e})") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m noprop_dist.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--predict", metavar="IMAGES.npy",
                   help=f"write predictions for these images instead: {PREDICT_INPUT.replace('%', '%%')}; with the "
                        "run's sampler and steps (--sampler, --steps, --draws, --stages are refused)")
    p.add_argument("--out", default="predictions.npy", help="where --predict writes (default: %(default)s)")
    p.add_argument("--steps", type=int, help="CT / FM: inference steps (default: model.inference_steps of the run)")
    p.add_argument("--sampler",
                   help="eq3 | mean | ensemble | stage_average (DT) | ode (CT) (default: eval.sampler of the run)")
    p.add_argument("--draws", type=int, help="noisy runs the ensemble sampler averages (default: the run's)")
    p.add_argument("--stages", action="store_true", help="also the accuracy along the chain, stage by stage")
    p.add_argument("--seed", type=int, help="noise seed of the inference (default: the run's eval.seed; 0 with --predict)")
    args = p.parse_args(argv)
    try:
        if args.predict:
            refuse_with_predict(args)
            preds = predict(args.run_dir, load_images(args.predict), 0 if args.seed is None else args.seed,
                            source=args.predict)
            write_predictions(args.out, preds)
            print(f"{len(preds)} predictions written to {args.out}")
        else:
            result = evaluation(args.run_dir, args.seed, args.steps, args.sampler, args.draws, args.stages)
            print(json.dumps({"run_dir": args.run_dir} | result))
    except (FileNotFoundError, DatasetNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
