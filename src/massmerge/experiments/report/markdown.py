"""report.md: setup and units, targets, where MASS loses, both accuracy tables, routing, ablation, costs.

Percents throughout (differences in points); every section a report has no data for is left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from massmerge.experiments.report import plots
from massmerge.experiments.report.stats import ablation_key, frontier_key
from massmerge.experiments.report.text import (
    KIND_NOTE,
    LOSS_COLUMNS,
    PM_NOTE,
    flagged,
    mean_of,
    method_cells,
    pct,
    pm,
    span,
    storage_line,
    target_goal,
    target_value,
    tasks_of,
    zero_shot_lines,
)




def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_head(cells: Sequence[str]) -> list[str]:
    return [_md_row(cells), "|" + "---|" * len(cells)]


def _md_methods(report: Mapping[str, Any], metric: str) -> list[str]:
    lines = _md_head(["method", "kind", *tasks_of(report), "avg"])
    for name, row in report["methods"].items():
        cells = method_cells(report, name, metric)
        if name == "MASS":
            name, cells[-1] = f"**{name}**", f"**{cells[-1]}**"
        lines.append(_md_row([name, row["kind"], *cells]))
    return lines


def _router_text(cfg: Mapping[str, Any]) -> str:
    """The served router in words: pooling, routing layers and how they combine (when the report records them)."""
    serve = cfg.get("serve_settings") or {}
    layers = serve.get("routing_layers") or [cfg["routing_layer"]]
    if len(layers) == 1:
        where = f"routing layer `{layers[0]}`"
    else:
        where = f"{len(layers)} routing layers up to `{layers[-1]}` ({serve.get('layer_combine')})"
    return f"{where}, {serve['pooling']} pooling" if "pooling" in serve else where


def _md_setup(report: Mapping[str, Any]) -> list[str]:
    ft, cfg = report["finetune"], report["config"]
    mass = f"MASS: {_router_text(cfg)}, eta {cfg['eta']}, K {cfg['top_k']}, eps {cfg['eps']}."
    if report["kind"] == "suite":
        title = f"# massmerge offline suite: preset `{report['preset']}`"
        setup = (f"Backbone all-MiniLM-L6-v2; {len(report['tasks'])} tasks; experts fine-tune the whole encoder "
                 f"against frozen zero-shot heads ({ft['steps']} steps, batch {ft['batch_size']}, lr {ft['lr']}, max "
                 f"length {ft['max_length']}, logit scale {ft['logit_scale']}). {mass}")
    else:
        title = "# massmerge evaluate"
        setup = f"Base `{cfg.get('base', '?')}`; {len(report['tasks'])} tasks (experts and test sets below). {mass}"
    return [title, "", setup, "",
            "**Units.** Accuracies are percents of a task's test items (report.json holds the same figures as "
            "fractions 0-1); normalized accuracy is a percent of the expert's accuracy on the same test split; "
            "differences are in points. " + PM_NOTE + " " + KIND_NOTE, ""]  # fmt: skip


def _md_targets(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Targets (design.md section 7)", "",
             "Met: the whole 95% interval clears the goal; missed: it lies wholly short; otherwise the run cannot "
             "tell the figure from its goal.", "",
             *_md_head(["target", "value", "95% interval", "goal", "status"])]  # fmt: skip
    for t in report["targets"].values():
        detail = f" ({t['detail']})" if t["detail"] else ""
        bounds = span(t["interval"], signed=t["unit"] != "normalized")
        status_cell = f"**{t['status']}**"
        lines.append(_md_row([t["description"] + detail, target_value(t), bounds, target_goal(t), status_cell]))
    return lines


def _md_loss(report: Mapping[str, Any]) -> list[str]:
    if not report["mass_loss"]:
        return []
    lines = ["## Where MASS loses", "",
             "Task hidden, MASS answers an item right when the router selects the true task, the true task's head "
             "wins the final max-logit choice, and the class is right. Stages in % (95% ±); \"class right given "
             "task right\" is over the items whose final task is right, so MASS (task hidden) = final task right x "
             "class right given task right.", "", *_md_head(["task", *LOSS_COLUMNS.values()])]  # fmt: skip
    marked = flagged(report)
    for task, row in report["mass_loss"].items():
        cells = [pm(row[k]["value"], row[k]["interval"]) for k in LOSS_COLUMNS]
        lines.append(_md_row([task + (" †" if task in marked else ""), *cells]))
    lines += ["", "Where each task's test items go (% of the task's items; the four columns sum to 100):", "",
              *_md_head(["task", "right", "lost: wrong class", "lost: another selected task won",
                         "lost: true task not selected"])]  # fmt: skip
    for task, row in report["mass_loss"].items():
        lost = row["lost"]
        lines.append(_md_row([task, pct(row["task_hidden"]["value"]), pct(lost["wrong_class"]),
                              pct(lost["wrong_final_task"]), pct(lost["not_selected"])]))  # fmt: skip
    return lines + ["", *zero_shot_lines(report)]


def _md_layers(report: Mapping[str, Any]) -> list[str]:
    """The MASS model at each evaluated routing layer (task averages), when there is more than one."""
    if len(report["mass_layers"]) < 2:
        return []
    lines = ["", "## MASS per routing layer (task averages, %)", "",
             *_md_head(["layer", *list(LOSS_COLUMNS.values())[:4], "mean tasks selected"])]
    for m in report["mass_layers"]:
        stages = ("routing_accuracy", "selection_recall", "task_choice", "class_given_task")
        lines.append(_md_row([f"`{m['layer']}`", *(pct(mean_of(m[k])) for k in stages), f"{m['mean_selected']:.2f}"]))
    return lines


def _md_sweep(report: Mapping[str, Any]) -> list[str]:
    tasks, rows = tasks_of(report), report["layer_sweep"]
    if not rows:
        return []
    best = max(rows, key=lambda r: r["mean"])["layer"]
    lines = ["## Routing-layer sweep (top-1 routing accuracy %, first pass only)", "",
             *_md_head(["layer", *tasks, "mean (95% ±)", "true task selected"])]  # fmt: skip
    for row in rows:
        marks = [m for m, on in (("default", row["layer"] == report["config"]["routing_layer"]),
                                 ("best", row["layer"] == best)) if on]  # fmt: skip
        label = f"`{row['layer']}`" + (f" ({', '.join(marks)})" if marks else "")
        cells = [pct(row["routing_accuracy"][t]) for t in tasks]
        lines.append(_md_row([label, *cells, pm(row["mean"], report["intervals"]["layer_sweep"][row["layer"]]),
                              pct(row["selection_recall"])]))  # fmt: skip
    return lines


def _setting_text(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 2:  # multi-layer routing: dozens of names
        return f"{key}={len(value)} layers ({value[0]} ... {value[-1]})"
    return f"{key}={value}"


def _settings_column(row: Mapping[str, Any], reference: Mapping[str, Any]) -> str:
    """The first variant's settings in full, every other variant's as its differences from the first."""
    if row is reference:
        items = row["settings"].items()
    else:
        items = [(k, v) for k, v in row["settings"].items() if reference["settings"].get(k) != v]
    return ", ".join(_setting_text(k, v) for k, v in items) or "as the first row"


def _md_ablation(report: Mapping[str, Any]) -> list[str]:
    rows = report.get("ablation")
    if not rows:
        return []
    tasks, reference = tasks_of(report), rows[0]
    lines = ["", "## Router ablation", "",
             "Normalized accuracy (% of each expert; 95% ±) and mean top-1 routing accuracy, per router variant "
             "(settings: the first row's in full, the others' as their differences from it). Defaults are chosen "
             "on the val rows.", "",
             *_md_head(["variant", "settings", "split", "avg normalized", *tasks, "routing top-1", "ms / input"])]
    for r in rows:
        avg = pm(r["avg_normalized"], report["intervals"]["ablation"][ablation_key(r)])
        per_task = [pct(r["normalized"].get(t)) for t in tasks]
        lines.append(_md_row([r["name"], _settings_column(r, reference), r["split"], avg, *per_task,
                              pct(mean_of(r["routing_accuracy"])), f"{1000 * r['seconds_per_input']:.1f}"]))
    lines += ["", "Top-1 routing accuracy per task (%), per router variant:", "",
              *_md_head(["variant", "split", *tasks, "mean"])]
    for r in rows:
        lines.append(_md_row([r["name"], r["split"], *[pct(r["routing_accuracy"].get(t)) for t in tasks],
                              pct(mean_of(r["routing_accuracy"]))]))
    return lines


def _md_frontier(report: Mapping[str, Any]) -> list[str]:
    """Every (routing block, restart block) point: accuracy on val and test against throughput."""
    rows = report.get("frontier")
    if not rows:
        return []
    bounds = report["intervals"]["frontier"]
    lines = ["", "## Beyond two passes: the cost/accuracy frontier", "",
             "The second pass restarts at block j from the first pass's hidden states; the first pass routes at "
             "block l (the family's router exiting there). Normalized accuracy with the task hidden (% of each "
             "expert; 95% ±); throughput: the served model (`massmerge.mass.serving.serve`, what `massmerge "
             "predict` runs) over a plain forward of the same inputs, batched alike, measured in the same run; "
             "cost: forwards of the base, about (l + 1 + L - j) / L. Defaults are chosen on val.", "",
             *_md_head(["routing block l", "restart block j", "val", "test", "throughput", "cost"])]
    for r in rows:
        cells = [pm(r[split]["avg_normalized"], bounds[frontier_key(r, split)]) for split in ("val", "test")]
        lines.append(_md_row([str(r["routing_block"]), str(r["restart_block"]), *cells, f"{r['throughput']:.2f}x",
                              f"{r['cost']:.2f}"]))
    return lines


def _md_loss_split(report: Mapping[str, Any]) -> list[str]:
    """MASS's lost items split by whether the best router with data (the ceiling) loses them too."""
    routers = report.get("routers")
    if not routers:
        return []
    lines = ["", f"Could a router with data recover them? MASS's lost items (right with the task given, wrong with "
             f"it hidden) split by whether the identifiability ceiling (**{routers['ceiling']}**, the best task "
             "classifier trained on labelled val inputs, chosen on val) loses them too (% of each task's test "
             "items):", "",
             *_md_head(["task", "MASS task given", "MASS task hidden", "lost", "lost by the best data router too",
                        "lost only without data"])]  # fmt: skip
    for task, row in routers["loss_split"].items():
        lines.append(_md_row([task, *(pct(row[k]) for k in ("task_given", "task_hidden", "lost",
                                                            "lost_by_best_router_too", "lost_only_without_data"))]))
    total = {k: mean_of({t: r[k] for t, r in routers["loss_split"].items()})
             for k in ("lost", "lost_by_best_router_too", "lost_only_without_data")}
    lines.append(_md_row(["mean", "", "", *(pct(v) for v in total.values())]))
    return lines


