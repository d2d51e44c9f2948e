"""Serve an artifact on a file of inputs: what ``massmerge predict`` writes, one JSON row per input.

Text artifacts read a text file (one input per line; blank lines are skipped) or a ``.jsonl`` file (each line a
JSON string or an object with a ``text`` field); image artifacts (CLIP, open_clip) an image, a directory of
images (recursively, in sorted order) or a text file of image paths (relative to that file), preprocessed as
the base's ``preprocessor_config.json`` says (CLIP's eval transform otherwise). Rows are
:func:`massmerge.mass.serving.prediction_row`'s; ``index`` is the input's 1-based line number in the inputs
file (for images: the 1-based position in the image list).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from massmerge.adapters.text import load_tokenizer, model_positions, served_max_length
from massmerge.artifact.loader import load
from massmerge.artifact.manifest import MANIFEST, MODEL_DIR, Manifest
from massmerge.data.images import preprocess_for, read_image_paths
from massmerge.device import describe as describe_device
from massmerge.errors import OptionError
from massmerge.io.inputs import read_text_inputs
from massmerge.mass.serving import predict_images, predict_texts
from massmerge.progress import quiet_third_party

TEXT_FAMILIES = ("text",)
IMAGE_FAMILIES = ("clip", "open_clip")


def read_inputs(artifact: Path, manifest: Manifest, inputs: Path) -> list[Any]:
    """The inputs of an artifact's family: ``(line number, text)`` pairs for text, image paths for images."""
    family = manifest.architecture.adapter
    if family in TEXT_FAMILIES:
        return read_text_inputs(inputs)
    if family in IMAGE_FAMILIES:
        return read_image_paths(inputs)
    raise OptionError(f"{artifact}: predict serves text and image artifacts; this one's family is "
                      f"'{family}' (use the Python API load() for it)")


def predict_rows(artifact: Path, manifest: Manifest, items: Sequence[Any], *, router: str | None = None,
                 strategy: str = "auto", overrides: Mapping[str, Any] | None = None, device: Any = None,
                 note: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
    """Load the artifact on ``device`` with the serve overrides (None values are left at the artifact's) and
    yield one row per input in input order; ``note`` receives the one-line notes (the device served on, a max
    length clipped to the positions)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    with quiet_third_party():
        model = load(artifact, router=router, strategy=strategy, device=device, **overrides)  # type: ignore[arg-type]
    note(f"device: {describe_device(model.device)}, {model.dtype}".replace("torch.", ""))
    batch_size = model.settings.batch_size
    if manifest.architecture.adapter in TEXT_FAMILIES:
        tokenizer = load_tokenizer(artifact / MODEL_DIR)
        length, clipped = served_max_length(overrides.get("max_length"), manifest.serve.max_length,
                                            model_positions(model.model), str(artifact / MANIFEST))
        if clipped:
            note(f"note: {clipped}")
        return predict_texts(model, tokenizer, items, batch_size=batch_size, max_length=length)
    return predict_images(model, preprocess_for(model.model, artifact / MODEL_DIR), items, batch_size=batch_size)


__all__ = ["IMAGE_FAMILIES", "TEXT_FAMILIES", "predict_rows", "read_inputs"]
