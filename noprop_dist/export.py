"""Export a run's chain as one self-contained ONNX or TorchScript file that needs neither Ray nor noprop_dist.

``python -m noprop_dist.export RUN_DIR --format onnx|torchscript --out FILE``.

The file takes raw uint8 images as the run's dataset stores them and the starting noise z_0, and returns the
chain's class log-probabilities (N, m), usable as logits (or the classes, ``--output classes``); the
normalisation with the run's mean and std is inside it. Only samplers whose only randomness is z_0 can be
exported (core.samplers.Z0_ONLY_SAMPLERS): given z0 the file is a fixed function of the images, and with
``z0 = torch.randn((N, d), generator=torch.Generator().manual_seed(seed))`` it gives the classes of
``noprop_dist.load_chain(RUN_DIR).predict(images, seed)``. After writing, the command loads the file, runs it on
a few of the run's test images and compares it with the torch chain. docs/export.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from .core.samplers import Z0_ONLY_SAMPLERS
from .data import DatasetNotFoundError, load_dataset, normalize
from .evaluate import TrainedChain, draw_z0, load_chain
from .registry import get_method

FORMATS = ("onnx", "torchscript")
OUTPUTS = ("logits", "classes")
# Layout of the images input -> the channel counts it is for (None: any); the graph turns it into (N, C, H, W).
LAYOUTS: dict[str, tuple[int, ...] | None] = {"nchw": None, "nhw": (1,), "nhwc": (3,)}
ONNX_OPSET = 17
CHECK_IMAGES = 16  # images the written file is run on against the torch chain
CHECK_TOLERANCE = 1e-3  # largest |log-probability difference| the check accepts (float32 rounding differs)
INSTALL_HINT = "pip install 'noprop_dist[export]'"


class ExportError(ValueError):
    """A request the exporter cannot serve; the message is one line naming the option or file."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`export_chain` wrote and how the check went."""

    path: str
    format: str
    size_bytes: int
    inputs: dict[str, str]  # name -> "dtype (shape)"
    output: str  # "logits float32 (N, m)" or "classes int64 (N,)"
    method: str
    sampler: str
    steps: int | None  # CT / FM inference steps; None for DT
    layout: str
    export_seconds: float
    check_images: str  # which images the check ran on, e.g. "16 test images of digits"
    checked: int  # how many
    max_logit_difference: float | None  # None with --output classes
    classes_agree: int  # images on which the file's classes equal the torch chain's

    def line(self) -> str:
        """One line for the terminal."""
        inputs = ", ".join(f"{name} {desc}" + (f" (layout {self.layout})" if name == "images" else "")
                           for name, desc in self.inputs.items())
        steps = "" if self.steps is None else f", {self.steps} steps"
        diff = ("" if self.max_logit_difference is None
                else f"max |logit difference| {self.max_logit_difference:.2e}, ")
        return (f"wrote {self.path} ({self.size_bytes / 1e6:.2f} MB, {self.format}, {self.export_seconds:.1f} s): "
                f"inputs {inputs}; output {self.output}; {self.method}, sampler {self.sampler}{steps}; "
                f"checked against the torch chain on {self.check_images}: {diff}"
                f"classes agree on {self.classes_agree}/{self.checked}")


def exportable_samplers(method: str) -> list[str]:
    """The samplers of ``method`` that can be exported: those it runs whose only noise is z_0."""
    return [name for name in Z0_ONLY_SAMPLERS if name in get_method(method).samplers]


def _check_sampler(trained: TrainedChain, sampler: str | None) -> str:
    """``sampler``, else the run's (``chain.sampler_name()``), when it can be exported; else an ExportError."""
    method = trained.spec.method
    name = sampler or trained.chain.sampler_name()
    allowed = exportable_samplers(method)
    if name not in allowed:
        why = {"eq3": " (it draws noise at every step)",
               "ensemble": " (it draws a z_0 for each of its runs)"}.get(name, "")
        raise ExportError(f"--sampler {name}: cannot be exported from a {method} chain{why}; "
                          f"exportable: {', '.join(allowed)}")
    return name


