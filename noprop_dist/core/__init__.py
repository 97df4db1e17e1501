"""Method core: pure torch (no Ray, no metrics). Schedules, blocks, shared state, losses, the chain."""
from .blocks import DTBlock, ModelSpec, build_block
from .chain import DTChain, evaluate_chain
from .objectives import block_loss, class_logits, denoised_estimate, shard_loss, shared_loss
from .schedule import DTSchedule, cosine_abar, sample_marginal
from .shared import SharedState, build_shared, prototype_embedding

__all__ = [
    "DTBlock", "ModelSpec", "build_block", "DTChain", "evaluate_chain", "block_loss", "class_logits",
    "denoised_estimate", "shard_loss", "shared_loss", "DTSchedule", "cosine_abar", "sample_marginal",
    "SharedState", "build_shared", "prototype_embedding",
]
