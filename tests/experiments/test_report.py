"""The suite's report writers on synthetic reports of the suite's shape (no training, no data needed).

Numbers are chosen so the checks can fail: task ``b`` has MASS below zero-shot, the MASS vs TSV-M targets
land on both sides, TSV-M ties Task Arithmetic, and the Wilson figures are checked against hand computations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from rich.console import Console

from massmerge.experiments.report import schema as sr_schema
from massmerge.experiments.report import stats as sr
from massmerge.experiments.report import write_report

from report_fixtures import BEST_LAYER, DEFAULT_LAYER, TASKS, _ablation, fake_report

@pytest.fixture
def written(tmp_path: Path) -> tuple[dict[str, Any], Path, str]:
    console = Console(record=True, width=220)
    full = write_report(fake_report(), tmp_path, console=console)
    return full, tmp_path, console.export_text()


# ----- statistics --------------------------------------------------------------------------------------------


def test_wilson_matches_hand_computed_intervals() -> None:
    assert sr.wilson(0.5, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    assert sr.wilson(0.0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)  # positive width at 0%
    assert sr.wilson(0.8, 100) == pytest.approx((0.71118, 0.86664), abs=1e-5)
    assert sr.wilson(0.3, 0) == (0.0, 1.0)


def test_average_interval_adds_per_task_variances() -> None:
    """Two tasks at 50% of 100 items: se 0.096168 / 1.96 each, mean's se sqrt(2) x that / 2 -> +- 0.0680."""
    report = {"tasks": [{"name": t, "sizes": {"test": 100}} for t in "xy"],
              "methods": {"experts": {"accuracy": {"x": 1.0, "y": 0.5}}}}  # fmt: skip
    row = {"accuracy": {"x": 0.5, "y": 0.5}, "normalized": {"x": 0.5, "y": 1.0}, "avg_accuracy": 0.5,
           "avg_normalized": 0.75}  # fmt: skip
    got = sr.row_intervals(report, row)
    assert got["avg_accuracy"] == pytest.approx((0.5 - 0.068001, 0.5 + 0.068001), abs=1e-5)
    assert got["normalized"]["y"] == pytest.approx((0.40383 / 0.5, 0.59617 / 0.5), abs=1e-4)
    half = 1.959964 * (0.049066**2 + (0.049066 / 0.5) ** 2) ** 0.5 / 2  # se of x over expert 1.0, of y over 0.5
    assert got["avg_normalized"] == pytest.approx((0.75 - half, 0.75 + half), abs=1e-5)


def test_status_uses_the_whole_interval() -> None:
    assert sr.status((0.96, 0.99), 0.95) == "met"
    assert sr.status((0.90, 0.94), 0.95) == "missed"
    assert sr.status((0.93, 0.97), 0.95) == "not distinguishable from the target"
    assert sr.status((0.0, 0.1), 0.0, strict=True) == "not distinguishable from the target"
    assert sr.status((-0.1, 0.0), 0.0, strict=True) == "missed"
    assert sr.status(None, 0.95) == "not measured"


# ----- targets -----------------------------------------------------------------------------------------------


def test_targets_compare_mass_with_tsv_m_and_task_arithmetic() -> None:
    got = fake_report()["targets"]
    assert got["mass_average"]["status"] == "missed"  # 82% of the experts, far from 95
    assert got["mass_every_task"]["status"] == "missed" and "b" in got["mass_every_task"]["detail"]
    assert got["mass_every_task"]["value"] == pytest.approx(0.5 / 0.8)
    assert got["mass_vs_tsv_m_max_logit"]["status"] == "met"
    assert got["mass_vs_tsv_m_oracle"]["status"] == "missed"
    # equal numbers: TSV-M is not shown above Task Arithmetic, nor below it
    assert got["tsv_m_vs_task_arithmetic_oracle"]["value"] == 0.0
    assert got["tsv_m_vs_task_arithmetic_oracle"]["status"] == "not distinguishable from the target"
    for target in got.values():
        assert "_" not in target["description"].replace("max-logit", ""), target["description"]  # words, not keys


