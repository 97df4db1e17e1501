"""Method core: pure torch (no Ray, no metrics). Split as the diffusion and flow-matching libraries split theirs:

- blocks.py, ct_blocks.py, fig6.py, resnet.py: the shard networks; shared.py: the shared state (W_embed, head,
  CT's schedule); seeds.py: every seed derived from train.seed.
- schedules.py: the noise schedules (NoProp-DT's cosine, NoProp-CT's learned) and Eq. 3's coefficients.
- paths.py: each method's z_t between noise and label (marginals, FM's path and field), what a network's logits
  stand for on it, and CT / FM's time partition (partition.py: its closed forms on log-SNR levels).
- losses.py: one shard loss per method, of one signature.
- samplers.py: the inference samplers, free functions of one signature, by name per chain class.
- chain.py: the chains (DTChain, CTChain, FMChain); chain_file.py: chain.pt, written, read, checked, built.
- scoring.py: a chain's accuracy and per-stage counts on a split.

Which shard loss and chain class a method has is its ``noprop_dist.registry.METHODS`` entry's:
``get_method(spec.method).shard_loss(...)``; :func:`build_chain` and :func:`load_chain_file` assemble the chain
of any method.
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
from .chain import ContinuousChain, CTChain, DTChain, FMChain
from .chain_file import build_chain, load_chain_file
from .ct_blocks import CTBlock, build_ct_block, sinusoidal_time_embedding
from .losses import (
    block_loss,
    ct_shard_loss,
    dt_shard_loss,
    fm_shard_loss,
    shared_loss,
)
from .paths import (
    class_logits,
    denoised_estimate,
    fm_path,
    randn_like,
    sample_marginal,
    sample_times,
    shard_interval,
    step_shards,
)
from .samplers import euler_integrate, mean_probabilities
from .schedules import DTSchedule, LearnedSchedule, cosine_abar
from .scoring import (
    StageCounts,
    batch_parts,
    count_stages,
    default_device,
    evaluate_chain,
    evaluate_stages,
)
from .shared import SharedState, build_shared, prototype_embedding

__all__ = [
    "BlockError", "BlockSpec", "DTBlock", "ModelSpec", "build_block", "build_shard", "make_shard", "DTChain",
    "StageCounts", "batch_parts", "build_chain", "count_stages", "default_device", "evaluate_chain",
    "evaluate_stages", "load_chain_file", "mean_probabilities", "block_loss", "class_logits", "denoised_estimate",
    "dt_shard_loss", "shared_loss", "DTSchedule", "cosine_abar", "randn_like", "sample_marginal", "SharedState",
    "build_shared", "prototype_embedding", "ContinuousChain", "CTChain", "FMChain", "ct_shard_loss",
    "euler_integrate", "fm_path", "fm_shard_loss", "sample_times", "shard_interval", "step_shards", "CTBlock",
    "build_ct_block", "sinusoidal_time_embedding", "LearnedSchedule",
]
