"""The paper's benchmark path end to end offline: `massmerge evaluate` on hub ids only (base, experts and test
sets), resolved from a local HF hub cache the test lays out, with HF_HUB_OFFLINE=1, in a fresh process.

The same config shape as examples/clip_vit_b32_8tasks.yaml, on a tiny CLIP vision tower and image-folder dataset
repos; a second run resumes from the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from PIL import Image
from hub_fixtures import cache_repo
from tiny_models import low_rank_deltas, perturbed, save_clip_vision, save_prefixed

CLASSES = {"alpha": ["cat", "dog"], "beta": ["red", "green", "blue"]}


def image_repo(root: Path, classes: list[str], seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    for name in classes:
        (root / "test" / name).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "test" / name / f"{i}.png")
    return root


def test_evaluate_resolves_every_hub_id_offline(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    model, base_dir = save_clip_vision(tmp_path / "files")
    cache_repo(hf_home, "tiny-org/clip-vit-tiny", base_dir)
    tasks = []
    for seed, (task, classes) in enumerate(CLASSES.items(), start=1):
        state = perturbed(model, low_rank_deltas(model, seed=seed))
        state["classifier.weight"] = torch.randn(len(classes), 32, generator=torch.Generator().manual_seed(seed))
        state["classifier.bias"] = torch.zeros(len(classes))
        cache_repo(hf_home, f"tiny-org/clip-vit-tiny_{task}", save_prefixed(state, tmp_path / f"e_{task}", "vision_model."))
        cache_repo(hf_home, f"tiny-org/{task}", image_repo(tmp_path / f"d_{task}", classes, seed), "dataset")
        tasks.append({"name": task, "expert": f"tiny-org/clip-vit-tiny_{task}", "dataset": f"tiny-org/{task}",
                      "classnames": classes})
    config = {"family": "clip", "base": "tiny-org/clip-vit-tiny", "heads": "linear", "tasks": tasks,
              "methods": ["zeroshot", "experts", "tsv_m", "mass"], "eval": {"batch_size": 4},
              "output": str(tmp_path / "out")}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_home / "hub")}
    command = [sys.executable, "-m", "massmerge", "evaluate", "--config", str(tmp_path / "bench.yaml"),
               "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [t["source"]["expert"] for t in report["tasks"]] == ["tiny-org/clip-vit-tiny_alpha", "tiny-org/clip-vit-tiny_beta"]
    assert [t["sizes"]["test"] for t in report["tasks"]] == [6, 9]
    assert {"experts", "tsv_m", "MASS"} <= set(report["methods"])
    assert "device: cpu" in first.stderr
    cached = sorted(p.name for p in (tmp_path / "cache" / "evals").iterdir())
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["methods"] == report["methods"]
    assert sorted(p.name for p in (tmp_path / "cache" / "evals").iterdir()) == cached  # resumed from the cache