def _check_layout(layout: str, image_shape: tuple[int, int, int]) -> None:
    if layout not in LAYOUTS:
        raise ExportError(f"--layout {layout}: unknown; allowed: {', '.join(LAYOUTS)}")
    channels = LAYOUTS[layout]
    if channels is not None and image_shape[0] not in channels:
        allowed = [k for k, v in LAYOUTS.items() if v is None or image_shape[0] in v]
        raise ExportError(f"--layout {layout}: for {'/'.join(map(str, channels))}-channel images; this run's are "
                          f"{tuple(image_shape)} (C, H, W); allowed: {', '.join(allowed)}")


def input_shape(layout: str, image_shape: tuple[int, int, int]) -> tuple[str | int, ...]:
    """The images input's shape in ``layout``, batch first: ("N", C, H, W), ("N", H, W) or ("N", H, W, C)."""
    c, h, w = image_shape
    return {"nchw": ("N", c, h, w), "nhw": ("N", h, w), "nhwc": ("N", h, w, c)}[layout]


def to_layout(images: np.ndarray, layout: str) -> np.ndarray:
    """uint8 (N, C, H, W) -> the same images in ``layout`` (a contiguous copy)."""
    if layout == "nhw":
        return np.ascontiguousarray(images[:, 0])
    if layout == "nhwc":
        return np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    return np.ascontiguousarray(images)


