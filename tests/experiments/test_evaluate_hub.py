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
from hub_fixtures import cache_repo
from PIL import Image
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


# ----- every example config's task list against dataset repos laid out as the real ones ----------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example_tasks(path: Path) -> list[dict]:
    from massmerge.heads.zoo import clip_task

    tasks = yaml.safe_load(path.read_text())["tasks"]
    for task in tasks:
        task.setdefault("classnames", None)
        task["n"] = len(task["classnames"] or clip_task(task["name"])["classnames"])
    return tasks


def _cache_example(tmp_path: Path, hf_home: Path, tasks: list[dict], model) -> None:
    from hub_fixtures import dataset_repo

    for seed, task in enumerate(tasks, start=1):
        state = perturbed(model, low_rank_deltas(model, seed=seed))
        state["classifier.weight"] = torch.randn(task["n"], 32, generator=torch.Generator().manual_seed(seed))
        state["classifier.bias"] = torch.zeros(task["n"])
        state["classifier.bias"][seed % task["n"]] = 50.0  # the label of the first test item (dataset_repo's
        # labels are (seed + i) % n): no expert scores 0, which normalized accuracy cannot divide by
        if not (hf_home / "hub" / f"models--{task['expert'].replace('/', '--')}").exists():
            cache_repo(hf_home, task["expert"], save_prefixed(state, tmp_path / f"e{seed}", "vision_model."))
        if not (hf_home / "hub" / f"datasets--{task['dataset'].replace('/', '--')}").exists():
            names = [f"class {i}" for i in range(task["n"])]
            files = tmp_path / "d" / task["dataset"]
            task["labels"] = dataset_repo(files, task["dataset"], names, seed=seed, count=2 + seed % 3)["labels"]
            cache_repo(hf_home, task["dataset"], files, "dataset")


def test_every_example_task_list_runs_on_the_real_dataset_layouts(tmp_path: Path, monkeypatch) -> None:
    """The example configs' tasks (names, dataset ids, subsets, splits, columns) against repos laid out as the real
    ones, offline, with other splits and configs beside the named one whose shards are garbage: the run fails if
    it opens any of them. `massmerge evaluate` runs, end to end, the tasks of the 20-task list that cover every
    layout (SVHN's configs and extra split, a named default config, Food101's validation split, PCAM's valid
    split, a repo without a card, FER2013's webdataset, tanganke's data/); then every task of every example is
    loaded as evaluate loads it (the 20-task list holds every dataset id of the others)."""
    from massmerge.data.images import load_image_dataset

    hf_home = tmp_path / "hf"
    model, base_dir = save_clip_vision(tmp_path / "files")
    cache_repo(hf_home, "tiny-org/clip-vit-tiny", base_dir)
    configs = {path.name: _example_tasks(path) for path in sorted(EXAMPLES.glob("clip_*.yaml"))}  # the image benchmarks
    assert len(configs) >= 5
    tasks = configs["clip_vit_b32_20tasks.yaml"]
    _cache_example(tmp_path, hf_home, tasks, model)
    layouts = {"SUN397", "SVHN", "MNIST", "PCAM", "FER2013", "Food101", "RenderedSST2"}
    run_tasks = [t for t in tasks if t["name"] in layouts]
    assert len(run_tasks) == len(layouts)
    keep = ("name", "expert", "dataset", "subset", "split", "image_column", "label_column", "classnames")
    config = {"family": "clip", "base": "tiny-org/clip-vit-tiny", "heads": "linear",
              "tasks": [{k: t[k] for k in keep if t.get(k) is not None} for t in run_tasks],
              "methods": ["mass"], "eval": {"batch_size": 4, "workers": 1}, "output": str(tmp_path / "out")}
    (tmp_path / "layouts.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_home / "hub")}
    command = [sys.executable, "-m", "massmerge", "evaluate", "--config", str(tmp_path / "layouts.yaml"),
               "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [t["name"] for t in report["tasks"]] == [t["name"] for t in run_tasks]
    assert [t["sizes"]["test"] for t in report["tasks"]] == [len(t["labels"]) for t in run_tasks]
    assert "MASS" in report["methods"]

    from huggingface_hub import constants

    for name, value in (("HF_HOME", hf_home), ("HF_HUB_CACHE", hf_home / "hub"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))  # read at import time
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    by_id = {t["dataset"]: t for t in tasks}
    for name, listed in configs.items():
        for task in listed:
            assert task["dataset"] in by_id, (name, task["dataset"])
            data = load_image_dataset(task["dataset"], split=task.get("split") or "test", subset=task.get("subset"),
                                      image_column=task.get("image_column"), label_column=task.get("label_column"))
            assert len(data.classes) == task["n"] and len(data) == len(by_id[task["dataset"]]["labels"]), name
