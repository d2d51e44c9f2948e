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
CLIP_CONFIGS = sorted(EXAMPLES.glob("clip_*.yaml"))  # the paper's CLIP table (Flan-T5: test_glue_eval.py)
B32 = {n: EXAMPLES / f"clip_vit_b32_{n}tasks.yaml" for n in (8, 14, 20)}
ARCHS = {"b32": "clip-vit-base-patch32", "b16": "clip-vit-base-patch16", "l14": "clip-vit-large-patch14"}
SIZES = (8, 14, 20)

#: FusionBench docs/modelpool/clip_vit.md @ 54c9e8c9d9621620c720452cd8533332a32d3689, "The 20-Task Model
#: Collections": per-task accuracy (%) in TALL20 order, rows "Pre-trained" and "Fine-Tuned" of each table
FUSIONBENCH = {
    "b32": ([63.18, 59.58, 60.27, 45.00, 31.63, 32.53, 48.26, 44.20, 66.45, 60.64, 41.25, 83.32, 97.12, 63.72, 89.83,
             82.36, 63.01, 11.98, 9.95, 58.65],
            [74.86, 78.52, 95.14, 99.07, 97.27, 98.91, 99.58, 79.68, 88.55, 87.96, 71.61, 92.45, 97.55, 88.38, 97.60,
             88.41, 94.75, 95.62, 98.23, 71.28]),
    "b16": ([65.54, 64.68, 66.38, 54.11, 51.99, 43.45, 51.73, 45.00, 71.31, 54.02, 46.39, 88.44, 98.25, 66.33, 90.77,
             87.01, 67.30, 12.44, 11.21, 60.57],
            [78.92, 85.90, 96.56, 99.00, 97.61, 98.99, 99.70, 82.34, 94.88, 90.55, 72.76, 94.49, 98.15, 88.78, 98.28,
             91.87, 94.53, 95.28, 98.10, 75.73]),
    "l14": ([68.22, 77.86, 71.33, 61.19, 58.43, 50.52, 76.31, 55.53, 79.25, 51.21, 49.96, 93.21, 99.36, 75.05, 95.59,
             91.18, 66.96, 12.34, 9.71, 68.92],
            [82.76, 92.77, 97.38, 99.11, 97.92, 99.24, 99.76, 85.48, 97.67, 91.13, 75.93, 95.75, 99.23, 93.00, 99.13,
             94.77, 95.28, 95.43, 98.30, 80.45]),
}
#: the MASS paper's figures (absolute %), as issue 27 transcribes them: B/32 for every method, B/16 and L/14 MASS
PAPER_B32 = {8: {"MASS": 87.0, "tsv_m": 83.2, "iso_cts": 82.0, "SMILE-2": 84.4, "task_arithmetic": 68.8, "experts": 90.3},
             14: {"MASS": 82.9, "tsv_m": 78.6, "iso_cts": 80.6, "SMILE-2": 76.4, "task_arithmetic": 64.6, "experts": 89.0},
             20: {"MASS": 81.1, "tsv_m": 75.6, "iso_cts": 77.0, "SMILE-2": 74.1, "task_arithmetic": 64.0, "experts": 89.5}}
PAPER_MASS = {("b16", 8): 90.6, ("b16", 14): 87.8, ("b16", 20): 81.1, ("l14", 8): 92.9, ("l14", 14): 90.9,
              ("l14", 20): 90.8}


def _names(config: BenchmarkConfig) -> list[str]:
    return [t.name for t in config.tasks]


def test_the_examples_exist() -> None:
    assert {p.name for p in CONFIGS} >= {f"clip_vit_{a}_{n}tasks.yaml" for a in ARCHS for n in SIZES}


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


@pytest.mark.parametrize("arch", ["b16", "l14"])
def test_other_architectures_mirror_b32_task_for_task(arch: str) -> None:
    """The B/16 and L/14 files differ from the B/32 ones only in the base and the experts' architecture."""
    for n in SIZES:
        b32, other = load_benchmark_config(B32[n]), load_benchmark_config(EXAMPLES / f"clip_vit_{arch}_{n}tasks.yaml")
        assert other.base == f"openai/{ARCHS[arch]}"
        assert [t.model_dump(exclude={"expert"}) for t in other.tasks] == [t.model_dump(exclude={"expert"}) for t in b32.tasks]
        assert [t.expert for t in other.tasks] == [t.expert.replace(ARCHS["b32"], ARCHS[arch]) for t in b32.tasks]


@pytest.mark.parametrize("path", CLIP_CONFIGS, ids=lambda p: p.name)
def test_pickle_is_trusted_only_for_a_base_that_has_nothing_else(path: Path) -> None:
    """openai's B/32 and B/16 hold only pytorch_model.bin (read once, weights-only, into safetensors); L/14 has
    model.safetensors, so its file trusts no pickle. No expert's pickle is ever trusted."""
    config = load_benchmark_config(path)
    pickle_only = "large-patch14" not in config.base
    assert config.trust_pickle == ([config.base] if pickle_only else False)
    assert config.trusts_pickle(config.base) is pickle_only
    assert not any(config.trusts_pickle(t.expert) for t in config.tasks)


@pytest.mark.parametrize("path", CLIP_CONFIGS, ids=lambda p: p.name)
def test_mass_runs_with_and_without_deredundancy(path: Path) -> None:
    config = load_benchmark_config(path)
    assert config.mass.eps == 0.3 and config.mass.eps_off_row
    assert {"MASS", "MASS (eps off)"} <= set(config.report_rows())


@pytest.mark.parametrize("path", CLIP_CONFIGS, ids=lambda p: p.name)
def test_reference_figures_are_fusionbench_and_the_paper(path: Path) -> None:
    arch, n = path.stem.split("_")[2], int(path.stem.split("_")[3].removesuffix("tasks"))
    config = load_benchmark_config(path)
    zero, tuned = FUSIONBENCH[arch]
    by_source = {(r.row, "FusionBench" in r.source): r for r in config.reference}
    assert by_source["experts", True].value == pytest.approx(round(sum(tuned[:n]) / n, 2))
    assert by_source["zero-shot", True].value == pytest.approx(round(sum(zero[:n]) / n, 2))
    paper = {r.row: r.value for r in config.reference if "MASS paper" in r.source}
    assert paper == (PAPER_B32[n] if arch == "b32" else {"MASS": PAPER_MASS[arch, n]})
    mass = by_source["MASS", False]
    assert "eps off" in mass.note
    assert mass.normalized == (96.5 if (arch, n) == ("b32", 8) else None)
    flagged = [r for r in config.reference if r.flag]
    if (arch, n) == ("b16", 20):  # 81.1 equals ViT-B/32's 20-task figure: flagged, not copied silently
        assert flagged == [mass] and "ViT-B/32" in mass.flag
    else:
        assert not flagged


def test_reference_rows_must_exist_in_the_report(tmp_path: Path) -> None:
    text = B32[8].read_text().replace("  - {row: tsv_m,", "  - {row: tsv-m,")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(OptionError, match=r"reference: row 'tsv-m' is not a row of an evaluate report") as info:
        load_benchmark_config(tmp_path / "bad.yaml")
    assert "\n" not in str(info.value)


def test_fewer_methods_keep_the_reference_figures() -> None:
    """The headers' `--methods experts,tsv_m,mass` runs with the same file: figures of rows not run stay unused."""
    config = load_benchmark_config(B32[8], methods=["experts", "tsv_m", "mass"])
    assert "SMILE-2" not in config.report_rows() and any(r.row == "SMILE-2" for r in config.reference)
