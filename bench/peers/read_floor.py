"""The read floor: a child that imports torch and reads every tensor of the base and the experts once.

Each tensor is brought into memory and touched (summed), through safetensors' own loader: the least any tool
must do to merge these files. Usage: python read_floor.py BASE_DIR EXPERT_DIR...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open


def read_all(directories: list[str]) -> float:
    total = 0.0
    for directory in directories:
        for file in sorted(Path(directory).glob("*.safetensors")):
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    total += float(tensor.sum(dtype=torch.float64) if tensor.is_floating_point() else tensor.sum())
    return total


if __name__ == "__main__":
    print(read_all(sys.argv[1:]))
