"""MASS: MoErging through Adaptive Subspace Selection (per-task factors, data-free router, two-pass model)."""

from massmerge.mass.config import MASSConfig, make_config
from massmerge.mass.experts import ExpertFactors
from massmerge.mass.model import MASSModel, MASSOutput
from massmerge.mass.pooling import identity_pool, mean_pool, token_pool

__all__ = [
    "ExpertFactors",
    "MASSConfig",
    "MASSModel",
    "MASSOutput",
    "identity_pool",
    "make_config",
    "mean_pool",
    "token_pool",
]
