"""Which blocks (shards) each worker trains, and the name of a worker's shared-state replica."""
from __future__ import annotations


def assign_shards(num_blocks: int, num_workers: int) -> list[list[int]]:
    """Blocks 1..T in contiguous, balanced groups: T=10, W=3 -> [[1,2,3,4],[5,6,7],[8,9,10]]."""
    if not 1 <= num_workers <= num_blocks:
        raise ValueError(f"num_workers must be in [1, {num_blocks}], got {num_workers}")
    base, extra = divmod(num_blocks, num_workers)
    groups, start = [], 1
    for w in range(num_workers):
        size = base + (1 if w < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def replica_key(shard_ids: list[int]) -> str:
    """'1-5' for blocks 1..5: the checkpoint name of the replica state of the worker that trains them."""
    return f"{shard_ids[0]}-{shard_ids[-1]}" if len(shard_ids) > 1 else str(shard_ids[0])
