"""The report of an experiment (suite or evaluate): statistics, schema, Markdown, terminal and plots.

:func:`write_report` checks a front end's report against the schema (:mod:`.schema`), adds the derived sections
(:mod:`.stats`), then writes report.json, report.md (:mod:`.markdown`) and the plots (:mod:`.plots`), each file
atomically, and prints the tables (:mod:`.terminal`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from massmerge.experiments.report import plots
from massmerge.experiments.report.markdown import markdown
from massmerge.experiments.report.schema import SCHEMA_VERSION, complete
from massmerge.experiments.report.terminal import print_report
from massmerge.io.atomic import write_text_atomically


def write_report(report: Mapping[str, Any], out_dir: Path, *, console: Console | None = None,
                 show: bool = True) -> dict[str, Any]:  # fmt: skip
    """Check ``report``, write report.json, report.md and the plots into ``out_dir``; return the written report.

    Raises pydantic.ValidationError (naming the field) before writing anything when the report breaks the schema.
    """
    full = complete(report)
    out_dir = Path(out_dir)
    write_text_atomically(out_dir / "report.json", json.dumps(full, indent=2, allow_nan=False))
    write_text_atomically(out_dir / "report.md", markdown(full))
    plots.write_all(full, out_dir)
    if show:
        print_report(full, console)
    return full


__all__ = ["SCHEMA_VERSION", "complete", "markdown", "print_report", "write_report"]
