"""The offline suite end to end on the ``ci`` preset (slow: fine-tunes 4 experts), then suite -> predict.

Asserts the pipeline's invariants, never fixed accuracy numbers: experts beat zero-shot on their own task,
MASS with the oracle head is at least MASS, normalized figures divide by the expert, and every report file
is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from massmerge.errors import MassMergeError
from massmerge.experiments.suite import CI_FINETUNE


def _data_or_skip() -> None:
    """Outside CI a machine without the packaged data skips; in CI missing data is a failure."""
    from massmerge.data import load_task

    try:
        for name in ("wordnet_pos", "quote_language", "spam", "debian_apps"):
            load_task(name, 10, 2, 10)
    except MassMergeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"suite data not installed: {exc}")


@pytest.fixture(scope="module")
def ci_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    _data_or_skip()
    import torch

    from massmerge.experiments.suite import SuiteConfig, run_suite

    torch.set_num_threads(os.cpu_count() or 1)
    root = tmp_path_factory.mktemp("suite")
    report = run_suite(SuiteConfig(preset="ci"), cache_dir=root / "cache", out_dir=root / "out",
                       export_artifact=root / "artifact")
    return report, root


@pytest.mark.slow
def test_ci_preset_writes_every_report_file(ci_report: tuple[dict, Path]) -> None:
    report, root = ci_report
    for name in ("report.json", "report.md", "per_task.png", "oracle_gap.png", "mass_loss.png",
                 "routing_confusion.png", "routing_accuracy.png", "layer_sweep.png", "serve.json"):  # fmt: skip
        assert (root / "out" / name).stat().st_size > 0, name
    assert len(list((root / "out" / "heads").glob("*.safetensors"))) == len(report["tasks"])
    assert json.loads((root / "out" / "report.json").read_text())["methods"].keys() == report["methods"].keys()
    assert "| **MASS** |" in (root / "out" / "report.md").read_text()


@pytest.mark.slow
def test_ci_preset_invariants(ci_report: tuple[dict, Path]) -> None:
    report, _ = ci_report
    methods = report["methods"]
    tasks = [t["name"] for t in report["tasks"]]
    assert len(tasks) == 4
    for task in tasks:
        assert methods["experts"]["accuracy"][task] > methods["zero-shot"]["accuracy"][task], task
        assert methods["MASS oracle-head"]["accuracy"][task] >= methods["MASS"]["accuracy"][task], task
        assert methods["experts"]["normalized"][task] == pytest.approx(1.0)
        expert = methods["experts"]["accuracy"][task]
        assert methods["MASS"]["normalized"][task] == pytest.approx(methods["MASS"]["accuracy"][task] / expert)
    for name in ("weight_average", "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts"):
        assert name in methods and f"{name} max-logit" in methods
    confusion = report["mass"]["confusion"]
    sizes = [t["sizes"]["test"] for t in report["tasks"]]
    assert [sum(row) for row in confusion] == sizes
    assert 1.0 < report["storage"]["bytes_ratio"] < 2.5
    assert {row["layer"] for row in report["layer_sweep"]} >= {report["mass"]["layer"]}
    for task in tasks:  # the loss split multiplies out to the strict accuracy
        parts = report["mass"]["task_choice"][task] * report["mass"]["class_given_task"][task]
        assert parts == pytest.approx(methods["MASS"]["accuracy"][task])
    ablation = report["ablation"]
    assert {row["split"] for row in ablation} == {"val", "test"}
    paper = next(r for r in ablation if r["name"] == "paper" and r["split"] == "test")
    assert paper["settings"]["head_rule"] == "max_logit" and paper["seconds_per_input"] > 0


@pytest.mark.slow
def test_ci_preset_has_the_papers_comparison_rows(ci_report: tuple[dict, Path]) -> None:
    """SMILE, batch routing and the router study: present, consistent with each other and with MASS's rows."""
    report, root = ci_report
    methods, tasks = report["methods"], [t["name"] for t in report["tasks"]]
    smile, hidden = methods["SMILE-2"], methods["SMILE-2 max-logit"]
    assert smile["storage_factor"] > 1.0 and smile["serving_ratio"] > 0
    assert all(smile["accuracy"][t] >= hidden["accuracy"][t] for t in tasks)  # task hidden can only lose
    assert methods["MASS (batch routing)"]["kind"] == "batch routing"
    routers = report["routers"]
    rows = {r["name"]: r for r in routers["rows"]}
    assert {"MASS (ours)", "MASS router, top-1", "proj-PRE", "kNN on base embedding"} <= set(rows)
    assert routers["ceiling"] in rows and rows[routers["ceiling"]]["data"] != "none"
    assert rows["MASS (ours)"]["accuracy"] == methods["MASS"]["accuracy"]
    for t in tasks:  # MASS's own top-1 routing, through the router study's batches, is the served one's
        assert rows["MASS router, top-1"]["routing_accuracy"][t] == pytest.approx(
            report["mass"]["routing_accuracy"][t], abs=0.02)
        split = routers["loss_split"][t]
        assert split["task_given"] == pytest.approx(methods["MASS (task given)"]["accuracy"][t], abs=1e-6)
        assert split["lost"] == pytest.approx(split["lost_by_best_router_too"] + split["lost_only_without_data"])
        for r in rows.values():  # a hard router cannot beat MASS with the task given
            if r["rule"].startswith("top-1"):
                assert r["accuracy"][t] <= split["task_given"] + 1e-6
    text = (root / "out" / "report.md").read_text()
    assert "## Routers: data-free against routers that use data" in text and "| SMILE-2 max-logit |" in text