def test_targets_close_to_the_goal_are_not_distinguishable() -> None:
    report = fake_report()
    mass = report["methods"]["MASS"]
    mass["avg_normalized"] = 0.94  # within the interval (about +-4 points at these sizes) of 95%
    assert sr.targets(report)["mass_average"]["status"] == "not distinguishable from the target"


def test_targets_without_a_row_say_not_measured() -> None:
    report = fake_report()
    del report["methods"]["tsv_m"]
    got = sr.targets(report)["mass_vs_tsv_m_oracle"]
    assert got["status"] == "not measured" and got["value"] is None and "tsv_m" in got["detail"]


# ----- derived sections and schema ---------------------------------------------------------------------------


def test_mass_loss_splits_every_item_and_multiplies_out() -> None:
    full = sr_schema.complete(fake_report())
    for task, row in full["mass_loss"].items():
        product = row["task_choice"]["value"] * row["class_given_task"]["value"]
        assert product == pytest.approx(row["task_hidden"]["value"])
        assert row["task_hidden"]["value"] + sum(row["lost"].values()) == pytest.approx(1.0)
        assert row["class_given_task"]["n"] == round(row["task_choice"]["value"] * TASKS[task])
    assert full["mass_loss"]["b"]["lost"]["wrong_final_task"] == pytest.approx(0.7 - 0.6)


def test_below_zero_shot_flags_the_right_tasks() -> None:
    flagged = sr_schema.complete(fake_report())["below_zero_shot"]
    assert [f["task"] for f in flagged] == ["b"]
    assert flagged[0]["difference"] == pytest.approx(-0.05)
    assert flagged[0]["below_oracle_head"] is True
    assert flagged[0]["clearly_below"] is False  # 5 points on 200 items is within noise


def test_every_accuracy_has_an_interval() -> None:
    full = sr_schema.complete(fake_report(ablation=_ablation()))
    for name, row in full["methods"].items():
        bounds = full["intervals"]["methods"][name]
        for task, value in row["accuracy"].items():
            low, high = bounds["accuracy"][task]
            assert low <= value <= high and high - low > 0, (name, task)
        assert bounds["avg_normalized"][0] < row["avg_normalized"] < bounds["avg_normalized"][1]
    assert set(full["intervals"]["layer_sweep"]) == {DEFAULT_LAYER, BEST_LAYER}
    assert set(full["intervals"]["ablation"]) == {"paper router (val)", "ours (val)"}


@pytest.mark.parametrize("path", [("mass", "task_choice"), ("storage", "bytes_ratio"), ("throughput", "path"),
                                  ("kind",), ("methods", "MASS", "kind")])  # fmt: skip
def test_schema_refuses_a_missing_field(tmp_path: Path, path: tuple[str, ...]) -> None:
    report = fake_report()
    parent = report
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    with pytest.raises(ValidationError, match=path[-1]):
        write_report(report, tmp_path, show=False)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_schema_refuses_inconsistent_or_incomplete_reports() -> None:
    report = fake_report()
    report["mass"]["class_given_task"]["a"] = 0.5  # 0.9 x 0.5 != MASS's 0.8
    with pytest.raises(ValidationError, match="task_choice x class_given_task"):
        sr_schema.complete(report)
    report = fake_report()
    del report["methods"]["zero-shot max-logit"]
    with pytest.raises(ValidationError, match="zero-shot max-logit"):
        sr_schema.complete(report)
    report = fake_report()
    del report["mass"]["routing_accuracy"]["c"]
    with pytest.raises(ValidationError, match="routing_accuracy"):
        sr_schema.complete(report)
    report = fake_report(surprise=1)
    with pytest.raises(ValidationError, match="surprise"):
        sr_schema.complete(report)
    report = fake_report()
    report["methods"]["MASS"]["accuracy"]["a"] = 80.0  # a percent where a fraction belongs
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        sr_schema.complete(report)


