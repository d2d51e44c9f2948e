"""The serving core: an artifact loaded once (model, tokenizer or image transform, max length), then asked for
predictions on lists of inputs, as many times as the caller likes.

Why (issue 28): ``massmerge predict``, ``massmerge serve`` and the benchmarks must run one path, and a server
cannot reload the artifact per request. :class:`Predictor` holds no file handle once loaded, writes nothing and
shows no progress bar: ``predict`` adds its file reading and progress around it, the server its batching.

Rows are what ``massmerge predict`` writes, one JSON object per input: ``index``, ``task``, ``label``, ``class``
(the class name when the head has them), ``selected`` and ``probs``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from massmerge.adapters.text import load_tokenizer, model_positions, served_max_length
from massmerge.artifact.loader import load, serve_settings
from massmerge.artifact.manifest import MANIFEST, MODEL_DIR, Manifest, read_manifest
from massmerge.data.images import image_collate, open_image, preprocess_for
from massmerge.errors import MassMergeError, OptionError
from massmerge.mass.batch import set_order
from massmerge.mass.lru import LRU
from massmerge.mass.model import MASSModel
from massmerge.mass.outputs import Routing
from massmerge.mass.serving import Prediction, serve
from massmerge.progress import quiet_third_party

TEXT_FAMILIES = ("text", "seq2seq")
IMAGE_FAMILIES = ("clip", "open_clip")
#: The serve settings a single request may change: the router's and the head rule. The rest (dtype, batch
#: size, max length, routing layers) shape the loaded model or its batching and are fixed when it is loaded.
REQUEST_SETTINGS = ("mode", "eta", "top_k", "tau", "head_rule")
PREPARE_CHUNK = 1024  # texts of a file tokenized per call as they stream (images: a batch at a time)
SETTING_VIEWS = 16  # distinct per-request settings kept as ready views of the model (each shares every cache)


def input_kind(artifact: Path, manifest: Manifest) -> str:
    """``text`` or ``image``: what the artifact's family reads, or a one-line error for a family predict does
    not serve."""
    family = manifest.architecture.adapter
    if family in TEXT_FAMILIES:
        return "text"
    if family in IMAGE_FAMILIES:
        return "image"
    raise OptionError(f"{artifact}: predict serves text and image artifacts; this one's family is "
                      f"'{family}' (use the Python API load() for it)")


def prediction_row(model: MASSModel, prediction: Prediction, number: int) -> dict[str, Any]:
    """The JSON row for one input: ``index`` (``number``), ``task``, ``label``, ``class``, ``selected``, ``probs``."""
    names = model.task_names
    task, label = prediction.task, prediction.label
    class_names = model.class_names[task] if model.class_names else None
    return {"index": number, "task": names[task], "label": label,
            "class": class_names[label] if class_names else label,
            "selected": [names[t] for t in prediction.selected.nonzero().flatten().tolist()],
            "probs": {names[t]: round(float(p), 6) for t, p in enumerate(prediction.probs)}}


def image_from_bytes(data: bytes, where: str) -> Any:
    """A PIL image decoded from encoded bytes (PNG, JPEG, ...); undecodable bytes are one line naming ``where``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise MassMergeError(f"{where}: not a decodable image ({str(exc).splitlines()[0][:120]})") from None


def _tokenizer_limit(tokenizer: Any) -> int | None:
    """The tokenizer's ``model_max_length`` when it states a real one (HF writes a huge sentinel otherwise):
    T5 has relative positions, so this is the limit a generating T5 artifact serves."""
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if isinstance(value, int) and 0 < value < 10**6 else None


def generation_row(model: MASSModel, selected: torch.Tensor, probs: torch.Tensor, texts: list[str],
                   number: int) -> dict[str, Any]:
    """The JSON row of one prompt: ``index``, ``selected``, ``probs`` and ``text`` (a list when several
    sequences were asked for per prompt)."""
    names = model.task_names
    return {"index": number, "selected": [names[t] for t in selected.nonzero().flatten().tolist()],
            "probs": {names[t]: round(float(p), 6) for t, p in enumerate(probs)},
            "text": texts[0] if len(texts) == 1 else texts}


