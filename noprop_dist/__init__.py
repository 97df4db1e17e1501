"""Layer-parallel NoProp training on Ray.

    import noprop_dist
    result = noprop_dist.train("mnist", train={"epochs": 3})     # summary and run dir
    chain = noprop_dist.load_chain(result.run_dir)              # predicts from raw images, no Ray

Your own images and blocks: ``noprop_dist.train(config, dataset=noprop_dist.ImageDataset.from_arrays(...),
block=factory)``, a factory taking a :class:`noprop_dist.BlockSpec` (docs/your_data_and_blocks.md).
"""
from typing import Any

from .api import TrainResult, load_chain, train

__all__ = ["BlockSpec", "ImageDataset", "TrainResult", "load_chain", "train"]


def __getattr__(name: str) -> Any:
    """ImageDataset and BlockSpec, imported on first use: ``import noprop_dist`` stays free of torch."""
    if name == "ImageDataset":
        from .data import ImageDataset

        return ImageDataset
    if name == "BlockSpec":
        from .core import BlockSpec

        return BlockSpec
    raise AttributeError(f"module 'noprop_dist' has no attribute {name!r}")
