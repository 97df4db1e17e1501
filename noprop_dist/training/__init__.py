"""One process's training of its shards, the same code for a Ray worker and for the in-process reference run.

- :mod:`.spec`: the ModelSpec a config asks for, the initial prototypes;
- :mod:`.assignment`: which shards each worker trains;
- :mod:`.loop`: the shard loop (``ShardGroup``, ``ShardTrainer``, ``ShardStats``);
- :mod:`.optimizer`: the shards' AdamW (torch's fused kernel, without torch.optim's import of torch._dynamo);
- :mod:`.shared_state`: the parameter server's logic and its clients, without Ray;
- :mod:`.evaluation`: the assembled chain and its evaluation;
- :mod:`.hardware`: precision and peak memory of the process;
- :mod:`.reference`: the in-process reference run.
"""
from .assignment import assign_shards, replica_key
from .evaluation import (
    assemble_chain,
    evaluate_states,
    final_evaluation,
    split_accuracy,
)
from .hardware import native_bf16, peak_rss_mb, resolve_precision
from .loop import (
    ShardStats,
    ShardTrainer,
    ShardGroup,
    TrainingData,
    clone_state,
    lr_schedule_factor,
    nonfinite,
)
from .reference import train_in_process
from .spec import checked_spec, initial_prototypes, model_spec

__all__ = [
    "ShardStats", "ShardTrainer", "ShardGroup", "TrainingData", "assemble_chain", "assign_shards", "checked_spec",
    "clone_state",
    "evaluate_states", "final_evaluation", "initial_prototypes", "lr_schedule_factor", "model_spec", "native_bf16",
    "nonfinite", "peak_rss_mb", "replica_key", "resolve_precision", "split_accuracy", "train_in_process",
]