# ----- files -------------------------------------------------------------------------------------------------


def test_report_json_is_versioned_with_units_and_fractions(written: tuple[dict, Path, str]) -> None:
    full, out, _ = written
    data = json.loads((out / "report.json").read_text())
    assert data["schema_version"] == 3 and list(data)[:2] == ["schema_version", "units"]
    assert "0-1" in data["units"]["accuracy"] and "bytes" in data["units"]["storage.bytes_ratio"]
    assert data["methods"]["MASS"]["accuracy"]["a"] == pytest.approx(0.8)  # a fraction, not a percent
    sr_schema.WrittenReport.model_validate(data)  # what was written reads back under the schema
    assert data == json.loads(json.dumps(full))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing behind


def test_report_md_says_where_mass_loses(written: tuple[dict, Path, str]) -> None:
    _, out, _ = written
    md = (out / "report.md").read_text()
    assert "percents" in md and "fractions 0-1" in md
    assert "| **MASS** | task hidden | 80.0 ±8.9 |" in md  # Wilson(0.8, 100) = 71.1-86.7, wider side 8.9
    assert "50.0 ±6.9 †" in md  # task b flagged in the accuracy table
    assert "† b: MASS (task hidden) 50.0% is below zero-shot max-logit 55.0%" in md
    assert "also below the zero-shot oracle head (60.0)" in md
    assert "## Where MASS loses" in md and "| a | 85.0 ±" in md and "final task right" in md
    assert "1.62x the base model's bytes" in md and "float16" in md and "float32" in md
    assert "MASS (task hidden) keeps at least 95% of the experts' accuracy on average" in md
    assert "mass_average" not in md and "_ge_" not in md  # targets in words
    assert f"`{DEFAULT_LAYER}` (default)" in md and f"`{BEST_LAYER}` (best)" in md
    assert "## MASS per routing layer" in md
    assert "task a [demo]" in md
    assert "Router ablation" not in md


def test_ablation_table_when_present(tmp_path: Path) -> None:
    write_report(fake_report(ablation=_ablation()), tmp_path, show=False)
    md = (tmp_path / "report.md").read_text()
    assert "## Router ablation" in md
    assert "| paper router | top_k=1 | val | 71.0 ±" in md and "| 4.0 |" in md
    assert "| paper router | val | 80.0 | 60.0 | 90.0 | 76.7 |" in md  # routing top-1 per task


def test_ablation_val_and_test_rows_have_their_own_intervals_and_short_settings(tmp_path: Path) -> None:
    """One variant on two splits of different sizes: two intervals; a long layer list is shown in brief, and a
    variant shows only what differs from the first row."""
    layers = [f"layer.{i}" for i in range(29)]
    rows = _ablation() + [{**_ablation()[1], "split": "test", "settings": {"top_k": 3, "routing_layers": layers}}]
    full = write_report(fake_report(ablation=rows), tmp_path, show=False)
    val, test = full["intervals"]["ablation"]["ours (val)"], full["intervals"]["ablation"]["ours (test)"]
    assert val != test
    md = (tmp_path / "report.md").read_text()
    assert "routing_layers=29 layers (layer.0 ... layer.28)" in md and "layer.5" not in md
    assert "| ours | top_k=3 | val |" in md


def test_terminal_shows_loss_flags_targets_and_storage(written: tuple[dict, Path, str]) -> None:
    _, _, text = written
    assert "where MASS loses" in text and "final task right" in text
    assert "80.0 ±8.9" in text and "normalized accuracy" in text
    assert "† b: MASS (task hidden)" in text
    assert "missed" in text and "met" in text and "not distinguishable from the target" in text
    assert "1.62x the base model's bytes" in text