@pytest.mark.slow
def test_ci_preset_rerun_reuses_cached_experts(ci_report: tuple[dict, Path]) -> None:
    """A second run with the same cache trains nothing and reproduces the report's figures."""
    from massmerge.experiments.suite import SuiteConfig, run_suite

    report, root = ci_report
    again = run_suite(SuiteConfig(preset="ci"), cache_dir=root / "cache", out_dir=root / "out2")
    assert again["timing"]["finetune_seconds"] < 30
    assert again["methods"]["MASS"]["accuracy"] == report["methods"]["MASS"]["accuracy"]


@pytest.mark.slow
def test_ci_preset_scaling_points_rebuild_from_each_subset(ci_report: tuple[dict, Path]) -> None:
    """--scaling on the cached ci run: the seeded subsets, each scored on its own tasks, and the subset of every
    task rebuilds exactly the models of the full run, so its rows equal the report's."""
    from massmerge.experiments.scaling import SCALING_METHODS, task_subsets
    from massmerge.experiments.suite import SuiteConfig, run_suite

    report, root = ci_report
    scaled = run_suite(SuiteConfig(preset="ci", scaling=True), cache_dir=root / "cache", out_dir=root / "out3")
    points = scaled["scaling"]
    tasks = list(report["methods"]["MASS"]["accuracy"])
    assert [(p["T"], p["tasks"]) for p in points] == [
        (size, [tasks[i] for i in subset]) for size, subset in task_subsets(len(tasks))]
    for point in points:
        for name in SCALING_METHODS:
            assert list(point["rows"][name]["accuracy"]) == point["tasks"]
    whole = next(p for p in points if p["T"] == len(tasks))
    for name in SCALING_METHODS:
        assert whole["rows"][name]["accuracy"] == pytest.approx(report["methods"][name]["accuracy"], abs=1e-9)
    assert (root / "out3" / "scaling.png").stat().st_size > 0


@pytest.mark.slow
def test_suite_experts_serve_through_build_and_predict(ci_report: tuple[dict, Path], capsys) -> None:
    """suite -> the exported artifact and `massmerge build` from serve.json -> `massmerge predict`: the served
    predictions score what the suite reports for MASS (same engine, same factors, same settings)."""
    from massmerge.cli import main
    from massmerge.data.tasks import load_task, get_preset

    report, root = ci_report
    serve = json.loads((root / "out" / "serve.json").read_text())
    main(["build", "--base", serve["base"], "--experts", *serve["experts"], "--heads", *serve["heads"],
          "--max-length", str(serve["max_length"]), "--output", str(root / "built")])
    preset = get_preset("ci")
    tasks = [load_task(name, preset.n_train, preset.n_val, preset.n_test) for name in preset.tasks]
    lines, truth = [], []
    for t, task in enumerate(tasks):
        for text, label in zip(task.test.texts, task.test.labels):
            lines.append(json.dumps({"text": text}))
            truth.append((task.name, label))
    inputs = root / "mixed.jsonl"
    inputs.write_text("\n".join(lines) + "\n")
    for artifact in ("artifact", "built"):
        capsys.readouterr()
        main(["predict", str(root / artifact), str(inputs)])
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["index"] for r in rows] == list(range(1, len(truth) + 1))
        for task in tasks:
            mine = [(r, y) for r, (name, y) in zip(rows, truth) if name == task.name]
            served = sum(r["task"] == task.name and r["label"] == y for r, y in mine) / len(mine)
            assert abs(served - report["methods"]["MASS"]["accuracy"][task.name]) <= 2 / len(mine), (artifact, task.name)


