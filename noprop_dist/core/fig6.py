"""``model.block: fig6``, the paper's Fig. 6 networks (NOPROP.md, "Block architecture"): NoProp-DT's block, and
NoProp-CT / FM's network without BatchNorm and with a time path."""
from __future__ import annotations

from torch import nn

from .blocks import BlockSpec, DTBlock
from .ct_blocks import CTBlock


def fig6(spec: BlockSpec) -> nn.Module:
    """The Fig. 6 network of one shard: :class:`DTBlock` ``(z, x)`` or, time-conditioned, :class:`CTBlock`
    ``(z, x, t)``."""
    return CTBlock(spec) if spec.time_conditioned else DTBlock(spec)
