"""``massmerge predict DIR INPUTS``: serve a MASS artifact on a file of text inputs, one JSON line per input.

INPUTS is a text file (one input per line) or a ``.jsonl`` file (each line a JSON string or an object with a
``text`` field). Each output line: ``{"index", "task", "label", "class", "selected", "probs"}``; ``class`` is the
class name when the head has them. Batches mix inputs of different tasks: the artifact routes each sample.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from massmerge.artifact import MODEL_DIR, load
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


def predict_texts(model: Any, tokenizer: Any, texts: list[str], *, batch_size: int, max_length: int) -> list[dict]:
    """One result dict per text, in input order."""
    manifest = model.manifest
    names = manifest.task_names
    results = []
    chunks = list(batches(texts, batch_size))
    for start, chunk in track(chunks, "predicting", total=len(chunks)):
        batch = dict(tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        out = model(batch)
        for row in range(len(chunk)):
            task, label = int(out.task[row]), int(out.label[row])
            class_names = manifest.heads[task].class_names
            results.append({
                "index": start + row, "task": names[task], "label": label,
                "class": class_names[label] if class_names else label,
                "selected": [names[t] for t in out.selected[row].nonzero().flatten().tolist()],
                "probs": {names[t]: round(float(p), 6) for t, p in enumerate(out.probs[row])},
            })
    return results


@app.command("predict")
def predict_cmd(
    artifact: Annotated[Path, typer.Argument(help="artifact directory written by massmerge build")],
    inputs: Annotated[Path, typer.Argument(help="text file (one input per line) or .jsonl")],
    output: Annotated[Path | None, typer.Option(help="write JSON lines here (atomically) instead of stdout")] = None,
    batch_size: Annotated[int, typer.Option(help="inputs per batch (tasks may be mixed)")] = 32,
    max_length: Annotated[int, typer.Option(help="truncate inputs to this many tokens")] = 128,
) -> None:
    """Predict (task, class) for every input with a MASS artifact."""
    if batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1, got {batch_size}")
    model = load(artifact)
    if model.manifest.architecture.adapter != "text":
        raise OptionError(f"{artifact}: predict reads text inputs; this artifact's family is "
                          f"'{model.manifest.architecture.adapter}' (use the Python API load() for it)")
    tokenizer = _tokenizer(artifact / MODEL_DIR)
    results = predict_texts(model, tokenizer, read_inputs(inputs), batch_size=batch_size, max_length=max_length)
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
