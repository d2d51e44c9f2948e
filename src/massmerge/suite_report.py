"""The suite's report: a table on the terminal, report.json, report.md and the plots, written atomically.

Rows are methods, columns are tasks plus the average; every figure is shown absolute and normalized by the
expert's accuracy on the same test split.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pct(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _tasks(report: dict[str, Any]) -> list[str]:
    return [t["name"] for t in report["tasks"]]


def terminal_table(report: dict[str, Any], metric: str = "accuracy") -> Table:
    """A rich table: one row per method, one column per task plus the average."""
    tasks = _tasks(report)
    title = "absolute accuracy (%)" if metric == "accuracy" else "normalized accuracy (% of each expert)"
    table = Table(title=f"massmerge suite ({report['preset']}): {title}")
    table.add_column("method")
    table.add_column("kind", style="dim")
    for task in tasks:
        table.add_column(task, justify="right")
    table.add_column("avg", justify="right", style="bold")
    avg_key = "avg_accuracy" if metric == "accuracy" else "avg_normalized"
    for name, row in report["methods"].items():
        cells = [_pct(row[metric].get(t, float("nan"))) for t in tasks]
        style = "bold green" if name == "MASS" else None
        table.add_row(name, row["kind"], *cells, _pct(row[avg_key]), style=style)
    return table


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Both tables, routing accuracy per task and the targets, on the terminal."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: do not squeeze the task columns into 80 characters
            console = Console(width=200)
    console.print(terminal_table(report, "accuracy"))
    console.print(terminal_table(report, "normalized"))
    routing = report["mass"]["routing_accuracy"]
    console.print("MASS routing accuracy (top-1): " + ", ".join(f"{t} {_pct(v)}" for t, v in routing.items()))
    for name, target in report["targets"].items():
        mark = "[green]met[/green]" if target["met"] else "[red]missed[/red]"
        console.print(f"target {name}: {_pct(target['value'])} (target {_pct(target['target'])}) {mark}")


def _md_table(report: dict[str, Any], metric: str) -> list[str]:
    tasks = _tasks(report)
    avg_key = "avg_accuracy" if metric == "accuracy" else "avg_normalized"
    lines = ["| method | kind | " + " | ".join(tasks) + " | avg |", "|" + "---|" * (len(tasks) + 3)]
    for name, row in report["methods"].items():
        cells = [_pct(row[metric].get(t, float("nan"))) for t in tasks]
        bold = "**" if name == "MASS" else ""
        lines.append(f"| {bold}{name}{bold} | {row['kind']} | " + " | ".join(cells) + f" | {bold}{_pct(row[avg_key])}{bold} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """report.md: setup, both accuracy tables, routing, layer sweep, targets, storage, speed and timing."""
    tasks = _tasks(report)
    ft = report["finetune"]
    out = [f"# massmerge offline suite: preset `{report['preset']}`", "",
           f"Backbone all-MiniLM-L6-v2; {len(tasks)} tasks; experts fine-tune the whole encoder against frozen "
           f"zero-shot heads ({ft['steps']} steps, batch {ft['batch_size']}, lr {ft['lr']}, max length "
           f"{ft['max_length']}, logit scale {ft['logit_scale']}). Routing layer `{report['config']['routing_layer']}`, "
           f"eta {report['config']['eta']}, K {report['config']['top_k']}, eps {report['config']['eps']}. "
           f"`max-logit` rows and `MASS` hide the task; a prediction counts only with the right task and class.", "",
           "## Tasks", "", "| task | description | classes | train | val | test |", "|---|---|---|---|---|---|"]  # fmt: skip
    for t in report["tasks"]:
        s = t["sizes"]
        out.append(f"| {t['name']} | {t['description']} | {len(t['classes'])} | {s['train']} | {s['val']} | {s['test']} |")
    out += ["", "## Absolute accuracy (%)", "", *_md_table(report, "accuracy"), "",
            "## Normalized accuracy (% of each expert on the same test split)", "", *_md_table(report, "normalized")]
    out += ["", "## MASS routing", "", "| task | top-1 routing accuracy | true task selected |", "|---|---|---|"]
    for t in tasks:
        out.append(f"| {t} | {_pct(report['mass']['routing_accuracy'][t])} | {_pct(report['mass']['selection_recall'][t])} |")
    out += ["", f"Mean tasks selected per sample: {report['mass']['mean_selected']:.2f}.", "",
            "## Routing-layer sweep (top-1 routing accuracy, first pass only)", "",
            "| layer | " + " | ".join(tasks) + " | mean | true task selected |", "|" + "---|" * (len(tasks) + 3)]
    for row in report["layer_sweep"]:
        cells = [_pct(row["routing_accuracy"][t]) for t in tasks]
        out.append(f"| `{row['layer']}` | " + " | ".join(cells) + f" | {_pct(row['mean'])} | {_pct(row['selection_recall'])} |")
    out += ["", "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    for name, target in report["targets"].items():
        out.append(f"| {name} | {_pct(target['value'])} | {_pct(target['target'])} | {'yes' if target['met'] else 'no'} |")
    thr, st, tm = report["throughput"], report["storage"], report["timing"]
    out += ["", "## Storage, speed, time", "",
            f"- MASS storage: {st['mass_factor']:.2f}x the base model ({st['mass_numel']:,} vs {st['base_numel']:,} numbers).",
            f"- Throughput on one mixed 64-sample batch: base {thr['base_samples_per_s']:.1f}/s, MASS "
            f"{thr['mass_samples_per_s']:.1f}/s (ratio {thr['ratio']:.2f}).",
            "- Merge time: " + ", ".join(f"{n} {r['merge_seconds']:.1f}s" for n, r in report["methods"].items() if "merge_seconds" in r),
            "- Wall time: " + ", ".join(f"{k.replace('_seconds', '')} {v:.0f}s" for k, v in tm.items()) +
            f" on {report['threads']} threads.",
            "- De-redundancy left out of the first pass: " + (
                "; ".join(f"`{k}`: {', '.join(v)}" for k, v in report["dropped"].items()) or "nothing")]  # fmt: skip
    out += ["", "Plots: per_task.png, radar.png, routing_confusion.png, routing_accuracy.png, layer_sweep.png.", ""]
    return "\n".join(out)


def write_report(report: dict[str, Any], out_dir: Path, *, console: Console | None = None, show: bool = True) -> None:
    """Write report.json, report.md and the PNG plots into ``out_dir`` and print the tables."""
    from massmerge import plots

    out_dir = Path(out_dir)
    _atomic(out_dir / "report.json", json.dumps(report, indent=2))
    _atomic(out_dir / "report.md", markdown(report))
    plots.write_all(report, out_dir)
    if show:
        print_report(report, console)
