"""Method core: pure torch (no Ray, no metrics). Schedules, blocks, shared state, losses, the chain.

``variants`` dispatches on spec.method; its ``shard_loss`` is reached as ``core.variants.shard_loss`` (the
package-level ``shard_loss`` stays the DT function, with its DT signature).
"""
from .blocks import (
    BlockError,
    BlockSpec,
    DTBlock,
    ModelSpec,
    build_block,
    build_shard,
    make_shard,
)
from .chain import (
    DTChain,
    StageCounts,
    batch_parts,
    count_stages,
    default_device,
    evaluate_chain,
    evaluate_stages,
    mean_probabilities,
)
from .continuous import (
    ContinuousChain,
    continuous_shard_loss,
    ct_shard_loss,
    euler_integrate,
    fm_path,
    fm_shard_loss,
    sample_times,
    shard_interval,
    step_shards,
)
from .ct_blocks import CTBlock, build_ct_block, sinusoidal_time_embedding
from .ct_schedule import LearnedSchedule
from .objectives import (
    block_loss,
    class_logits,
    denoised_estimate,
    shard_loss,
    shared_loss,
)
from .schedule import DTSchedule, cosine_abar, randn_like, sample_marginal
from .shared import SharedState, build_shared, prototype_embedding
from .variants import build_chain, load_chain

__all__ = [
    "BlockError", "BlockSpec", "DTBlock", "ModelSpec", "build_block", "build_shard", "make_shard", "DTChain", "StageCounts", "batch_parts", "count_stages", "default_device",
    "evaluate_chain", "evaluate_stages",
    "mean_probabilities", "block_loss", "class_logits",
    "denoised_estimate", "shard_loss", "shared_loss", "DTSchedule", "cosine_abar", "randn_like", "sample_marginal",
    "SharedState", "build_shared", "prototype_embedding",
    "ContinuousChain", "continuous_shard_loss", "ct_shard_loss", "euler_integrate", "fm_path", "fm_shard_loss",
    "sample_times", "shard_interval", "step_shards", "CTBlock", "build_ct_block", "sinusoidal_time_embedding",
    "LearnedSchedule", "build_chain", "load_chain",
]
