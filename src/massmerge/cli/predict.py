"""``massmerge predict DIR INPUTS``: serve a MASS artifact on text or images, one JSON line per input.

Text artifacts: INPUTS is a text file (one input per line) or a ``.jsonl`` file (each line a JSON string or an
object with a ``text`` field). Image artifacts (CLIP, open_clip): INPUTS is an image, a directory of images
(recursively, in sorted order) or a text file of image paths (relative to that file), preprocessed as the
base's ``preprocessor_config.json`` says (CLIP's eval transform otherwise). Each output line:
``{"index", "task", "label", "class", "selected", "probs"}`` (plus ``"input"``, the path, for images);
``class`` is the class name when the head has them. Batches mix inputs of different tasks: the artifact
routes each sample.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from massmerge.artifact import MODEL_DIR, load, read_manifest
from massmerge.checkpoints import atomic_write
from massmerge.cli import app
from massmerge.errors import MassMergeError, OptionError
from massmerge.progress import track


def read_inputs(path: Path) -> list[str]:
    """Texts from a plain text file (one per non-empty line) or JSON lines (a string or {"text": ...})."""
    if not path.is_file():
        raise MassMergeError(f"{path}: no such inputs file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for number, line in enumerate(lines, start=1):
        try:
            item = json.loads(line)
        except ValueError:
            raise MassMergeError(f"{path}: line {number} is not valid JSON") from None
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise MassMergeError(f"{path}: line {number} has no string 'text' field")
        texts.append(text)
    return texts


def batches(texts: list[str], size: int) -> Iterator[tuple[int, list[str]]]:
    for start in range(0, len(texts), size):
        yield start, texts[start:start + size]


def result_rows(manifest: Any, out: Any, start: int, count: int) -> list[dict]:
    """The JSON rows of one predicted batch (``out`` a MASS output), indices from ``start``."""
    names = manifest.task_names
    rows = []
    for row in range(count):
        task, label = int(out.task[row]), int(out.label[row])
        class_names = manifest.heads[task].class_names
        rows.append({
            "index": start + row, "task": names[task], "label": label,
            "class": class_names[label] if class_names else label,
            "selected": [names[t] for t in out.selected[row].nonzero().flatten().tolist()],
            "probs": {names[t]: round(float(p), 6) for t, p in enumerate(out.probs[row])},
        })
    return rows


def predict_texts(model: Any, tokenizer: Any, texts: list[str], *, batch_size: int, max_length: int) -> list[dict]:
    """One result dict per text, in input order."""
    results = []
    chunks = list(batches(texts, batch_size))
    for start, chunk in track(chunks, "predicting", total=len(chunks)):
        batch = dict(tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        results += result_rows(model.manifest, model(batch), start, len(chunk))
    return results


def read_image_paths(path: Path) -> list[Path]:
    """An image, the images under a directory (sorted), or the paths listed in a text file (one per line)."""
    from massmerge.data.images import IMAGE_SUFFIXES

    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise MassMergeError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this directory")
        return found
    if not path.is_file():
        raise MassMergeError(f"{path}: no such inputs file or directory")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [path]
    listed = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    paths = [(path.parent / line) if not Path(line).is_absolute() else Path(line) for line in listed]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MassMergeError(f"{path}: listed image '{missing[0]}' does not exist ({len(missing)} missing)")
    return paths


def predict_images(model: Any, preprocess: Any, paths: list[Path], *, batch_size: int) -> list[dict]:
    """One result dict per image, in input order, with its path as ``input``."""
    from massmerge.data.images import ImageDataset

    images = ImageDataset("inputs", [], [(str(p), 0) for p in paths])
    results = []
    total = (len(paths) + batch_size - 1) // batch_size
    batches_ = track(images.batches(preprocess, batch_size), "predicting", total=total)
    for number, (pixels, _) in enumerate(batches_):
        start = number * batch_size
        rows = result_rows(model.manifest, model({"pixel_values": pixels}), start, len(pixels))
        results += [{**row, "input": str(paths[row["index"]])} for row in rows]
    return results


def image_preprocess(model: Any, model_dir: Path) -> Any:
    """The base's own eval transform (``preprocessor_config.json``), else CLIP's at the model's image size."""
    from massmerge.data.images import Preprocess

    base = getattr(model, "model", None)
    config = getattr(base, "config", None)
    vision = getattr(config, "vision_config", config)
    size = getattr(vision, "image_size", None) or getattr(getattr(base, "visual", None), "image_size", None)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return Preprocess.from_model_dir(model_dir, image_size=size)


@app.command("predict")
def predict_cmd(
    artifact: Annotated[Path, typer.Argument(help="artifact directory written by massmerge build")],
    inputs: Annotated[Path, typer.Argument(help="text: a text file (one input per line) or .jsonl; images: an "
                                                "image, a directory of images or a file listing image paths")],
    output: Annotated[Path | None, typer.Option(help="write JSON lines here (atomically) instead of stdout")] = None,
    batch_size: Annotated[int, typer.Option(help="inputs per batch (tasks may be mixed)")] = 32,
    max_length: Annotated[int, typer.Option(help="truncate inputs to this many tokens")] = 128,
) -> None:
    """Predict (task, class) for every input with a MASS artifact."""
    if batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1, got {batch_size}")
    family = read_manifest(artifact).architecture.adapter  # inputs are checked before the model loads
    if family == "text":
        texts = read_inputs(inputs)
        model = load(artifact)
        tokenizer = _tokenizer(artifact / MODEL_DIR)
        results = predict_texts(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    elif family in ("clip", "open_clip"):
        paths = read_image_paths(inputs)
        model = load(artifact)
        results = predict_images(model, image_preprocess(model, artifact / MODEL_DIR), paths, batch_size=batch_size)
    else:
        raise OptionError(f"{artifact}: predict serves text and image artifacts; this one's family is "
                          f"'{family}' (use the Python API load() for it)")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if output is None:
        typer.echo(text, nl=False)
    else:
        atomic_write(output, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise MassMergeError(f"{model_dir}: no usable tokenizer in the artifact ({str(exc).splitlines()[0][:160]}); "
                             "build it from an HF directory that has tokenizer files") from None
