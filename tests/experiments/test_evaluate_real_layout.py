"""`massmerge evaluate` on the real hub layout in miniature (tests/hub_model_fixtures.py), offline.

The base is laid out as openai/clip-vit-base-patch32 is (weights only as ``pytorch_model.bin``, projection
narrower than the vision tower), the experts as FusionBench's ``tanganke/clip-vit-base-patch32_<task>`` repos
(vision-only, ``vision_model.*`` safetensors). The end-to-end run takes the example config's own ids and
settings (``trust_pickle`` included) for two of its tasks, from a local HF cache with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from hub_fixtures import cache_repo
from hub_model_fixtures import PROJECTION_DIM, VISION_WIDTH, write_fusionbench_expert, write_openai_base, \
    write_vision_only_base

from massmerge.errors import CheckpointError, OptionError
from massmerge.experiments import evaluate as evaluate_module
from massmerge.experiments.evaluate_config import parse_benchmark_config
from massmerge.heads.files import head_width
from massmerge.heads.zoo import clip_task

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "clip_vit_b32_8tasks.yaml"
TASKS = ("EuroSAT", "MNIST")  # 10 classes each


def image_folder(root: Path, classes: list[str], seed: int) -> Path:
    """``test/<class>/<i>.png``: one non-square RGB and one grayscale image per class."""
    gen = np.random.default_rng(seed)
    for name in classes:
        folder = root / "test" / name
        folder.mkdir(parents=True)
        Image.fromarray(gen.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(folder / "0.png")
        Image.fromarray(gen.integers(0, 256, (37, 33), dtype=np.uint8), "L").save(folder / "1.png")
    return root


def _example_tasks() -> list[dict]:
    example = yaml.safe_load(EXAMPLE.read_text())
    return [t for t in example["tasks"] if t["name"] in TASKS]


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Local files for every model and dataset of the two tasks, and the same under their hub ids in an HF cache."""
    root = tmp_path_factory.mktemp("replica")
    example = yaml.safe_load(EXAMPLE.read_text())
    clip, base = write_openai_base(root / "files" / "base")
    hf_home = root / "hf"
    cache_repo(hf_home, example["base"], base)
    local = {"base": base, "experts": {}, "datasets": {}}
    for seed, task in enumerate(_example_tasks(), start=1):
        expert = write_fusionbench_expert(root / "files" / f"expert_{seed}", clip, seed=seed)
        data = image_folder(root / "files" / f"data_{seed}", clip_task(task["name"])["classnames"], seed)
        cache_repo(hf_home, task["expert"], expert)
        cache_repo(hf_home, task["dataset"], data, "dataset")
        local["experts"][task["name"]], local["datasets"][task["name"]] = expert, data
    return {"root": root, "hf_home": hf_home, "clip": clip, "local": local, "example": example}


def _local_config(replica: dict, tmp_path: Path, **changes: object) -> dict:
    local = replica["local"]
    tasks = [{"name": t, "expert": str(local["experts"][t]), "dataset": str(local["datasets"][t])} for t in TASKS]
    return {"family": "clip", "base": str(local["base"]), "trust_pickle": True, "tasks": tasks,
            "methods": ["zeroshot", "experts", "tsv_m", "mass"], "eval": {"batch_size": 4, "device": "cpu"},
            "output": str(tmp_path / "out"), **changes}


