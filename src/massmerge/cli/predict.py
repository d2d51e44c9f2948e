"""``massmerge predict DIR INPUTS``: serve a MASS artifact on text or images, one JSON line per input.

Text artifacts: INPUTS is a text file (one input per line; blank lines are skipped) or a ``.jsonl`` file (each
line a JSON string or an object with a ``text`` field). Image artifacts (CLIP, open_clip): INPUTS is an image, a
directory of images (recursively, in sorted order) or a text file of image paths (relative to that file),
preprocessed as the base's ``preprocessor_config.json`` says (CLIP's eval transform otherwise).

Each output line is ``{"index", "task", "label", "class", "selected", "probs"}`` (plus ``"input"``, the path,
for images). ``index`` is the input's 1-based line number in the inputs file (for images: the 1-based position
in the image list); ``class`` is the class name when the head has them. Batches mix inputs of different tasks:
the artifact routes each sample. Results go to stdout (or ``--output``, written atomically) as they are made;
progress goes to stderr. Serve settings (router, eta, K, tau, head rule, pooling, routing layers, alpha,
max length) default to the artifact's and can be overridden by flags without a rebuild.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from massmerge.cli import command
from massmerge.cli.options import SERVE_HELP, artifact_help, check_positive, describe, read_utf8_lines
from massmerge.errors import MassMergeError, OptionError


def read_inputs(path: Path) -> list[tuple[int, str]]:
    """(line number, text) from a plain text file (non-blank lines) or JSON lines (a string or {"text": ...})."""
    from massmerge.artifact import parse_json_text

    lines = [(n, line) for n, line in read_utf8_lines(path) if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for number, line in lines:
        where = f"{path}: line {number}"
        item = parse_json_text(line, where)  # nesting depth bounded: a hostile line cannot recurse deeply
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise MassMergeError(f"{where} has no string 'text' field")
        texts.append((number, text))
    return texts


def model_positions(model: Any) -> int | None:
    """How many token positions the model has (None for relative-position models such as T5)."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


FALLBACK_MAX_LENGTH = 512  # tokens, for a model that records no positions (relative-position models)


def effective_max_length(requested: int | None, recorded: int | None, positions: int | None,
                         manifest_path: Path) -> int:
    """``--max-length``, else the artifact's, clipped to the model's positions with a note naming the source."""
    length = requested or recorded or positions or FALLBACK_MAX_LENGTH
    if positions is not None and length > positions:
        source = f"--max-length {length}" if requested else f"{manifest_path}: field 'serve.max_length' ({length})"
        typer.echo(f"note: {source} is above the model's {positions} positions; using {positions}", err=True)
        length = positions
    return length


def prediction_row(manifest: Any, prediction: Any, number: int) -> dict:
    """The JSON row of one input's prediction (a :class:`~massmerge.mass.serving.Prediction`)."""
    names = manifest.task_names
    task, label = prediction.task, prediction.label
    class_names = manifest.heads[task].class_names
    return {"index": number, "task": names[task], "label": label,
            "class": class_names[label] if class_names else label,
            "selected": [names[t] for t in prediction.selected.nonzero().flatten().tolist()],
            "probs": {names[t]: round(float(p), 6) for t, p in enumerate(prediction.probs)}}


def text_items(tokenizer: Any, texts: list[tuple[int, str]], max_length: int, chunk: int = 1024) -> Iterator[dict]:
    """Each text tokenized (truncated, not padded), a chunk at a time, so a long file is not held tokenized."""
    for start in range(0, len(texts), chunk):
        encoded = tokenizer([text for _, text in texts[start:start + chunk]], truncation=True, max_length=max_length)
        keys = list(encoded.keys())
        for row in range(len(encoded["input_ids"])):
            yield {key: encoded[key][row] for key in keys}


def predict_texts(model: Any, tokenizer: Any, texts: list[tuple[int, str]], *, batch_size: int,
                  max_length: int) -> Iterator[dict]:
    """One result dict per text, in input order, as each window of inputs is done (massmerge/mass/serving.py)."""
    from massmerge.mass.serving import serve
    from massmerge.progress import track

    def collate(items: Any) -> dict:
        return dict(tokenizer.pad(list(items), return_tensors="pt"))

    predictions = serve(model, text_items(tokenizer, texts, max_length), collate, batch_size=batch_size,
                        size_of=lambda item: len(item["input_ids"]))
    for prediction in track(predictions, "predicting", total=len(texts)):
        yield prediction_row(model.manifest, prediction, texts[prediction.index][0])


