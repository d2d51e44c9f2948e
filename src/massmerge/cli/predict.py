"""``massmerge predict DIR INPUTS``: serve a MASS artifact on text or images, one JSON line per input.

Text artifacts: INPUTS is a text file (one input per line; blank lines are skipped) or a ``.jsonl`` file (each
line a JSON string or an object with a ``text`` field). Image artifacts (CLIP, open_clip): INPUTS is an image, a
directory of images (recursively, in sorted order) or a text file of image paths (relative to that file),
preprocessed as the base's ``preprocessor_config.json`` says (CLIP's eval transform otherwise).

An artifact that generates (family seq2seq, T5) reads text prompts and writes ``{"index", "selected", "probs",
"text"}`` per prompt; ``--max-new-tokens``, ``--num-beams``, ``--do-sample``, ``--temperature`` and ``--top-p``
(declared once by ``GenerateSettings``) shape the decoding. A prompt above the model's limit is cut (a note says
what was cut).

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

from massmerge.cli.app import command
from massmerge.cli.options import (
    DEVICE_HELP,
    ROUTER_HELP,
    artifact_help,
    check_positive,
    with_generate_flags,
    with_serve_flags,
)
from massmerge.errors import MassMergeError

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
    from massmerge.io.atomic import atomic_write

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
@with_generate_flags
@with_serve_flags(artifact_help)
def predict_cmd(
    artifact: Annotated[Path, typer.Argument(metavar="ARTIFACT", help="artifact directory written by massmerge build")],
    inputs: Annotated[Path, typer.Argument(metavar="INPUTS", help="text: a text file (one input per line) or "
                                                                  ".jsonl; images: an image, a directory of "
                                                                  "images or a file listing image paths")],
    output: Annotated[Path | None, typer.Option(metavar="PATH", help="write JSON lines here (atomically) "
                                                                     "[default: stdout]")] = None,
    router: Annotated[str | None, typer.Option(metavar="NAME", help=ROUTER_HELP)] = None,
    serve: dict[str, Any] | None = None,  # every serve setting's flag (with_serve_flags), unset ones None
    strategy: Annotated[str, typer.Option(metavar="NAME", help="second pass: auto, batched, grouped or reference "
                                                               "(slow, for checks)")] = "auto",
    device: Annotated[str | None, typer.Option(metavar="NAME", help=DEVICE_HELP)] = None,
    generation: dict[str, Any] | None = None,  # every generation flag (with_generate_flags)
) -> None:
    """Predict (task, class) for every input with a MASS artifact, or the generated text of every prompt with an
    artifact that generates."""
    from massmerge.artifact import read_manifest, serve_settings
    from massmerge.artifact.predictor import Predictor, predict_file_rows
    from massmerge.artifact.serve import read_inputs
    from massmerge.device import resolve_device
    from massmerge.progress import track

    overrides = dict(serve or {})
    check_positive("--batch-size", overrides.get("batch_size"))
    check_positive("--max-length", overrides.get("max_length"))
    target = resolve_device(device)
    manifest = read_manifest(artifact)
    serve_settings(manifest, router=None, **overrides)  # every flag is checked before the model loads
    generation = {k: v for k, v in (generation or {}).items() if v is not None and v is not False}
    if manifest.output == "generate":
        from massmerge.mass.config import make_generate_settings

        make_generate_settings(**generation)  # before the model loads
        if overrides.get("restart_block"):
            raise MassMergeError(f"--restart-block {overrides['restart_block']}: {artifact} generates, and a decode "
                                 "step would run past the prompt's recorded states; use 0")
    elif generation:
        raise MassMergeError(f"--{next(iter(generation)).replace('_', '-')}: {artifact} classifies; generation "
                             "options apply to artifacts that generate")
    items = read_inputs(artifact, manifest, inputs)
    if not items:
        typer.echo(f"note: {inputs} holds no inputs; nothing to predict", err=True)
        write_rows(iter(()), output)
        return
    predictor = Predictor(artifact, router=router, strategy=strategy, device=target,
                          note=lambda line: typer.echo(line, err=True), **overrides)
    write_rows(predict_file_rows(predictor, items, track=track, generation=generation,
                                 note=lambda line: typer.echo(line, err=True)), output)
