"""Baselines of the NoProp paper (Table 1), selected by ``model.method``: ``backprop`` (the DT blocks chained
and trained end to end, Eq. 17-19), ``adjoint`` (a neural ODE with the CT network as vector field, adjoint
gradients) and ``dtp`` (Difference Target Propagation, Lee et al. 2015). ``run_baseline(cfg)`` trains one and
writes the same summary.json keys as the NoProp driver."""
from .runner import run_baseline

__all__ = ["run_baseline"]
