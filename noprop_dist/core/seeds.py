"""The seeds a run derives from ``train.seed``, one function per random stream.

Each is a function of the seed and of what the stream belongs to (shard, epoch, rank) only, so every process
draws the same numbers and a resumed run repeats an uninterrupted one. The prototype embedding's subset and
the validation split take ``train.seed`` as it is.

The largest is ``baseline_noise_seed``'s seed * 2_000_003 + epoch * 7_927 + rank: with ``train.seed`` at most
``config.MAX_TRAIN_SEED`` (2**32 - 1) every seed stays within what torch's ``manual_seed`` takes (2**64 - 1).
"""
from __future__ import annotations

# Initial weights: seed * _INIT_STRIDE plus an offset per network, so that a DT-form shard (offset k <= 1000),
# a time-conditioned one (_TIME_CONDITIONED + k), DTP's network and the shared state never share a seed.
_INIT_STRIDE = 100_003
_TIME_CONDITIONED = 500_009
_DTP_NET = 777_767
_SHARED_STATE = 999_983


def shard_init_seed(seed: int, k: int, time_conditioned: bool) -> int:
    """Shard k's (1..num_shards) initial weights; ``time_conditioned``: a network that takes the time t."""
    return seed * _INIT_STRIDE + (_TIME_CONDITIONED if time_conditioned else 0) + k


def shared_init_seed(seed: int) -> int:
    """The shared state's initial values (W_embed, the head; CT: the noise schedule)."""
    return seed * _INIT_STRIDE + _SHARED_STATE


def dtp_init_seed(seed: int) -> int:
    """The DTP baseline's network's initial weights."""
    return seed * _INIT_STRIDE + _DTP_NET


def block_noise_seed(seed: int, t: int) -> int:
    """Block t's generator of the noise (and CT / FM times) its local loss draws, for the whole run."""
    return seed * 1_000 + t


def epoch_order_seed(seed: int, epoch: int) -> int:
    """The epoch's sample order, the same for every block, worker and rank."""
    return seed * 7_919 + epoch


def global_rng_seed(seed: int, epoch: int, first: int) -> int:
    """torch's global generator (dropout, and any draw without a generator of its own) in one process for an
    epoch; ``first``: its first shard (a NoProp worker's group) or its rank (a baseline)."""
    return seed * 1_000_003 + epoch * 1_009 + first


def baseline_noise_seed(seed: int, epoch: int, rank: int) -> int:
    """The generator a baseline's steps draw their noise from (z_0, DTP's corruption) in an epoch, per rank."""
    return seed * 2_000_003 + epoch * 7_927 + rank