class InferenceGraph(nn.Module):
    """What an exported file computes: ``forward(images, z0)``, images uint8 in ``layout`` (N, C, H, W) /
    (N, H, W) / (N, H, W, C), z0 float32 (N, d) -> class log-probabilities (N, m) float32, or the classes (N,)
    int64 with ``output="classes"``. The run's mean and std are buffers; the chain runs ``sampler`` (and CT / FM
    its ``spec.inference_steps``) from z0, drawing nothing."""

    def __init__(self, trained: TrainedChain, sampler: str, layout: str = "nchw", output: str = "logits") -> None:
        super().__init__()
        self.chain, self.sampler, self.layout, self.output = trained.chain, sampler, layout, output
        # (C,): data.normalize takes them as they are, so the formula stays in one place
        self.register_buffer("mean", torch.tensor(trained.extra["mean"], dtype=torch.float32))
        self.register_buffer("std", torch.tensor(trained.extra["std"], dtype=torch.float32))

    def forward(self, images: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        if self.layout == "nhw":
            images = images.unsqueeze(1)
        elif self.layout == "nhwc":
            images = images.permute(0, 3, 1, 2)
        log_probs = self.chain(normalize(images, self.mean, self.std), None, sampler=self.sampler, z0=z0)
        return log_probs.argmax(dim=1) if self.output == "classes" else log_probs


def _require(fmt: str) -> None:
    """ExportError naming the missing package and the install command, before anything is built."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: unknown; allowed: {', '.join(FORMATS)}")
    if fmt == "onnx":
        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(f"--format onnx needs {' and '.join(missing)}, which are not installed: {INSTALL_HINT}")


def _notes(trained: TrainedChain, run_dir: str, sampler: str, layout: str, output: str) -> dict[str, str]:
    """What the file records about itself (ONNX metadata_props, a JSON file inside the TorchScript archive)."""
    spec = trained.spec
    steps = get_method(spec.method).steps(spec.inference_steps)
    shape = ", ".join(map(str, input_shape(layout, spec.image_shape)))
    return {
        "producer": "noprop_dist.export",
        "run_dir": os.path.abspath(run_dir),
        "method": spec.method, "sampler": sampler, "steps": str(steps), "layout": layout,
        "images": f"uint8 ({shape}), values 0..255 as the run's dataset stores them",
        "z0": f"float32 (N, {spec.embed_dim}), the chain's starting noise z_0 ~ N(0, I)",
        "output": ("classes int64 (N,)" if output == "classes"
                   else f"logits float32 (N, {spec.num_classes}): class log-probabilities"),
        "reproduce_predict": (f"z0 = torch.randn((N, {spec.embed_dim}), generator=torch.Generator().manual_seed(seed))"
                              " gives the classes of noprop_dist.load_chain(run_dir).predict(images, seed)"),
        "mean": json.dumps(list(trained.extra["mean"])), "std": json.dumps(list(trained.extra["std"])),
        "class_names": json.dumps(trained.class_names),
    }


@torch.no_grad()
def _write_onnx(graph: InferenceGraph, example: tuple[torch.Tensor, torch.Tensor], path: str,
                notes: dict[str, str]) -> None:
    """The TorchScript-based exporter (dynamo=False): it traces the Python code as it runs, so the chain's
    schedule values become constants and CT / FM's steps unroll; the dynamo exporter has no ONNX translation
    of aten::_cdist_forward, which the nearest-embedding readout and the radial class probabilities use."""
    import onnx

    out_name = graph.output
    torch.onnx.export(graph, example, path, dynamo=False, opset_version=ONNX_OPSET, input_names=["images", "z0"],
                      output_names=[out_name],
                      dynamic_axes={"images": {0: "N"}, "z0": {0: "N"}, out_name: {0: "N"}})
    model = onnx.load(path)
    model.doc_string = f"noprop_dist chain: {notes['images']} and z0 {notes['z0']} -> {notes['output']}. " \
                       f"{notes['reproduce_predict']}."
    onnx.helper.set_model_props(model, notes)
    onnx.save(model, path)


@torch.no_grad()
def _write_torchscript(graph: InferenceGraph, example: tuple[torch.Tensor, torch.Tensor], path: str,
                       notes: dict[str, str]) -> None:
    """torch.jit.trace: the sampler's Python control flow runs once and is recorded, as for ONNX; the batch
    size stays a variable of the traced graph."""
    traced = torch.jit.trace(graph, example, check_trace=False)
    torch.jit.save(traced, path, _extra_files={"noprop_dist.json": json.dumps(notes, indent=1)})


def _runner(path: str, fmt: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The written file, loaded as a user would: (images, z0) numpy -> its output numpy."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda images, z0: session.run(None, {"images": images, "z0": z0})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, and still what users call
        module = torch.jit.load(path)

    @torch.no_grad()
    def run(images: np.ndarray, z0: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(images), torch.from_numpy(z0)).numpy()

    return run


def check_images(trained: TrainedChain, n: int = CHECK_IMAGES) -> tuple[np.ndarray, str]:
    """(uint8 (n, C, H, W), what they are): the first n test images of the run's dataset, or random images when
    the run's data cannot be reloaded (``data.name: arrays``, or the files are not on this machine)."""
    extra = trained.extra
    if extra.get("dataset") != "arrays":
        try:
            data = load_dataset(extra["dataset"], extra.get("data_root"), test_limit=extra.get("test_limit"),
                                path=extra.get("data_path"), image_size=extra.get("image_size"))
            images = np.ascontiguousarray(data.test_x[:n])
            return images, f"{len(images)} test images of {extra['dataset']}"
        except (DatasetNotFoundError, FileNotFoundError, ValueError):
            pass  # checked on random images below, and the output line says so
    c, h, w = trained.spec.image_shape
    images = np.random.default_rng(0).integers(0, 256, (n, c, h, w), dtype=np.uint8)
    return images, f"{n} random images"


def _compare(run: Callable, trained: TrainedChain, sampler: str, layout: str, output: str,
             images: np.ndarray) -> tuple[float | None, int]:
    """(max |log-probability difference| or None for classes, images whose classes agree) of the written file
    against the torch chain, both started from draw_z0(n, d, 0)."""
    z0 = draw_z0(len(images), trained.spec.embed_dim, 0)
    want = trained.chain(trained.inputs(images), sampler=sampler, z0=z0).numpy()
    got = run(to_layout(images, layout), z0.numpy())
    agree = int((want.argmax(axis=1) == (got if output == "classes" else got.argmax(axis=1))).sum())
    return (None if output == "classes" else float(np.abs(got - want).max())), agree


def _example(trained: TrainedChain, layout: str, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, z0) the exporters trace with: random uint8 images in ``layout`` and draw_z0's z0. n = 3, not 1:
    with a batch of one the tracer could take the batch axis for a broadcast axis."""
    c, h, w = trained.spec.image_shape
    images = np.random.default_rng(1).integers(0, 256, (n, c, h, w), dtype=np.uint8)
    return torch.from_numpy(to_layout(images, layout)), draw_z0(n, trained.spec.embed_dim, 0)


def export_chain(run_dir: str, out: str, fmt: str = "onnx", sampler: str | None = None, steps: int | None = None,
                 layout: str = "nchw", output: str = "logits", block: Callable | None = None) -> ExportResult:
    """Write ``RUN_DIR/chain.pt`` as one inference file ``out`` (see the module docstring), load it again and
    check it against the torch chain; ``out`` is only written when the check passes.

    sampler: one of :func:`exportable_samplers` (default: the run's); steps: CT / FM inference steps (default:
    the run's ``model.inference_steps``); layout: nchw | nhw (one channel) | nhwc (three channels); output:
    logits | classes; block: the block factory, for a chain whose block cannot be imported by its path.
    ExportError / ValueError / FileNotFoundError: one line naming the option or file."""
    _require(fmt)
    if output not in OUTPUTS:
        raise ExportError(f"--output {output}: unknown; allowed: {', '.join(OUTPUTS)}")
    trained = load_chain(run_dir, steps=steps, block=block)
    spec = trained.spec
    name = _check_sampler(trained, sampler)
    _check_layout(layout, spec.image_shape)
    graph = InferenceGraph(trained, name, layout, output).eval().requires_grad_(False)
    example = _example(trained, layout)
    notes = _notes(trained, run_dir, name, layout, output)
    # written beside out and renamed once checked: out is either the checked file or untouched
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.{os.getpid()}.partial")
    try:
        open(tmp, "wb").close()
    except OSError as e:
        raise ExportError(f"--out {out}: cannot be written ({e.strerror or e})") from None
    try:
        start = time.perf_counter()
        with warnings.catch_warnings():
            # The tracer warns at each Python value it records as a constant (the schedule, the step times), by
            # design here, and torch.onnx / torch.jit that these exporters are deprecated.
            for category in (torch.jit.TracerWarning, FutureWarning, DeprecationWarning):
                warnings.simplefilter("ignore", category)
            try:
                (_write_onnx if fmt == "onnx" else _write_torchscript)(graph, example, tmp, notes)
            except (RuntimeError, TypeError, ValueError) as e:  # e.g. an operator of the block with no ONNX form
                raise ExportError(f"{run_dir}: the chain (model.block {spec.block}) could not be exported to {fmt}: "
                                  f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
        seconds = time.perf_counter() - start
        images, what = check_images(trained)
        diff, agree = _compare(_runner(tmp, fmt), trained, name, layout, output, images)
        if agree != len(images) or (diff is not None and diff > CHECK_TOLERANCE):
            raise ExportError(f"{out}: the exported {fmt} file disagrees with the torch chain on {what} (classes agree "
                              f"on {agree}/{len(images)}, max |logit difference| {diff}); nothing written")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    shape = ", ".join(map(str, input_shape(layout, spec.image_shape)))
    return ExportResult(
        path=out, format=fmt, size_bytes=os.path.getsize(out),
        inputs={"images": f"uint8 ({shape})", "z0": f"float32 (N, {spec.embed_dim})"},
        output="classes int64 (N,)" if output == "classes" else f"logits float32 (N, {spec.num_classes})",
        method=spec.method, sampler=name, steps=get_method(spec.method).steps(spec.inference_steps),
        layout=layout, export_seconds=seconds, check_images=what, checked=len(images), max_logit_difference=diff,
        classes_agree=agree)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m noprop_dist.export", description=__doc__.splitlines()[0],
        epilog="The file takes images (uint8, in --layout) and z0 (float32 (N, d)); z0 = torch.randn((N, d), "
               "generator=torch.Generator().manual_seed(seed)) gives the classes of "
               "noprop_dist.load_chain(RUN_DIR).predict(images, seed). docs/export.md")
    p.add_argument("run_dir", help="a finished run's directory (it holds chain.pt)")
    p.add_argument("--format", required=True, metavar="|".join(FORMATS), help="onnx (onnxruntime) or torchscript "
                   "(torch.jit.load)")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (exactly this name)")
    p.add_argument("--sampler", help="mean | stage_average (DT) | ode (CT); samplers with noise after z_0 (eq3, "
                   "ensemble) cannot be exported (default: the run's eval.sampler)")
    p.add_argument("--steps", type=int, help="CT / FM: inference steps, unrolled into the file (default: "
                   "model.inference_steps of the run)")
    p.add_argument("--layout", default="nchw", metavar="|".join(LAYOUTS),
                   help="the images input's layout, fixed in the file: nchw (N, C, H, W), nhw (N, H, W) for "
                        "one-channel runs, nhwc (N, H, W, C) for three-channel runs (default: %(default)s)")
    p.add_argument("--output", default="logits", metavar="|".join(OUTPUTS),
                   help="logits: class log-probabilities float32 (N, m); classes: int64 (N,) (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        result = export_chain(args.run_dir, args.out, args.format, args.sampler, args.steps, args.layout,
                              args.output)
    except (FileNotFoundError, DatasetNotFoundError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(result.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
