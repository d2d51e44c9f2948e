"""A tiny token model with every kind of parameter the fast path treats differently, and MASS parts for it.

Linear layers (side branch or dense), an Embedding (embedding side path), a 2-D position table used directly
by the parent's code (dense swap), LayerNorms and biases (non-matrix deltas), and a routing layer mid-depth.
"""

from __future__ import annotations

import torch
from torch import nn

from massmerge.heads import LinearHead, ZeroShotHead
from massmerge.mass import ExpertFactors, MASSModel, make_serve_settings, mean_pool

VOCAB, LENGTH, WIDTH, DEPTH, CLASSES = 40, 6, 16, 4, 5
ROUTING_LAYER = "blocks.2.fc1"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.fc2 = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class ToyEncoder(nn.Module):
    """ids [B, L] -> features [B, WIDTH]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(0.1 * torch.randn(LENGTH, WIDTH))
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.final = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.final(x.mean(dim=1))


def make_experts(base: ToyEncoder, num_tasks: int, seed: int = 0, scale: float = 0.3) -> list[dict[str, torch.Tensor]]:
    """Task vectors: low-rank matrix deltas plus small non-matrix deltas, deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    tvs = []
    for _ in range(num_tasks):
        tv = {}
        for key, value in base.state_dict().items():
            if value.ndim == 2:
                m, n = value.shape
                tv[key] = scale * torch.randn(m, 3, generator=gen) @ torch.randn(3, n, generator=gen) / n ** 0.5
            else:
                tv[key] = 0.05 * torch.randn(value.shape, generator=gen)
        tvs.append(tv)
    return tvs


def make_heads(num_tasks: int, seed: int = 1) -> list[nn.Module]:
    gen = torch.Generator().manual_seed(seed)
    heads: list[nn.Module] = []
    for t in range(num_tasks):
        weight = torch.randn(CLASSES + t, WIDTH, generator=gen)
        heads.append(ZeroShotHead(weight, 50.0) if t % 2 else LinearHead(weight, torch.randn(CLASSES + t, generator=gen)))
    return heads


def make_parts(num_tasks: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32, **settings):
    """(base model, factors, heads, serve settings) of a toy MASS model."""
    torch.manual_seed(seed)
    base = ToyEncoder().to(dtype).eval()
    names = [f"task{t}" for t in range(num_tasks)]
    factors = ExpertFactors.build(iter(make_experts(base, num_tasks, seed)), names, eps=0.3)
    cfg = make_serve_settings(routing_layers=(ROUTING_LAYER,), **settings)
    return base, factors, make_heads(num_tasks), cfg


def make_model(num_tasks: int = 4, seed: int = 0, cls: type = MASSModel, **options) -> MASSModel:
    base, factors, heads, cfg = make_parts(num_tasks, seed)
    return cls(base, factors, heads, cfg, pool=mean_pool(), **options)


def make_batch(size: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (size, LENGTH), generator=torch.Generator().manual_seed(seed))
