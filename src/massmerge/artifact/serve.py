"""``massmerge predict``'s inputs file: what an artifact's family reads from it.

Text artifacts read a text file (one input per line; blank lines are skipped) or a ``.jsonl`` file (each line a
JSON string or an object with a ``text`` field); image artifacts (CLIP, open_clip) an image, a directory of
images (recursively, in sorted order) or a text file of image paths (relative to that file). The rows are
:func:`massmerge.artifact.predictor.predict_file_rows`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from massmerge.artifact.manifest import Manifest
from massmerge.artifact.predictor import input_kind
from massmerge.data.images import read_image_paths
from massmerge.io.inputs import read_text_inputs


def read_inputs(artifact: Path, manifest: Manifest, inputs: Path) -> list[Any]:
    """The inputs of an artifact's family: ``(line number, text)`` pairs for text, image paths for images."""
    if input_kind(artifact, manifest) == "text":
        return read_text_inputs(inputs)
    return read_image_paths(inputs)


__all__ = ["read_inputs"]
