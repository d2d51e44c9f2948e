"""Shared fixtures: small random low-rank task vectors whose answers can be computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch


from lowrank_fixtures import low_rank


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def small_model_state(rng: np.random.Generator) -> tuple[dict, list[dict]]:
    """A float64 base with two matrices, a bias and an int buffer, and 3 low-rank task vectors."""
    base = {
        "layer.weight": torch.from_numpy(rng.standard_normal((12, 10))),
        "layer.bias": torch.from_numpy(rng.standard_normal(12)),
        "proj.weight": torch.from_numpy(rng.standard_normal((6, 12))),
        "steps": torch.arange(4),
    }
    tvs = []
    for _ in range(3):
        tvs.append({
            "layer.weight": low_rank(rng, 12, 10, 3, 0.1),
            "layer.bias": torch.from_numpy(0.1 * rng.standard_normal(12)),
            "proj.weight": low_rank(rng, 6, 12, 2, 0.1),
        })
    return base, tvs


def _devices() -> list:
    """CPU always; CUDA and MPS where this machine has them (skipped, with the reason, where it does not)."""
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return ["cpu",
            pytest.param("cuda", marks=pytest.mark.skipif(not cuda, reason="no CUDA GPU on this machine")),
            pytest.param("mps", marks=pytest.mark.skipif(not mps, reason="no MPS backend on this machine"))]


@pytest.fixture(params=_devices())
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device present: the device tests run on CPU always and on CUDA / MPS when the machine has them."""
    return torch.device(request.param)
