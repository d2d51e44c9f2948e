"""The report's assembly from a run's results, the one place ``suite`` and ``evaluate`` both build it.

Why: the two front ends run the same runner and write the same report (:mod:`.schema`); assembled by hand in
each, its common sections (the served settings, the MASS details, storage, threads, targets) drifted apart.
A front end passes what only it knows (its config, tasks, timing, and its own sections) and gets the report
that :func:`~massmerge.experiments.report.write_report` checks and writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from massmerge.experiments.report.stats import targets
from massmerge.experiments.runner import ServedMASS
from massmerge.mass.config import ServeSettings


def assemble_report(kind: str, *, preset: str | None, config: Mapping[str, Any], settings: ServeSettings,
                    served: ServedMASS | None, tasks: Sequence[Mapping[str, Any]],
                    methods: Mapping[str, Mapping[str, Any]], mass_details: Sequence[Mapping[str, Any]],
                    timing: Mapping[str, float], **sections: Any) -> dict[str, Any]:
    """The report of a run (schema: :mod:`.schema`), its ``targets`` included.

    ``config``: the run's own settings, to which the served ``settings`` are added (``eta``, ``top_k`` and the
    whole ``serve_settings``); ``served``: the MASS model scored (None when MASS was not run: no storage, nothing
    dropped); ``mass_details``: one entry per routing layer scored with the full model, the served one first;
    ``sections``: the front end's other sections (``finetune``, ``layer_sweep``, ``ablation``, ...).
    """
    report = {
        "kind": kind, "preset": preset,
        "config": {**config, "eta": settings.eta, "top_k": settings.top_k,
                   "serve_settings": settings.model_dump(mode="json")},
        "tasks": [dict(task) for task in tasks], "methods": dict(methods),
        "mass": dict(mass_details[0]) if mass_details else None, "mass_layers": [dict(d) for d in mass_details],
        "dropped": served.mass.factors.dropped() if served is not None else {},
        "storage": ({k: v for k, v in served.storage.items() if k != "rank_scale"} if served is not None else None),
        "timing": dict(timing), "threads": torch.get_num_threads(), **sections,
    }  # fmt: skip
    report["targets"] = targets(report)
    return report


__all__ = ["assemble_report"]
