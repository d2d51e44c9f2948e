"""The shipped ``examples/*.yaml`` benchmark configs: each one loads with the real schema loader, and the paper's
task sets are spelled consistently (no network: only the YAML files and the package's clip_tasks.json are read)."""

from __future__ import annotations

from pathlib import Path

import pytest

from massmerge.errors import OptionError
from massmerge.experiments.evaluate_config import BenchmarkConfig, load_benchmark_config
from massmerge.heads.zoo import benchmark_tasks, clip_task

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
B32 = {n: EXAMPLES / f"clip_vit_b32_{n}tasks.yaml" for n in (8, 14, 20)}


def _names(config: BenchmarkConfig) -> list[str]:
    return [t.name for t in config.tasks]


def test_the_examples_exist() -> None:
    assert {p.name for p in CONFIGS} >= {
        "clip_vit_b32_8tasks.yaml", "clip_vit_b32_14tasks.yaml", "clip_vit_b32_20tasks.yaml",
        "clip_vit_b16_8tasks.yaml", "clip_vit_l14_8tasks.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_parses_with_unique_tasks_and_class_names(path: Path) -> None:
    config = load_benchmark_config(path)
    names = _names(config)
    assert len(names) == len(set(names)), f"{path.name}: a task is listed twice"
    if config.family == "seq2seq":  # generation: label words come from the GLUE protocol, not class names
        return
    for task in config.tasks:
        if task.classnames and task.templates:
            classnames, templates = task.classnames, task.templates
        else:
            try:
                shipped = clip_task(task.name)
            except OptionError:
                pytest.fail(f"{path.name}: task '{task.name}' has no shipped class names and gives none")
            classnames = task.classnames or shipped["classnames"]
            templates = task.templates or shipped["templates"]
        assert classnames and len(set(classnames)) == len(classnames), f"{path.name}: {task.name} class names"
        assert templates and all("{}" in t for t in templates), f"{path.name}: {task.name} templates"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_uses_one_expert_per_task_of_its_base(path: Path) -> None:
    config = load_benchmark_config(path)
    experts = [t.expert for t in config.tasks]
    assert len(set(experts)) == len(experts)
    arch = config.base.split("/")[-1]  # e.g. clip-vit-base-patch32
    assert all(e.startswith(f"tanganke/{arch}_") for e in experts), f"{path.name}: an expert of another base"
    assert config.heads == "zeroshot"
    alpha = config.merge_options("task_arithmetic")["alpha"]
    assert "alpha" not in config.method_options.get("task_arithmetic", {})  # defaulted by T, as in the 8-task file
    assert alpha == {8: 0.3, 14: 0.2, 20: 0.1}[len(config.tasks)]


def test_b32_task_sets_are_nested_prefixes_in_fusionbench_order() -> None:
    configs = {n: load_benchmark_config(p) for n, p in B32.items()}
    for n, config in configs.items():
        assert _names(config) == benchmark_tasks(n)  # FusionBench's TA8 / TALL14 / TALL20 order
    small, medium, large = (configs[n].tasks for n in (8, 14, 20))
    assert medium[:8] == small
    assert large[:14] == medium


def test_the_8_task_sets_agree_across_architectures() -> None:
    """The B/16 and L/14 files differ from the B/32 one only in the base and the experts' architecture."""
    b32 = load_benchmark_config(B32[8])
    for name in ("clip_vit_b16_8tasks.yaml", "clip_vit_l14_8tasks.yaml"):
        other = load_benchmark_config(EXAMPLES / name)
        arch = other.base.split("/")[-1]
        assert [(t.name, t.dataset, t.subset, t.split) for t in other.tasks] == \
               [(t.name, t.dataset, t.subset, t.split) for t in b32.tasks]
        assert [t.expert for t in other.tasks] == [t.expert.replace("clip-vit-base-patch32", arch) for t in b32.tasks]
