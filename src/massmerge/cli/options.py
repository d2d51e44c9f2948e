"""Help texts and checks shared by several commands, so one idea has one flag and one wording everywhere.

Kept free of heavy imports: the CLI must start fast (``massmerge --help`` imports no torch).
"""

from __future__ import annotations

from massmerge.errors import OptionError
from massmerge.mass.config import DEFAULT_ALPHA, DEFAULT_ETA, DEFAULT_MAX_SIZE, DEFAULT_TAU, DEFAULT_TOP_K

RANK_FRACTION_HELP = "kept rank per task and matrix: floor(min(m, n) x FLOAT) [default: 1/T]"
EPS_HELP = "de-redundancy: leave a task out of the first pass where its cosine with a kept task exceeds FLOAT"
DEREDUNDANCY_HELP = "drop redundant tasks from the first-pass merge (see --eps)"
MAX_SIZE_HELP = ("cut every task's rank by one common fraction so the artifact is at most FLOAT x the base's "
                 f"bytes; 0 keeps the design ranks [default: {DEFAULT_MAX_SIZE} where reachable]")
ROUTER_HELP = "a named router rule applied before the other router flags: paper (the paper's exact rule)"
ROUTING_LAYER_HELP = "routing nn.Linear name (repeat for multi-layer routing) [default: the artifact's]"
POOLING_HELP = "routing token pooling: cls, mean or content (mean without special tokens) [default: the artifact's]"
LAYER_COMBINE_HELP = "how several routing layers combine: standardized or ppca [default: the artifact's]"
MODE_HELP = "routing mode: topk, top1 or batch (the whole input is one task) [default: the artifact's]"
ETA_HELP = f"select tasks whose router probability exceeds FLOAT [default: the artifact's, {DEFAULT_ETA}]"
TOP_K_HELP = f"at most INT tasks per input [default: the artifact's, {DEFAULT_TOP_K}]"
TAU_HELP = f"router softmax temperature [default: the artifact's, {DEFAULT_TAU}]"
HEAD_RULE_HELP = "how the task is chosen among the selected: max_logit (paper) or posterior [default: the artifact's]"
ALPHA_HELP = f"scale of the merged deltas [default: the artifact's, {DEFAULT_ALPHA}]"


def check_positive(option: str, value: int | float | None) -> None:
    """``None`` (unset) passes; zero or a negative number is a one-line error naming the option."""
    if value is not None and value <= 0:
        raise OptionError(f"{option} must be >= 1, got {value}" if isinstance(value, int)
                          else f"{option} must be > 0, got {value}")
