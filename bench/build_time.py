"""Time of ``massmerge build --device D`` for CLIP ViT-B/16-sized experts, and the device memory it peaks at.

Each round runs the real command in a fresh process (``python -m massmerge build ... --device D``) on seeded
random experts of a ViT-B/16 vision tower (12 x 768, MLP 3072, patch 16, 224 px: the shape of the paper's
ViT-B/16 experts; full-rank deltas, the SVDs' worst case), and a second process reads the same files once
(the I/O floor). Peak device memory comes from an in-process run through the CLI's ``main`` (CUDA only).
Wall and CPU seconds are both printed; T = 8 and 20 by default.

    python bench/build_time.py --device cuda [--tasks 8 20] [--rounds 2]
    python bench/build_time.py --device cpu --depth 2 --tasks 2 --rounds 1   # a quick check of the script
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DELTA_SCALE, table, timed_process, write_heads, write_json  # noqa: E402

PEAK = """
import sys, torch
from massmerge.cli import main
device = sys.argv[1]
torch.cuda.reset_peak_memory_stats(device)
try:
    main(sys.argv[2:])
except SystemExit as done:
    if done.code:
        raise
print("PEAK", torch.cuda.max_memory_allocated(device))
"""


def vit_b16(depth: int):  # noqa: ANN201
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=depth, num_attention_heads=12,
                              image_size=224, patch_size=16, projection_dim=512)
    torch.manual_seed(0)
    return CLIPVisionModel(config).eval()


def zoo(root: Path, depth: int, count: int) -> tuple[Path, list[Path]]:
    """The base and ``count`` experts (base + a seeded full-rank delta) as HF directories."""
    model = vit_b16(depth)
    base = root / "base"
    model.save_pretrained(str(base))
    experts = []
    for t in range(count):
        gen = torch.Generator().manual_seed(1000 + t)
        with torch.no_grad():
            expert = vit_b16(depth)
            for p in expert.parameters():
                p.add_(DELTA_SCALE * torch.randn(p.shape, generator=gen))
        experts.append(root / f"expert{t:02d}")
        expert.save_pretrained(str(experts[-1]))
    return base, experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 20])
    parser.add_argument("--depth", type=int, default=12, help="blocks of the tower (12: ViT-B/16)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="massmerge-build-time-") as tmp_name:
        tmp = Path(tmp_name)
        base, experts = zoo(tmp / "zoo", args.depth, max(args.tasks))
        heads = write_heads(tmp / "heads", max(args.tasks), 512)
        for count in args.tasks:
            build = ["build", "--base", str(base), "--experts", *map(str, experts[:count]), "--heads",
                     *map(str, heads[:count]), "--output", str(tmp / f"art{count}"), "--device", args.device]
            samples = [timed_process([sys.executable, "-m", "massmerge", *build]) for _ in range(args.rounds)]
            peak = None
            if args.device.startswith("cuda"):
                probe = subprocess.run([sys.executable, "-c", PEAK, args.device, *build], capture_output=True,
                                       text=True, check=True)
                peak = int(probe.stdout.split("PEAK")[-1]) / 2**20
            wall = sorted(w for w, _ in samples)[len(samples) // 2]
            cpu = sorted(c for _, c in samples)[len(samples) // 2]
            rows.append({"tasks": count, "device": args.device, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                         "peak_device_MiB": None if peak is None else round(peak, 1), "rounds": args.rounds})
    print(table(rows, list(rows[0])))
    print(f"\nCLIP ViT-B/16-sized vision tower ({args.depth} blocks), full-rank random deltas; massmerge build "
          f"--device {args.device}, whole processes (median of {args.rounds})")
    print(f"wrote {write_json('build_time', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