def test_plots_are_written_and_the_radar_is_gone(written: tuple[dict, Path, str]) -> None:
    _, out, _ = written
    for name in ("per_task.png", "oracle_gap.png", "mass_loss.png", "routing_accuracy.png", "routing_confusion.png",
                 "layer_sweep.png"):  # fmt: skip
        data = (out / name).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000, name
    assert not (out / "radar.png").exists()


def test_plots_draw_percent_with_values_on_bars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-task bars' axis runs 0-100+ and each bar carries its value in %."""
    import matplotlib.pyplot as plt

    from massmerge.experiments.report import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    full = sr_schema.complete(fake_report())
    plots.per_task_bars(full, tmp_path / "x.png")
    plots.layer_sweep(full, tmp_path / "y.png")
    (bars,), (sweep,) = figures[0].axes, figures[1].axes
    assert bars.get_ylim()[1] > 100 and "%" in bars.get_ylabel()
    texts = {t.get_text() for t in bars.texts}
    assert {"80", "50", "90"} <= texts  # MASS's per-task values
    legend = bars.get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().x0 > bars.get_window_extent().x1 - 1  # right of axes
    labels = [t.get_text() for t in sweep.get_legend().get_texts()]
    assert any("default layer (L4 mlp)" in s for s in labels) and any("best layer (L2 mlp)" in s for s in labels)
    assert "%" in sweep.get_ylabel()
    for fig in figures:
        plt.close(fig)


def test_frontier_rows_get_intervals_a_table_and_a_plot(tmp_path: Path) -> None:
    def point(block: int, restart: int, val: float, test: float, speed: float) -> dict[str, Any]:
        part = lambda avg: {"avg_normalized": avg, "normalized": {"a": avg, "b": avg, "c": avg},  # noqa: E731
                            "accuracy": {"a": 0.8 * avg, "b": 0.7 * avg, "c": 0.9 * avg}}
        return {"routing_layer": f"encoder.layer.{block}.intermediate.dense", "routing_block": block,
                "restart_block": restart, "cost": (block + 1 + 6 - restart) / 6, "val": part(val), "test": part(test),
                "throughput": speed}

    rows = [point(4, 0, 0.9, 0.89, 0.45), point(4, 4, 0.895, 0.885, 0.8), point(2, 2, 0.8, 0.79, 1.1)]
    full = write_report(fake_report(frontier=rows), tmp_path, show=False)
    assert set(full["intervals"]["frontier"]) == {f"l={b} j={j} ({s})" for b, j in [(4, 0), (4, 4), (2, 2)]
                                                 for s in ("val", "test")}
    low, high = full["intervals"]["frontier"]["l=4 j=4 (val)"]
    assert low < 0.895 < high
    text = (tmp_path / "report.md").read_text()
    assert "## Beyond two passes: the cost/accuracy frontier" in text and "| 4 | 4 | 89.5 ±" in text
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_router_rows_get_intervals_a_table_and_the_loss_split(tmp_path: Path) -> None:
    from report_fixtures import routers_section

    full = write_report(fake_report(routers=routers_section()), tmp_path, show=False)
    bounds = full["intervals"]["routers"]
    assert set(bounds) == {r["name"] for r in full["routers"]["rows"]}
    low, high = bounds["proj-PRE"]
    assert low < full["routers"]["rows"][1]["avg_normalized"] < high
    text = (tmp_path / "report.md").read_text()
    assert "## Routers: data-free against routers that use data" in text
    assert "| **logistic on all three** (ceiling) (L2 0.01) | val inputs | 80.0 |" in text
    assert "lost by the best data router too" in text and "| a | 90.0 | 70.0 | 25.0 | 15.0 | 10.0 |" in text


def test_router_section_refuses_a_ceiling_that_is_no_row(tmp_path: Path) -> None:
    from report_fixtures import routers_section

    section = {**routers_section(), "ceiling": "oracle"}
    with pytest.raises(ValidationError, match="ceiling"):
        write_report(fake_report(routers=section), tmp_path, show=False)
    assert not (tmp_path / "report.json").exists()


