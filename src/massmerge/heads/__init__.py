"""Heads: modules that map final features to a task's logits, the rules that pick a task among them, the
``--heads`` file format and the CLIP zero-shot heads built from shipped class names (:mod:`.zoo`).

Names are imported lazily, so reading this package costs no torch import until a head is used.
"""

from __future__ import annotations

from massmerge.lazy import lazy_getattr

_EXPORTS = {
    "LinearHead": "massmerge.heads.modules",
    "ZeroShotHead": "massmerge.heads.modules",
    "choose": "massmerge.heads.rules",
    "select_by_max_logit": "massmerge.heads.rules",
    "HeadSet": "massmerge.heads.files",
    "read_head_file": "massmerge.heads.files",
    "read_heads_files": "massmerge.heads.files",
    "write_head_file": "massmerge.heads.files",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
