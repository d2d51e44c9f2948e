"""The static merges' names and defaults, free of torch so the command line can show them fast.

Every default is defined here once: the methods' signatures and the CLI's help texts read it.
"""

from __future__ import annotations

#: Public method names (the CLI's ``--method``), in the order the docs list them.
METHOD_NAMES = ("weight_average", "task_arithmetic", "ties", "tsv_m", "tsv_c", "iso_c", "iso_cts")
#: Methods that produce one model for all tasks (tsv_c needs the task, so it is not a merge in that sense).
STATIC_MERGES = ("weight_average", "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts")

DEFAULT_ALPHA = 1.0  # every method but task_arithmetic (by T) and weight_average (none)
TIES_DENSITY = 0.2  # the fraction of each task vector TIES keeps
ISO_CTS_COMMON_FRACTION = 0.8  # the fraction of the spectrum Iso-CTS keeps in the common subspace

__all__ = ["DEFAULT_ALPHA", "ISO_CTS_COMMON_FRACTION", "METHOD_NAMES", "STATIC_MERGES", "TIES_DENSITY"]