#: What a trained router's chosen setting is, per classifier (report.md's router table).
SETTING_NAMES = {"kNN": "k", "logistic": "L2", "MLP": "weight decay"}


def _md_routers(report: Mapping[str, Any]) -> list[str]:
    """MASS's data-free router beside routers that use data, each labelled with the data it needs."""
    routers = report.get("routers")
    if not routers:
        return []
    tasks, bounds = tasks_of(report), report["intervals"]["routers"]
    lines = ["", "## Routers: data-free against routers that use data", "",
             "Test split. Hard routers pick one task and answer with MASS's second pass for that task alone, so an "
             "item counts only with task and class right; \"MASS (ours)\" and proj-PRE are served as MASS (selected "
             "set, max-logit heads). val routing: top-1 on val, cross-validated for the trained routers (their "
             "settings are chosen there). Normalized accuracy in % of each expert (95% ±); **ceiling** = the best "
             "val accuracy among the trained routers.", "",
             *_md_head(["router", "data it needs", "val routing", "test routing", "avg normalized", *tasks])]
    for r in routers["rows"]:
        name = f"**{r['name']}** (ceiling)" if r["name"] == routers["ceiling"] else r["name"]
        label = SETTING_NAMES.get(r.get("classifier") or "", "setting")
        setting = f" ({label} {r['setting']:g})" if r.get("setting") else ""
        lines.append(_md_row([name + setting, r["data"], pct(r["val_routing_accuracy"]),
                              pct(mean_of(r["routing_accuracy"])), pm(r["avg_normalized"], bounds[r["name"]]),
                              *(pct(r["normalized"][t]) for t in tasks)]))
    return lines


