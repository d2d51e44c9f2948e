"""Random low-rank matrices for the math tests (a uniquely named module: several conftest.py files exist)."""

from __future__ import annotations

import numpy as np
import torch


def low_rank(rng: np.random.Generator, m: int, n: int, rank: int, scale: float = 1.0) -> torch.Tensor:
    """A random float64 m x n matrix of exactly ``rank``."""
    return torch.from_numpy(scale * rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)))