def test_eval_cache_keys_on_settings(tmp_path: Path) -> None:
    from massmerge.experiments.cache import BuildKey, EvalCache, MassKey
    from massmerge.experiments.suite import SuiteRunKey
    from massmerge.mass.config import ServeSettings

    def run_key(name: str) -> SuiteRunKey:
        return SuiteRunKey(scope="suite", experts=(name,), finetune=CI_FINETUNE, test_texts="t", device=None, dtype=None)

    def mass(eta: float) -> MassKey:
        return MassKey(build=BuildKey(eps=0.3, rank_scale=1.0, factor_dtype="float16"),
                       serve=ServeSettings(routing_layers=("fc",), eta=eta))

    calls = []
    cache = EvalCache(tmp_path, run_key("zoo"))
    run = lambda: calls.append(1) or {"x": len(calls)}  # noqa: E731
    assert cache.get_or_run("mass", run, mass(0.2)) == {"x": 1}
    assert cache.get_or_run("mass", run, mass(0.2)) == {"x": 1}  # cached: not run again
    assert cache.get_or_run("mass", run, mass(0.3)) == {"x": 2}  # another setting: another entry
    assert cache.get_or_run("mass", run, mass(0.2), revision=2) == {"x": 3}  # the code changed: recomputed
    assert EvalCache(tmp_path, run_key("other-zoo")).get_or_run("mass", run, mass(0.2)) == {"x": 4}


def _other(value: object) -> object:
    """A different valid value of the same kind (for the key-covers-every-field test)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return (*value, "other")
    if isinstance(value, dict):
        return {**value, "other": 1}
    raise TypeError(type(value))


VARIANTS = {"pooling": "content", "layer_combine": "ppca", "mode": "top1", "head_rule": "joint", "dtype": "float16",
            "first_pass": "pretrained", "max_length": 12, "scope": "scaling", "device": "cuda", "dtype_run": "bfloat16",
            "factor_dtype": "float32", "eps": None, "settings": {"eta": 0.1}}


def test_a_key_changes_whenever_any_field_changes() -> None:
    """Every field of every key object enters its digest (issue 28): change one field, and only it, and the
    digest changes; equal fields, equal digests."""
    from pydantic import BaseModel

    from massmerge.experiments.cache import BuildKey, MassKey, MergeKey, ResultKey, RouterStudyKey, TaskGivenKey
    from massmerge.experiments.suite import SuiteRunKey
    from massmerge.mass.config import ServeSettings

    build = BuildKey(eps=0.3, rank_scale=1.0, factor_dtype="float16")
    mass = MassKey(build=build, serve=ServeSettings(routing_layers=("fc",)))
    keys = [build, mass, TaskGivenKey(build=build, alpha=1.0), MergeKey(options={"alpha": 0.3}),
            RouterStudyKey(mass=mass, routers={"knn": [1, 3]}), ResultKey(run="r", name="mass"),
            SuiteRunKey(scope="suite", experts=("a", "b"), finetune=CI_FINETUNE, test_texts="t", device=None,
                        dtype=None)]

    def variants(key):  # (field path, key with that one field changed), nested models included
        for name, value in key:
            if isinstance(value, BaseModel):
                for path, inner in variants(value):
                    yield f"{name}.{path}", key.model_copy(update={name: inner})
                continue
            field = "dtype_run" if name == "dtype" and isinstance(key, SuiteRunKey) else name
            new = VARIANTS[field] if field in VARIANTS else _other(value) if value is not None else "set"
            yield name, key.model_validate({**key.model_dump(), name: new})

    for key in keys:
        assert key.digest() == type(key).model_validate(key.model_dump()).digest()
        seen = {key.digest()}
        for path, changed in variants(key):
            assert changed.digest() not in seen, f"{type(key).__name__}.{path} does not change the key"
            seen.add(changed.digest())


def test_default_routing_layer_is_block_round_three_quarters() -> None:
    from types import SimpleNamespace

    from massmerge.experiments.suite import default_routing_layer

    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=6))
    assert default_routing_layer(model) == "encoder.layer.4.intermediate.dense"  # round(4.5) == 4
    model.config.num_hidden_layers = 12
    assert default_routing_layer(model) == "encoder.layer.9.intermediate.dense"
