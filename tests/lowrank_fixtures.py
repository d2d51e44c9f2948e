"""Random low-rank matrices for the math tests (a uniquely named module: several conftest.py files exist)."""

from __future__ import annotations

import numpy as np
import torch


def low_rank(rng: np.random.Generator, m: int, n: int, rank: int, scale: float = 1.0) -> torch.Tensor:
    """A random float64 m x n matrix of exactly ``rank``."""
    return torch.from_numpy(scale * rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)))


def rel(a, b) -> float:
    """Relative error ||a - b|| / ||b|| in float64."""
    a, b = (np.asarray(x.detach() if isinstance(x, torch.Tensor) else x, dtype=np.float64) for x in (a, b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ----- the paper's router rule, in numpy --------------------------------------------------------------------

def ref_probs(z, bases, tau):
    r = np.array([[np.linalg.norm(zi - V @ V.T @ zi) for V in bases] for zi in z])
    scores = -r
    std = scores.std(axis=1, ddof=1, keepdims=True)
    x = (scores - scores.mean(axis=1, keepdims=True)) / (std + 1e-6) / tau
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return r, e / e.sum(axis=1, keepdims=True)


def random_bases(rng, d, k, count):
    return [np.linalg.qr(rng.standard_normal((d, k)))[0] for _ in range(count)]