#: Batches of prompts that :meth:`GeneratingPredictor.generate` routes before generating any of them, so that it
#: can generate them in batches of few task sets (set order): a decode step reads each distinct set's factors and
#: core, so a batch of mixed sets decodes several times slower than a batch of one (docs/BENCHMARKS.md). Bounded:
#: a window holds these prompts' strings and routing only.
GROUP_WINDOW = 8


class GeneratingPredictor:
    """What :class:`Predictor` adds for an artifact whose output is ``generate`` (mixed into it)."""

    model: MASSModel
    tokenizer: Any
    max_length: int
    batch_size: int
    _backwards: bool = False  # the next window walks its sets in reverse set order (_window_order)

    def cut_notes(self, prompts: Sequence[str], names: Sequence[str]) -> list[str]:
        """One note per prompt longer than the max length, saying what was cut."""
        notes = []
        lengths = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        for name, length in zip(names, lengths):
            if length > self.max_length:
                notes.append(f"note: {name}: prompt of {length} tokens cut to the model's limit of "
                             f"{self.max_length} (its last {length - self.max_length} tokens dropped)")
        return notes

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], settings: Mapping[str, Any] | None = None, *,
                 names: Sequence[str] | None = None, note: Callable[[str], None] | None = None,
                 router: Mapping[str, Any] | None = None, **generation: Any) -> list[dict[str, Any]]:
        """One row per prompt (:func:`generation_row`), in order, ``batch_size`` prompts per routed
        ``generate()``. ``settings``: a :class:`~massmerge.mass.config.GenerateSettings` (or its fields as a
        dict); ``generation``: any other HF ``generate()`` argument. A prompt above the max length is cut, and
        ``note`` told so. ``router``: per-call router settings (:data:`REQUEST_SETTINGS`, as :meth:`Predictor.view`)."""
        from massmerge.mass.config import GenerateSettings, make_generate_settings

        if self.model.manifest is not None and self.model.manifest.output != "generate":
            raise OptionError(f"{self.model.manifest.directory}: this artifact classifies; use predict()")
        model = self.view(router) if router else self.model  # type: ignore[attr-defined]
        chosen = settings if isinstance(settings, GenerateSettings) else make_generate_settings(**dict(settings or {}))
        options = {**chosen.hf(), **generation}
        names = list(names) if names is not None else [f"inputs[{i}]" for i in range(len(prompts))]
        for line in self.cut_notes(prompts, names):
            (note or (lambda _: None))(line)
        rows: list[dict[str, Any]] = []
        window = self.batch_size * GROUP_WINDOW
        for start in range(0, len(prompts), window):
            rows.extend(self._generate_window(model, list(prompts[start:start + window]), start, options))
        return rows

    def _tokenized(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(prompts), truncation=True, max_length=self.max_length, padding=True,
                                   return_tensors="pt"))

    def _window_order(self, selected: torch.Tensor) -> torch.Tensor:
        """The window's prompts in set order, every other window backwards. Why: each set's cores are cached
        (an LRU bounded in bytes), and windows that walk their sets in the same order, once those sets' cores
        exceed the cache, evict each set just before it is needed again and recompute every one (LRU's cyclic
        worst case: seconds per set for flan-t5-base); walking back and forth, a window starts with the sets the
        last one used most recently, so at most the sets beyond the cache's bytes are recomputed."""
        order = set_order(selected).cpu()
        backwards, self._backwards = self._backwards, not self._backwards
        return order.flip(0) if backwards else order

    def _generate_window(self, model: MASSModel, prompts: list[str], start: int, options: Mapping[str, Any]
                         ) -> list[dict[str, Any]]:
        """Rows of one window of prompts: routed batch by batch in order, then generated in batches cut from the
        window in set order (:meth:`_window_order`), rows put back in order."""
        routing = Routing.cat([model.route(self._tokenized(prompts[i:i + self.batch_size]))
                               for i in range(0, len(prompts), self.batch_size)])
        order = self._window_order(routing.selected)
        rows: list[dict[str, Any] | None] = [None] * len(prompts)
        for first in range(0, len(prompts), self.batch_size):
            index = order[first:first + self.batch_size]
            out = model.generate(self._tokenized([prompts[i] for i in index.tolist()]),
                                 routing=routing.rows(index.to(routing.selected.device)), **options)
            sequences = out.sequences if isinstance(out.sequences, torch.Tensor) else out.sequences.sequences
            texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
            per = len(texts) // len(index)
            for j, i in enumerate(index.tolist()):
                rows[i] = generation_row(model, out.routing.selected[j], out.routing.probs[j],
                                         texts[j * per:(j + 1) * per], start + i)
        return rows  # type: ignore[return-value]


