"""The initial scale of the baselines' classifier head (backprop and adjoint alike; the paper leaves it open).

Both baselines classify a state that is a convex mixture of class embeddings: z_T = sum_c p_c u_c (+ what is
left of z_0's noise), so their logits ``head(z) = W z + b`` can only be as wide as ``W @ u_c`` is. With
PyTorch's default ``Linear`` init (|w| <= 1/sqrt(d)) and embeddings of norm about 1, the logits start with a
standard deviation of about 0.2, and AdamW at lr 1e-3 widens them by about 1e-3 per step; meanwhile the
gradient reaching the chain, W^T (p - y), is as small as W. The chain then learns slowly for hundreds of
steps (``benchmarks/baseline_start.py`` measures it). NoProp-DT does not need this: its head is trained on targets
u_y directly, and its prediction is an argmax.

The rule: scale W so that the initial logits at the class embeddings have standard deviation
``HEAD_LOGIT_STD``. The gain depends on the embedding's scale (11.4 for one-hot, 15.4 for learned d = 20,
3.2 and 4.4 for prototypes of digits and Fashion-MNIST, whose rows are whole images); the bias keeps its
default init.
"""
from __future__ import annotations

import torch

from ..core import SharedState

# A softmax over 10 logits with this spread starts neither uniform nor saturated (on average 0.53 on the most
# likely class); it is about x10 on the default init of a one-hot head, what baseline_start.py first tried.
HEAD_LOGIT_STD = 2.0


@torch.no_grad()
def widen_head(shared: SharedState, logit_std: float = HEAD_LOGIT_STD) -> float:
    """Scale ``shared.head.weight`` (m, d) in place so that std(W @ W_embed^T) = ``logit_std``; returns the gain.

    W_embed (m, d) is taken as initialised (learned and prototype embeddings train on from there). A prototype
    replica built without its prototypes (W_embed all zero, its values to come from ``load_state_dict``, head
    included) is left as it is: gain 1.
    """
    if logit_std <= 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std}")
    spread = float((shared.embed.detach().to(shared.head.weight.dtype) @ shared.head.weight.T).std())
    if spread == 0.0:
        return 1.0
    gain = logit_std / spread
    shared.head.weight.mul_(gain)
    return gain
