"""`massmerge evaluate --config bench.yaml` end to end on tiny HF CLIP experts and image folders (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from tiny_models import low_rank_deltas, perturbed, save_clip_vision, save_prefixed

from massmerge.experiments.evaluate_config import load_benchmark_config, parse_benchmark_config
from massmerge.cli import main
from massmerge.data.images import Preprocess, load_image_dataset
from massmerge.errors import OptionError

CLASSES = {"alpha": ["cat", "dog"], "beta": ["red", "green", "blue"]}


def _image_folder(root: Path, classes: list[str], per_class: int = 3, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _bench(tmp_path: Path) -> Path:
    model, base_dir = save_clip_vision(tmp_path)
    tasks = []
    for seed, (task, classes) in enumerate(CLASSES.items(), start=1):
        state = perturbed(model, low_rank_deltas(model, seed=seed))
        gen = torch.Generator().manual_seed(seed)
        state["classifier.weight"] = torch.randn(len(classes), 32, generator=gen)
        state["classifier.bias"] = torch.zeros(len(classes))
        expert = save_prefixed(state, tmp_path / f"expert_{task}", "vision_model.")
        data = _image_folder(tmp_path / f"data_{task}" / "test", classes, seed=seed)
        tasks.append({"name": task, "expert": str(expert), "dataset": str(data.parent), "classnames": classes})
    config = {"family": "clip", "base": str(base_dir), "heads": "linear", "tasks": tasks,
              "methods": ["zeroshot", "experts", "task_arithmetic", "tsv_m", "smile", "mass"],
              "mass": {"rank_fraction": 0.5}, "eval": {"batch_size": 4}, "output": str(tmp_path / "out")}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_evaluate_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _bench(tmp_path)
    args = ["evaluate", "--config", str(config), "--max-samples", "5", "--cache-dir", str(tmp_path / "cache")]
    main(args)  # success returns; failure raises SystemExit
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kind"] == "evaluate" and report["schema_version"] == 3
    assert [t["name"] for t in report["tasks"]] == ["alpha", "beta"]
    assert [t["sizes"]["test"] for t in report["tasks"]] == [5, 5]
    assert report["tasks"][1]["classes"] == ["red", "green", "blue"]
    assert report["config"]["routing_layer"] == "encoder.layers.3.mlp.fc1"
    rows = report["methods"]
    assert list(rows) == ["zero-shot", "zero-shot max-logit", "experts", "task_arithmetic", "task_arithmetic max-logit",
                          "tsv_m", "tsv_m max-logit", "SMILE-2", "SMILE-2 max-logit", "MASS (task given)",
                          "MASS oracle-head", "MASS", "MASS (batch routing)"]
    assert rows["SMILE-2"]["storage_factor"] > 1.0 and rows["SMILE-2"]["serving_ratio"] > 0
    assert rows["MASS (batch routing)"]["kind"] == "batch routing"
    assert rows["experts"]["normalized"] == {t: 1.0 for t, v in rows["experts"]["accuracy"].items() if v > 0}
    assert rows["task_arithmetic"]["options"] == {"alpha": 0.3}
    assert rows["MASS"]["kind"] == "task hidden" and 1.0 < rows["MASS"]["storage_factor"] < 3.0
    mass = report["mass"]
    assert set(mass["routing_accuracy"]) == {"alpha", "beta"}
    assert sum(map(sum, mass["confusion"])) == 10
    assert report["targets"]["mass_average"]["status"] != "not measured"
    assert "| **MASS** | task hidden |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "routing_confusion.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "tsv_m max-logit" in out and "report written to" in out
    cached = sorted(p.name for p in (tmp_path / "cache" / "evals").iterdir())
    assert any(name.startswith("mass-") for name in cached) and any(name.startswith("tsv_m-") for name in cached)
    main(args)  # a rerun reads every score from the cache and reports the same figures
    again = json.loads((tmp_path / "out" / "report.json").read_text())
    assert again["methods"] == report["methods"]
    assert sorted(p.name for p in (tmp_path / "cache" / "evals").iterdir()) == cached


def test_evaluate_shows_progress_per_task(tmp_path: Path) -> None:
    from massmerge import progress
    from massmerge.experiments.evaluate import run_benchmark

    config = load_benchmark_config(_bench(tmp_path))
    stages: set[str] = set()
    with progress.listen(lambda stage, done, total: stages.add(stage)):
        run_benchmark(config, log=lambda line: None, cache_dir=tmp_path / "cache")
    assert {"evaluate tsv_m alpha", "evaluate tsv_m beta", "expert alpha", "MASS task given beta"} <= stages


def test_evaluate_scores_the_model_build_ships(tmp_path: Path) -> None:
    """MASS in `evaluate` is `massmerge build` + `load()` of the same experts: the same stored factors bit for bit,
    the same serve settings, and the same predictions on the test images."""
    from massmerge.artifact import load
    from massmerge.data.images import image_collate
    from massmerge.experiments.evaluate import build_mass, prepare, task_pool
    from massmerge.heads.files import write_head_file
    from massmerge.mass.serving import serve

    config = load_benchmark_config(_bench(tmp_path))
    wb = prepare(config, log=lambda line: None)
    _, served = build_mass(wb)
    heads = []
    for task, head in zip(config.tasks, wb.heads):
        heads.append(tmp_path / f"{task.name}.safetensors")
        write_head_file(heads[-1], head, task=task.name)
    main(["build", "--base", config.base, "--experts", *[t.expert for t in config.tasks], "--heads", *map(str, heads),
          "--rank-fraction", "0.5", "--output", str(tmp_path / "art")])
    built = load(tmp_path / "art", batch_size=config.eval.batch_size)
    assert built.settings == served.mass.settings
    for key, per_task in served.mass.factors.matrices.items():
        for ours, theirs in zip(per_task, built.factors.matrices[key]):
            assert torch.equal(ours.U, theirs.U) and torch.equal(ours.s, theirs.s) and torch.equal(ours.V, theirs.V)
    items = [item for task in task_pool(wb).split("test") for item in task.items()]
    ours = list(serve(served.mass, items, image_collate, batch_size=4))
    theirs = list(serve(built, items, image_collate, batch_size=4))
    assert [(p.task, p.label) for p in ours] == [(p.task, p.label) for p in theirs]
    assert all(torch.equal(a.selected, b.selected) for a, b in zip(ours, theirs))
    assert max(float((a.probs - b.probs).abs().max()) for a, b in zip(ours, theirs)) < 1e-6


def test_bad_config_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({"base": "x", "tasks": [{"name": "a", "expert": "e", "dataset": "d"}] * 2}))
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "task 'a' is listed twice" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(OptionError, match="methods.*unknown method 'tsv'"):
        parse_benchmark_config({"base": "x", "methods": ["tsv"], "tasks": [
            {"name": "a", "expert": "e", "dataset": "d"}, {"name": "b", "expert": "e", "dataset": "d"}]})


def test_image_folder_follows_the_task_class_order(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "colors", ["Blue", "green", "red"], per_class=1)
    data = load_image_dataset(str(root), classnames=["red", "green", "blue"])
    assert data.classes == ["red", "green", "blue"]
    labels = {Path(item).parent.name: label for item, label in data.items}
    assert labels == {"red": 0, "green": 1, "Blue": 2}
    pixels, y = next(data.batches(Preprocess(size=16, crop=16), batch_size=8))
    assert pixels.shape == (3, 3, 16, 16) and y.tolist() == [0, 1, 2]


@pytest.mark.parametrize("num_tasks", range(2, 21))
def test_merge_and_evaluate_use_the_same_defaults(num_tasks: int) -> None:
    """Task Arithmetic's alpha and TSV-M's rank fraction for every T: `evaluate` reads the defaults `merge` uses."""
    import torch

    from massmerge import merging
    from massmerge.experiments.evaluate_config import parse_benchmark_config
    from massmerge.lowrank import rank_fraction_for as default_rank_fraction
    from massmerge.merging.task_arithmetic import default_alpha

    tasks = [{"name": f"t{t}", "expert": f"e{t}", "dataset": f"d{t}"} for t in range(num_tasks)]
    config = parse_benchmark_config({"base": "b", "tasks": tasks})
    alpha = config.merge_options("task_arithmetic")["alpha"]
    assert alpha == default_alpha(num_tasks)
    base = {"w": torch.zeros(2, 2)}
    vectors = [{"w": torch.ones(2, 2)} for _ in range(num_tasks)]
    merged = merging.merge("task_arithmetic", base, vectors)  # what `massmerge merge` runs without --alpha
    assert torch.allclose(merged["w"], torch.full((2, 2), alpha * num_tasks))
    assert default_rank_fraction(num_tasks, None) == pytest.approx(1 / num_tasks)


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "clip_vit_b32_8tasks.yaml"
    config = load_benchmark_config(example)
    assert [t.name for t in config.tasks] == ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
    assert config.merge_options("task_arithmetic") == {"alpha": 0.3}


def test_hf_dataset_directory_keeps_its_label_names(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    import numpy as np

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])})
    images = [Image.fromarray((np.random.default_rng(i).random((20, 20, 3)) * 255).astype("uint8")) for i in range(6)]
    table = datasets.Dataset.from_dict({"image": images, "label": [2, 1, 0, 2, 1, 0]}, features=features)
    (tmp_path / "ds" / "data").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "ds" / "data" / "test-00000-of-00001.parquet"))
    data = load_image_dataset(str(tmp_path / "ds"), split="test")
    assert data.classes == ["x", "y", "z"] and [label for _, label in data.items] == [2, 1, 0, 2, 1, 0]
    pixels, labels = next(data.subset(4).batches(Preprocess(size=8, crop=8), 4))
    assert pixels.shape == (4, 3, 8, 8) and len(labels) == 4


def test_hub_ids_offline_fail_with_how_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({"family": "clip", "base": "openai/clip-vit-base-patch32", "tasks": [
        {"name": "MNIST", "expert": "tanganke/clip-vit-base-patch32_mnist", "dataset": "ylecun/mnist"},
        {"name": "DTD", "expert": "tanganke/clip-vit-base-patch32_dtd", "dataset": "tanganke/dtd"}]}))
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: openai/clip-vit-base-patch32: cannot download")
    assert "hf download openai/clip-vit-base-patch32 --local-dir" in err[-1]