def _md_scaling(report: Mapping[str, Any]) -> list[str]:
    """Normalized accuracy per method and task count: the mean over subsets and its 95% interval."""
    summary, points = report.get("scaling_summary"), report.get("scaling")
    if not summary:
        return []
    sizes = sorted({r["T"] for r in summary})
    methods = list(dict.fromkeys(r["method"] for r in summary))
    cell = {(r["method"], r["T"]): r for r in summary}
    counts = {T: sum(1 for p in points if p["T"] == T) for T in sizes}
    lines = ["", "## Task scaling", "",
             "Normalized accuracy (% of each expert, averaged over the subset's tasks), every method rebuilt from "
             "each seeded task subset's experts alone; mean over the subsets, 95% interval across them (t over "
             "subsets; one subset: its own interval). Rows without max-logit use the oracle head.", "",
             *_md_head(["method", *(f"T={T} ({counts[T]} subset{'' if counts[T] == 1 else 's'})" for T in sizes)])]
    for method in methods:
        lines.append(_md_row([method, *(pm(cell[(method, T)]["mean"], cell[(method, T)]["interval"])
                                        if (method, T) in cell else "-" for T in sizes)]))
    lines += ["", "Subsets: " + "; ".join(f"T={p['T']}: {', '.join(p['tasks'])}" for p in points) + "."]
    return lines


