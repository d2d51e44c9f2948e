"""Help texts and checks shared by several commands, so one idea has one flag and one wording everywhere.

Every default a help text states is read from where it is defined (``mass/config.py``), never retyped. Kept
free of heavy imports: the CLI must start fast (``massmerge --help`` imports no torch).
"""

from __future__ import annotations

from typing import Any

from massmerge.errors import OptionError
from massmerge.mass.config import DEFAULT_MAX_SIZE, ServeSettings

RANK_FRACTION_HELP = "kept rank per task and matrix: floor(min(m, n) x FLOAT) [default: 1/T]"
EPS_HELP = "de-redundancy: leave a task out of the first pass where its cosine with a kept task exceeds FLOAT"
DEREDUNDANCY_HELP = "drop redundant tasks from the first-pass merge (see --eps)"
MAX_SIZE_HELP = ("cut every task's rank by one common fraction so the artifact is at most FLOAT x the base's "
                 f"bytes; 0 keeps the design ranks [default: {DEFAULT_MAX_SIZE} where reachable]")
DEVICE_HELP = "cpu, cuda, cuda:N or mps [default: cuda when a GPU is visible, else cpu]"
DTYPE_HELP = "serving precision: float32, float16 or bfloat16 [default: the model's own]"
TRUST_PICKLE_HELP = "allow pickle checkpoints (.bin/.pt), loaded weights-only; only for files you trust"

# Serve settings: what each flag does; the default is added per command (the artifact's, or the engine's).
SERVE_HELP = {
    "router": "a named router rule applied before the other router flags: paper (the paper's exact rule)",
    "routing_layers": "routing nn.Linear name (repeat for multi-layer routing)",
    "pooling": ("routing token pooling: cls, mean, content (mean without special tokens) or tokens (RMS of each "
                "content token's residual)"),
    "layer_combine": "how several routing layers combine: standardized or ppca",
    "mode": "routing mode: topk, top1 or batch (the whole input is one task)",
    "eta": "select tasks whose router probability exceeds FLOAT",
    "top_k": "at most INT tasks per input",
    "tau": "router softmax temperature",
    "head_rule": ("how the task is chosen among the selected: max_logit (paper), posterior (router probability x "
                  "head softmax) or joint (log router probability + logits)"),
    "alpha": "scale of the merged deltas",
    "batch_size": "inputs per batch, tasks mixed",
    "dtype": "serving precision: float32, float16 or bfloat16",
    "restart_block": ("the block the second pass restarts at from the first pass's hidden states (0: two full "
                      "passes; at most the routing layer's block)"),
}


def serve_default(field: str) -> Any:
    """The engine's default of a serve setting (``mass/config.py``)."""
    return ServeSettings.model_fields[field].default


def artifact_help(field: str) -> str:
    """Help of a serve flag of ``predict``: unset means the artifact's value (shown with the engine default)."""
    default = serve_default(field) if field in ServeSettings.model_fields else None
    shown = f", {default}" if default is not None and not isinstance(default, tuple) else ""
    return f"{SERVE_HELP[field]} [default: the artifact's{shown}]"


def engine_help(field: str, default: Any = None) -> str:
    """Help of a serve flag of ``suite``: unset means the engine's default (or ``default`` when given)."""
    value = default if default is not None else serve_default(field)
    return f"{SERVE_HELP[field]} [default: {value}]"


def check_positive(option: str, value: int | float | None) -> None:
    """``None`` (unset) passes; zero or a negative number is a one-line error naming the option."""
    if value is not None and value <= 0:
        raise OptionError(f"{option} must be >= 1, got {value}" if isinstance(value, int)
                          else f"{option} must be > 0, got {value}")