def test_scaling_points_are_summarized_tabled_and_plotted(tmp_path: Path) -> None:
    from report_fixtures import scaling_points

    full = write_report(fake_report(scaling=scaling_points()), tmp_path, show=False)
    summary = {(r["method"], r["T"]): r for r in full["scaling_summary"]}
    assert summary[("MASS", 2)]["values"] == pytest.approx([0.95, 0.97])
    assert summary[("MASS", 2)]["mean"] == pytest.approx(0.96)
    low, high = summary[("MASS", 3)]["interval"]  # one subset: its own per-task interval
    assert low < 0.93 < high
    text = (tmp_path / "report.md").read_text()
    assert "## Task scaling" in text and "T=2 (2 subsets)" in text and "T=3 (1 subset)" in text
    assert "T=3: a, b, c" in text
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_scaling_point_must_cover_its_own_tasks(tmp_path: Path) -> None:
    from report_fixtures import scaling_points

    points = scaling_points()
    points[0]["tasks"] = ["a", "c"]  # its rows cover a and b
    with pytest.raises(ValidationError, match="does not cover"):
        write_report(fake_report(scaling=points), tmp_path, show=False)


def test_batch_routing_and_smile_rows_are_method_rows(tmp_path: Path) -> None:
    from report_fixtures import EXPERT, _row

    extra = {"MASS (batch routing)": _row("batch routing", {"a": 0.85, "b": 0.7, "c": 0.9}, batch_size=64),
             "SMILE-2": _row("oracle head", dict(EXPERT), storage_factor=1.9, serving_ratio=0.3),
             "SMILE-2 max-logit": _row("task hidden", {"a": 0.6, "b": 0.5, "c": 0.7}, storage_factor=1.9,
                                       serving_ratio=0.3)}
    report = fake_report()
    report["methods"].update(extra)
    write_report(report, tmp_path, show=False)
    text = (tmp_path / "report.md").read_text()
    assert "| MASS (batch routing) | batch routing |" in text
    assert "SMILE-2: stores 1.90x the base's numbers; its forward runs at 0.30x" in text


def test_assemble_report_builds_what_write_report_checks(tmp_path: Path) -> None:
    """The one assembly suite and evaluate share: served settings added to the config, MASS sections empty
    when MASS was not run, targets computed; the result passes the schema and is written."""
    from massmerge.experiments.report.assemble import assemble_report
    from massmerge.mass.config import ServeSettings

    fake = fake_report()
    methods = {name: row for name, row in fake["methods"].items() if not name.startswith("MASS")}
    settings = ServeSettings(routing_layers=(DEFAULT_LAYER,), eta=0.1)
    report = assemble_report("evaluate", preset=None, config={"routing_layer": DEFAULT_LAYER, "eps": 0.3},
                             settings=settings, served=None, tasks=fake["tasks"], methods=methods, mass_details=[],
                             timing={"total_seconds": 1.0})
    assert report["mass"] is None and report["mass_layers"] == [] and report["storage"] is None
    assert report["dropped"] == {} and report["threads"] >= 1 and "targets" in report
    assert report["config"]["eta"] == 0.1 and report["config"]["serve_settings"]["routing_layers"] == [DEFAULT_LAYER]
    written = write_report(report, tmp_path, show=False)
    assert json.loads((tmp_path / "report.json").read_text())["config"]["top_k"] == written["config"]["top_k"] == 3
    suite = assemble_report("suite", preset="fake", config=fake["config"], settings=settings, served=None,
                            tasks=fake["tasks"], methods=fake["methods"], mass_details=fake["mass_layers"],
                            timing=fake["timing"], finetune=fake["finetune"], layer_sweep=fake["layer_sweep"],
                            throughput=fake["throughput"], storage=fake["storage"])
    assert suite["mass"] == fake["mass"] and suite["layer_sweep"] == fake["layer_sweep"]
    write_report(suite, tmp_path / "suite", show=False)
