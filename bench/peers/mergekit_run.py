"""Run ``mergekit-yaml`` (mergekit's public entry point) with one runtime fix for BERT; executed by the mergekit
venv's python, never imported by massmerge.

The fix: mergekit's own ``bert.json`` marks ``embeddings.position_ids`` optional, and ``MergePlanner.plan_tensor``
checks an optional weight's presence with ``[w_in.name] + (w_in.aliases or [])``, which raises ``TypeError`` because
``aliases`` is a tuple. The wrapper below does that presence check itself (skipping the weight when no input has
it, as mergekit intends) and otherwise calls mergekit's ``plan_tensor`` unchanged. The installed package is not
modified. Usage: python mergekit_run.py CONFIG.yml OUT_DIR [mergekit-yaml options]
"""

from __future__ import annotations

import sys

import mergekit.plan as plan
from mergekit.io.tasks import LoaderCache

_original_plan_tensor = plan.MergePlanner.plan_tensor


def plan_tensor(self, weight, weights_in, models, cfg_reader):  # noqa: ANN001, ANN201 - mergekit's signature
    if weight.optional:
        present = any(name in LoaderCache().get(model).index.tensor_paths
                      for model, w_in in zip(models, weights_in) for name in (w_in.name, *(w_in.aliases or ())))
        if not present:
            return None
        weight = weight.model_copy(update={"optional": False})
    return _original_plan_tensor(self, weight, weights_in, models, cfg_reader)


plan.MergePlanner.plan_tensor = plan_tensor

if __name__ == "__main__":
    from mergekit.scripts.run_yaml import main

    sys.argv = ["mergekit-yaml", *sys.argv[1:]]
    main()