class Predictor(GeneratingPredictor):
    """An artifact, loaded once, that answers lists of inputs with :func:`prediction_row` rows (an artifact
    that generates: :meth:`generate`, rows of :func:`generation_row`).

    ``overrides`` are :class:`~massmerge.mass.config.ServeSettings` fields fixed for the whole life of the
    predictor (checked before the model loads); ``settings=`` on :meth:`predict` changes the router's settings
    (:data:`REQUEST_SETTINGS`) for one call. ``note`` receives the one-line notes (the device, a clipped max length).
    """

    def __init__(self, artifact: str | os.PathLike[str], *, router: str | None = None, strategy: str = "auto",
                 device: Any = None, note: Callable[[str], None] | None = None, **overrides: Any) -> None:
        from massmerge.device import describe as describe_device

        self.artifact = Path(artifact)
        self.manifest = read_manifest(self.artifact)
        self.kind = input_kind(self.artifact, self.manifest)
        self.output = self.manifest.output  # classify or generate
        overrides = {key: value for key, value in overrides.items() if value is not None}
        serve_settings(self.manifest, router=None, **overrides)  # every override checked before the model loads
        note = note or (lambda line: None)
        with quiet_third_party():
            self.model = load(self.artifact, router=router, strategy=strategy, device=device,  # type: ignore[arg-type]
                              **overrides)
        note(f"device: {describe_device(self.model.device)}, {self.model.dtype}".replace("torch.", ""))
        self.batch_size = self.model.settings.batch_size
        self._views = LRU(SETTING_VIEWS)
        if self.kind == "text":
            self.tokenizer = load_tokenizer(self.artifact / MODEL_DIR)
            positions = model_positions(self.model.model) or _tokenizer_limit(self.tokenizer)
            self.max_length, clipped = served_max_length(overrides.get("max_length"), self.manifest.serve.max_length,
                                                         positions,
                                                         str(self.artifact / MANIFEST))
            if clipped:
                note(f"note: {clipped}")
        else:
            self.preprocess = preprocess_for(self.model.model, self.artifact / MODEL_DIR)

    @property
    def task_names(self) -> list[str]:
        return self.model.task_names

    def view(self, settings: Mapping[str, Any] | None) -> MASSModel:
        """The model under per-request router settings (validated as the CLI validates its flags; a key that a
        request may not change is one line naming it); the loaded model itself when there are none."""
        changes = {key: value for key, value in (settings or {}).items() if value is not None}
        if not changes:
            return self.model
        fixed = sorted(set(changes) - set(REQUEST_SETTINGS))
        if fixed:
            raise OptionError(f"settings.{fixed[0]}: not a per-request setting (choose from "
                              f"{', '.join(REQUEST_SETTINGS)})")
        validated = self.model.settings.updated(**changes)
        key = tuple(getattr(validated, name) for name in REQUEST_SETTINGS)
        return self._views.get_or_make(key, lambda: self.model.with_settings(validated))

    def prepare(self, raws: Sequence[Any], names: Sequence[str]) -> list[Any]:
        """Inputs ready to batch: texts are tokenized in one call (truncated to the max length); images (PIL
        images, paths or encoded bytes) decoded and preprocessed. ``names[i]`` names input i in errors."""
        if self.kind == "text":
            for raw, name in zip(raws, names):
                if not isinstance(raw, str):
                    raise OptionError(f"{name}: expected a text, got {type(raw).__name__}")
            if not raws:
                return []
            encoded = self.tokenizer(list(raws), truncation=True, max_length=self.max_length)
            keys = list(encoded.keys())
            return [{key: encoded[key][row] for key in keys} for row in range(len(raws))]
        return [self.preprocess(image_from_bytes(raw, name) if isinstance(raw, (bytes, bytearray)) else open_image(raw))
                for raw, name in zip(raws, names)]

    def collate(self, items: Sequence[Any]) -> Any:
        """Prepared inputs as one batch (text: padded to the longest)."""
        if self.kind == "text":
            return dict(self.tokenizer.pad(list(items), return_tensors="pt"))
        return image_collate(items)

    @staticmethod
    def size_of(item: Any) -> int:
        """What a batch is sorted by within a window (tokens for text; images are all one size)."""
        return len(item["input_ids"]) if isinstance(item, dict) else 0

    def stream(self, prepared: Iterable[Any], *, settings: Mapping[str, Any] | None = None,
               window: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(position, row)`` for a stream of prepared inputs, in order, a window at a time (bounded memory);
        a row's ``index`` is its 0-based position (callers number inputs their own way)."""
        model = self.view(settings)
        for prediction in serve(model, prepared, self.collate, batch_size=self.batch_size,
                                size_of=self.size_of, window=window):
            yield prediction.index, prediction_row(model, prediction, prediction.index)

    def predict(self, inputs: Sequence[Any], *, settings: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """One row per input, in order, all routed in one window (so the inputs of a call batch by task set);
        ``index`` counts from 0."""
        self.view(settings)  # bad settings fail before any input is prepared
        prepared = self.prepare(inputs, [f"inputs[{i}]" for i in range(len(inputs))])
        return [row for _, row in self.stream(prepared, settings=settings, window=max(1, len(prepared)))]


def _chunked(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def predict_file_rows(predictor: Predictor, items: Sequence[Any], *,
                      track: Callable[..., Iterable[Any]] | None = None, generation: Mapping[str, Any] | None = None,
                      note: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """``massmerge predict``'s rows for the items of an inputs file (text: ``(line number, text)`` pairs; images:
    paths), in order, with ``index`` the line number (images: the 1-based position) and, for images, ``input``;
    ``track(rows, label, total=)`` wraps the rows (a progress bar) when given. An artifact that generates:
    rows of :func:`generation_row`, ``generation`` its options, ``note`` told of prompts cut to the limit."""
    size = PREPARE_CHUNK if predictor.kind == "text" else predictor.batch_size
    if predictor.output == "generate":
        yield from _generated_file_rows(predictor, items, generation or {}, note, track)
        return

    def prepared() -> Iterator[Any]:  # a chunk at a time, so a long file is never held prepared
        for chunk in _chunked(items, size):
            if predictor.kind == "text":
                yield from predictor.prepare([text for _, text in chunk], [f"line {number}" for number, _ in chunk])
            else:
                yield from predictor.prepare(chunk, [str(path) for path in chunk])

    rows = predictor.stream(prepared())
    for position, row in (track(rows, "predicting", total=len(items)) if track else rows):
        if predictor.kind == "text":
            yield {**row, "index": items[position][0]}
        else:
            yield {**row, "index": position + 1, "input": str(items[position])}


def _generated_file_rows(predictor: Predictor, items: Sequence[Any], generation: Mapping[str, Any],
                         note: Callable[[str], None] | None, track: Callable[..., Iterable[Any]] | None
                         ) -> Iterator[dict[str, Any]]:
    def rows() -> Iterator[dict[str, Any]]:
        for chunk in _chunked(items, predictor.batch_size):
            made = predictor.generate([text for _, text in chunk], generation,
                                      names=[f"line {number}" for number, _ in chunk], note=note)
            for (number, _), row in zip(chunk, made):
                yield {**row, "index": number}

    yield from (track(rows(), "generating", total=len(items)) if track else rows())


__all__ = [
    "IMAGE_FAMILIES",
    "REQUEST_SETTINGS",
    "TEXT_FAMILIES",
    "GeneratingPredictor",
    "Predictor",
    "generation_row",
    "image_from_bytes",
    "input_kind",
    "predict_file_rows",
    "prediction_row",
]