def read_image_paths(path: Path) -> list[Path]:
    """An image, the images under a directory (sorted), or the paths listed in a text file (one per line)."""
    from massmerge.data.images import IMAGE_SUFFIXES

    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise MassMergeError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this directory")
        return found
    if not path.is_file():
        raise MassMergeError(f"{path}: {describe(path)}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [path]
    listed = [line.strip() for _, line in read_utf8_lines(path) if line.strip()]
    paths = [(path.parent / line) if not Path(line).is_absolute() else Path(line) for line in listed]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MassMergeError(f"{path}: listed image '{missing[0]}' does not exist ({len(missing)} missing)")
    return paths


def predict_images(model: Any, preprocess: Any, paths: list[Path], *, batch_size: int) -> Iterator[dict]:
    """One result dict per image, in input order, with its path as ``input``."""
    import torch

    from massmerge.data.images import open_image
    from massmerge.mass.serving import serve
    from massmerge.progress import track

    def collate(chunk: Any) -> dict:
        return {"pixel_values": torch.stack(list(chunk))}

    def images() -> Iterator[Any]:
        for path in paths:
            yield preprocess(open_image(path))

    predictions = serve(model, images(), collate, batch_size=batch_size)
    for prediction in track(predictions, "predicting", total=len(paths)):
        row = prediction_row(model.manifest, prediction, prediction.index + 1)
        yield {**row, "input": str(paths[prediction.index])}


def image_preprocess(model: Any, model_dir: Path) -> Any:
    """The base's own eval transform (``preprocessor_config.json``), else CLIP's at the model's image size."""
    from massmerge.data.images import Preprocess

    base = getattr(model, "model", None)
    config = getattr(base, "config", None)
    vision = getattr(config, "vision_config", config)
    size = getattr(vision, "image_size", None) or getattr(getattr(base, "visual", None), "image_size", None)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return Preprocess.from_model_dir(model_dir, image_size=size)


SIGPIPE_EXIT = 141  # what a shell reports for a writer whose reader went away (128 + SIGPIPE)


def to_stdout(line: str) -> None:
    """Write and flush one result line; a reader that went away (``| head``) ends the command quietly, a full
    disk behind a redirect is one error line. Either way stdout is pointed at /dev/null first, so the
    interpreter's own flush at exit cannot print a second message."""
    try:
        sys.stdout.write(line)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        raise SystemExit(SIGPIPE_EXIT) from None
    except OSError as exc:
        _silence_stdout()
        raise MassMergeError(f"stdout: cannot write the predictions ({exc.strerror or exc})") from None


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def write_rows(rows: Iterator[dict], output: Path | None) -> int:
    """Stream JSON lines to stdout, or to ``output`` through a temp file renamed at the end; the row count."""
    from massmerge.checkpoints import atomic_write

    count = 0

    def emit(handle: TextIO) -> None:
        nonlocal count
        for row in rows:
            line = json.dumps(row, ensure_ascii=False) + "\n"
            if handle is sys.stdout:
                to_stdout(line)
            else:
                handle.write(line)
            count += 1

    if output is None:
        emit(sys.stdout)
    else:
        def write(tmp: Path) -> None:
            with tmp.open("w", encoding="utf-8") as handle:
                emit(handle)

        atomic_write(output, write)
    return count


@command("predict")
def predict_cmd(
    artifact: Annotated[Path, typer.Argument(metavar="ARTIFACT", help="artifact directory written by massmerge build")],
    inputs: Annotated[Path, typer.Argument(metavar="INPUTS", help="text: a text file (one input per line) or "
                                                                  ".jsonl; images: an image, a directory of "
                                                                  "images or a file listing image paths")],
    output: Annotated[Path | None, typer.Option(metavar="PATH", help="write JSON lines here (atomically) "
                                                                     "[default: stdout]")] = None,
    batch_size: Annotated[int | None, typer.Option(metavar="INT", help=artifact_help("batch_size"))] = None,
    max_length: Annotated[int | None, typer.Option(metavar="INT", help="text: tokens per input, clipped to the "
                                                                       "model's positions [default: the "
                                                                       "artifact's: what the experts were "
                                                                       "trained with]")] = None,
    router: Annotated[str | None, typer.Option(metavar="NAME", help=SERVE_HELP["router"])] = None,
    routing_layer: Annotated[list[str] | None, typer.Option(metavar="NAME", help=artifact_help("routing_layers"))] = None,
    pooling: Annotated[str | None, typer.Option(metavar="NAME", help=artifact_help("pooling"))] = None,
    layer_combine: Annotated[str | None, typer.Option(metavar="NAME", help=artifact_help("layer_combine"))] = None,
    mode: Annotated[str | None, typer.Option(metavar="NAME", help=artifact_help("mode"))] = None,
    eta: Annotated[float | None, typer.Option(metavar="FLOAT", help=artifact_help("eta"))] = None,
    top_k: Annotated[int | None, typer.Option(metavar="INT", help=artifact_help("top_k"))] = None,
    tau: Annotated[float | None, typer.Option(metavar="FLOAT", help=artifact_help("tau"))] = None,
    head_rule: Annotated[str | None, typer.Option(metavar="NAME", help=artifact_help("head_rule"))] = None,
    alpha: Annotated[float | None, typer.Option(metavar="FLOAT", help=artifact_help("alpha"))] = None,
    strategy: Annotated[str, typer.Option(metavar="NAME", help="second pass: auto, batched, grouped or reference "
                                                               "(slow, for checks)")] = "auto",
) -> None:
    """Predict (task, class) for every input with a MASS artifact."""
    from massmerge.artifact import MANIFEST, MODEL_DIR, read_manifest, serve_settings

    check_positive("--batch-size", batch_size)
    check_positive("--max-length", max_length)
    manifest = read_manifest(artifact)
    overrides = {"routing_layers": tuple(routing_layer) if routing_layer else None, "pooling": pooling,
                 "layer_combine": layer_combine, "mode": mode, "eta": eta, "top_k": top_k, "tau": tau,
                 "head_rule": head_rule, "alpha": alpha, "batch_size": batch_size, "max_length": max_length}
    serve_settings(manifest, router=None, **overrides)  # every flag is checked before the model loads
    family = manifest.architecture.adapter
    if family == "text":
        items: list[Any] = read_inputs(inputs)
    elif family in ("clip", "open_clip"):
        items = read_image_paths(inputs)
    else:
        raise OptionError(f"{artifact}: predict serves text and image artifacts; this one's family is "
                          f"'{family}' (use the Python API load() for it)")
    if not items:
        typer.echo(f"note: {inputs} holds no inputs; nothing to predict", err=True)
        write_rows(iter(()), output)
        return
    model = _load(artifact, router, strategy, overrides)
    settings = model.settings
    if family == "text":
        tokenizer = _tokenizer(artifact / MODEL_DIR)
        length = effective_max_length(max_length, manifest.serve.max_length, model_positions(model.model),
                                      artifact / MANIFEST)
        rows = predict_texts(model, tokenizer, items, batch_size=settings.batch_size, max_length=length)
    else:
        preprocess = image_preprocess(model, artifact / MODEL_DIR)
        rows = predict_images(model, preprocess, items, batch_size=settings.batch_size)
    write_rows(rows, output)


def _load(artifact: Path, router: str | None, strategy: str, overrides: dict[str, Any]) -> Any:
    from massmerge.artifact import load
    from massmerge.progress import quiet_third_party

    with quiet_third_party():
        return load(artifact, router=router, strategy=strategy,  # type: ignore[arg-type]
                    **{k: v for k, v in overrides.items() if v is not None})


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    from massmerge.progress import quiet_third_party

    try:
        with quiet_third_party():
            return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise MassMergeError(f"{model_dir}: no usable tokenizer in the artifact ({str(exc).splitlines()[0][:160]}); "
                             "build it from an HF directory that has tokenizer files") from None
