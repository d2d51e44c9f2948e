"""The report on the terminal: rich tables of both accuracies, MASS's loss split, the flags and targets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from massmerge.experiments.report.stats import MET, MISSED
from massmerge.experiments.report.text import (
    LOSS_COLUMNS,
    METRIC_TITLES,
    PM_NOTE,
    flagged,
    method_cells,
    pm,
    run_name,
    span,
    storage_line,
    target_goal,
    target_value,
    tasks_of,
    zero_shot_lines,
)




def terminal_table(report: Mapping[str, Any], metric: str = "accuracy") -> Table:
    """A rich table: one row per method, one column per task plus the average, each value with its ±."""
    table = Table(title=f"massmerge {escape(run_name(report))}: {METRIC_TITLES[metric]}", caption=PM_NOTE)
    table.add_column("method")
    table.add_column("kind", style="dim")
    for task in tasks_of(report):
        table.add_column(escape(task), justify="right")
    table.add_column("avg", justify="right", style="bold")
    for name, row in report["methods"].items():
        cells = [escape(c) for c in method_cells(report, name, metric)]
        table.add_row(escape(name), row["kind"], *cells, style="bold green" if name == "MASS" else None)
    return table




def loss_table(report: Mapping[str, Any]) -> Table:
    """MASS's accuracy per task split into routing, selection, final task choice and class."""
    table = Table(title="where MASS loses (%, 95% ±)")
    table.add_column("task")
    for label in LOSS_COLUMNS.values():
        table.add_column(escape(label), justify="right")
    for task, row in report["mass_loss"].items():
        cells = [pm(row[k]["value"], row[k]["interval"]) for k in LOSS_COLUMNS]
        table.add_row(escape(task) + (" †" if task in flagged(report) else ""), *cells)
    return table


def _status_markup(value: str) -> str:
    color = {MET: "green", MISSED: "red"}.get(value, "yellow")
    return f"[{color}]{escape(value)}[/{color}]"


def print_report(report: Mapping[str, Any], console: Console | None = None) -> None:
    """Tables, MASS's loss split, zero-shot flags, targets and the storage figure on the terminal."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: do not squeeze the task columns into 80 characters
            console = Console(width=200)
    console.print(terminal_table(report, "accuracy"))
    console.print(terminal_table(report, "normalized"))
    if report["mass_loss"]:
        console.print(loss_table(report))
        for line in zero_shot_lines(report):
            console.print(escape(line))
    for target in report["targets"].values():
        console.print(f"target: {escape(target['description'])}: {escape(target_value(target))} "
                      f"(95% {escape(span(target['interval'], target['unit'] != 'normalized'))}; goal "
                      f"{escape(target_goal(target))}) {_status_markup(target['status'])}")  # fmt: skip
    if report["storage"] is not None:
        console.print(escape(storage_line(report)))


__all__ = ["loss_table", "print_report", "terminal_table"]