def test_the_example_runs_on_the_real_layout_offline(replica: dict, tmp_path: Path) -> None:
    example = replica["example"]
    config = {key: example[key] for key in ("family", "base", "revision", "trust_pickle", "routing_layer",
                                           "pooling", "heads", "mass", "reference")}
    config.update(tasks=_example_tasks(), methods=["zeroshot", "experts", "tsv_m", "mass"],
                  eval={"batch_size": 4}, output=str(tmp_path / "out"))
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    hf_home = replica["hf_home"]
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1",
           "MASSMERGE_CONVERTED_DIR": str(tmp_path / "converted")}
    command = [sys.executable, "-m", "massmerge", "evaluate", "--config", str(tmp_path / "bench.yaml"),
               "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [t["name"] for t in report["tasks"]] == list(TASKS)
    assert [t["sizes"]["test"] for t in report["tasks"]] == [20, 20]
    assert {"zero-shot", "experts", "tsv_m", "MASS", "MASS (eps off)"} <= set(report["methods"])
    assert [r["value"] for r in report["config"]["reference"]] == [r["value"] for r in example["reference"]]
    converted = list((tmp_path / "converted").iterdir())  # the .bin was converted once, to safetensors
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()


def test_features_are_projected_to_the_heads_width(replica: dict, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASSMERGE_CONVERTED_DIR", str(tmp_path / "converted"))
    wb = evaluate_module.prepare(parse_benchmark_config(_local_config(replica, tmp_path)), log=lambda line: None)
    assert wb.adapter.feature_dim(wb.model) == PROJECTION_DIM != VISION_WIDTH
    assert {head_width(h) for h in wb.heads} == {PROJECTION_DIM}
    pixels, _ = next(wb.datasets[0].batches(wb.preprocess, 4))
    with torch.no_grad():
        features = wb.adapter.features(wb.model, {"pixel_values": pixels})
        expected = replica["clip"].get_image_features(pixel_values=pixels)
    torch.testing.assert_close(features, getattr(expected, "pooler_output", expected), atol=1e-5, rtol=1e-5)


def test_a_base_without_projection_is_one_line_before_any_svd(replica: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASSMERGE_CONVERTED_DIR", str(tmp_path / "converted"))
    monkeypatch.setattr(evaluate_module, "assemble_mass", lambda *a, **k: pytest.fail("an SVD ran first"))
    vision_only = write_vision_only_base(tmp_path / "vision_only", replica["clip"])
    config = _local_config(replica, tmp_path, base=str(vision_only), heads_from=str(replica["local"]["base"]))
    with pytest.raises(OptionError) as info:
        evaluate_module.run_benchmark(parse_benchmark_config(config), log=lambda line: None,
                                      cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"base {vision_only}: its image features are {VISION_WIDTH} wide")
    assert "no visual_projection" in message
    assert f"zero-shot head of task '{TASKS[0]}'" in message and str(replica["local"]["base"]) in message
    assert message.endswith(f"reads {PROJECTION_DIM}")


@pytest.mark.parametrize("trust", [False, "an expert only"])
def test_a_pickle_base_not_opted_in_is_one_line(replica: dict, tmp_path: Path, trust: object) -> None:
    expert = str(replica["local"]["experts"][TASKS[0]])
    config = _local_config(replica, tmp_path, trust_pickle=[expert] if trust else False)
    with pytest.raises(CheckpointError) as info:
        evaluate_module.prepare(parse_benchmark_config(config), log=lambda line: None)
    message = str(info.value)
    assert message.startswith(f"{replica['local']['base'] / 'pytorch_model.bin'}: pickle") and "\n" not in message
    assert "trust_pickle" in message


def test_trust_pickle_must_name_a_source_of_the_config(replica: dict, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="trust_pickle: 'org/typo' is not the base, heads_from or an expert"):
        parse_benchmark_config(_local_config(replica, tmp_path, trust_pickle=["org/typo"]))


def test_eps_off_rows_reuse_the_factors_with_every_task_merged(replica: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`mass.eps_off_row`: a second MASS from the same stored factors (one factorization), every task accepted
    in the first pass, scored under its own cache key."""
    monkeypatch.setenv("MASSMERGE_CONVERTED_DIR", str(tmp_path / "converted"))
    assembled, served = [], []
    real_assemble, real_serve = evaluate_module.assemble_mass, evaluate_module.serve_mass
    monkeypatch.setattr(evaluate_module, "assemble_mass", lambda wb: assembled.append(1) or real_assemble(wb))
    monkeypatch.setattr(evaluate_module, "serve_mass",
                        lambda wb, parts, seconds: served.append(parts) or real_serve(wb, parts, seconds))
    config = _local_config(replica, tmp_path, methods=["experts", "mass"],
                           mass={"eps": 0.0, "eps_off_row": True}, eval={"batch_size": 8, "device": "cpu"})
    report = evaluate_module.run_benchmark(parse_benchmark_config(config), log=lambda line: None,
                                           cache_dir=tmp_path / "cache")
    assert len(assembled) == 1 and [p.build.eps for p in served] == [0.0, None]
    paper, off = served
    assert off.factors.matrices is paper.factors.matrices  # the same factors, no second SVD
    assert all(tasks == [0, 1] for tasks in off.factors.accepted.values())
    assert any(tasks != [0, 1] for tasks in paper.factors.accepted.values())  # eps 0 drops somewhere
    assert {"MASS", "MASS (eps off)", "MASS (task given) (eps off)"} <= set(report["methods"])


def test_reference_figures_and_the_eps_off_switch_keep_the_cache_key() -> None:
    """Editing a published figure or adding the eps-off rows shapes no score, so the cached scores stay valid."""
    config = parse_benchmark_config(yaml.safe_load(EXAMPLE.read_text()))
    raw = config.model_dump()
    raw["reference"], raw["mass"]["eps_off_row"] = raw["reference"][:1], False
    assert evaluate_module.cache_key(parse_benchmark_config(raw)) == evaluate_module.cache_key(config)
    raw["mass"]["eps"] = 0.5
    assert evaluate_module.cache_key(parse_benchmark_config(raw)) != evaluate_module.cache_key(config)
