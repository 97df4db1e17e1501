"""Layer-parallel NoProp training on Ray.

    import noprop_dist
    result = noprop_dist.train("mnist", train={"epochs": 3})     # summary and run dir
    chain = noprop_dist.load_chain(result.run_dir)              # predicts from raw images, no Ray
"""
from .api import TrainResult, load_chain, train

__all__ = ["TrainResult", "load_chain", "train"]