def _md_tasks(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Tasks", "", *_md_head(["task", "description", "classes", "train", "val", "test"])]
    for t in report["tasks"]:
        s = t["sizes"]
        lines.append(_md_row([t["name"], t["description"], str(len(t["classes"])), str(s["train"]), str(s["val"]),
                              str(s["test"])]))  # fmt: skip
    return lines


def _md_footer(report: Mapping[str, Any]) -> list[str]:
    thr, tm = report["throughput"], report["timing"]
    timed = {name: row["merge_seconds"] for name, row in report["methods"].items()
             if row.get("merge_seconds") is not None}  # fmt: skip
    merges = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timed.items())
    dropped = "; ".join(f"`{k}`: {', '.join(v)}" for k, v in report["dropped"].items()) or "nothing"
    lines = ["## Storage, speed, time", ""]
    if report["storage"] is not None:
        lines.append(f"- {storage_line(report)}")
    if thr is not None:
        lines.append(f"- Throughput ({thr['path']}): base {thr['base_samples_per_s']:.1f} samples/s, MASS "
                     f"{thr['mass_samples_per_s']:.1f} samples/s (MASS / base = {thr['ratio']:.2f}).")
    for name, row in report["methods"].items():
        if row.get("serving_ratio") is not None and row["kind"] == "oracle head":
            lines.append(f"- {name}: stores {row['storage_factor']:.2f}x the base's numbers; its forward runs at "
                         f"{row['serving_ratio']:.2f}x a plain forward's throughput (same inputs and batches).")
    lines += [f"- Merge time: {merges or '-'}.",
              "- Wall time: " + ", ".join(f"{k.removesuffix('_seconds')} {v:.0f} s" for k, v in tm.items())
              + f" on {report['threads']} threads."]
    if report["mass"] is not None:
        lines.append(f"- De-redundancy left out of the first pass: {dropped}.")
    return lines + ["", "Plots (all in %): " + ", ".join(plots.available(report)) + ".", ""]  # fmt: skip


def markdown(report: Mapping[str, Any]) -> str:
    """report.md: setup and units, targets, where MASS loses, both accuracy tables, routing, ablation, costs."""
    tables = ["", "## Absolute accuracy (%)", "", *_md_methods(report, "accuracy"), "",
              "† MASS (task hidden) below zero-shot max-logit on this task.", "",
              "## Normalized accuracy (% of each expert on the same test split)", "",
              *_md_methods(report, "normalized")]
    sections = [_md_setup(report), _md_targets(report), [""], _md_loss(report), _md_loss_split(report), [""],
                _md_tasks(report), tables, _md_layers(report), [""], _md_sweep(report), _md_routers(report),
                _md_ablation(report), _md_frontier(report), _md_scaling(report), [""], _md_footer(report)]
    return "\n".join(line for section in sections for line in section)


__all__ = ["markdown"]
