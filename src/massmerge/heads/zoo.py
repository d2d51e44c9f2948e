"""Building heads for real checkpoints: CLIP zero-shot heads from class names + templates, linear heads from a
model's classifier weights.

Why a module of its own: :mod:`.modules` is pure tensors; this one knows file formats, tokenizers and the
package-shipped class names and prompt templates of the 20 vision tasks (``data/clip_tasks.json``), so the
paper's benchmark needs no hand-written label lists. Class order is each dataset's label order (design.md
section 4: a head's class order must be the dataset's).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from importlib import resources

import torch
from torch import nn
from torch.nn import functional as F

from massmerge.adapters.weights import check_pickle_policy, refuse_remote_code
from massmerge.checkpoints import safetensors_model_dir
from massmerge.errors import CheckpointError, OptionError
from massmerge.heads.modules import LinearHead, ZeroShotHead
from massmerge.sources import resolve_source

TextEncoder = Callable[[list[str]], torch.Tensor]
CLASSIFIER_NAMES = ("classifier", "score", "head", "classification_head", "fc")


@lru_cache(maxsize=1)
def clip_tasks() -> dict:
    """The shipped ``clip_tasks.json``: ``{"tasks": {name: {classnames, templates, hf_dataset}}, "benchmarks"}``."""
    text = resources.files("massmerge.data").joinpath("clip_tasks.json").read_text(encoding="utf-8")
    return json.loads(text)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def clip_task(name: str) -> dict:
    """Class names, templates and suggested dataset of one task; names match ignoring case and punctuation."""
    tasks = clip_tasks()["tasks"]
    found = {_norm(k): k for k in tasks}.get(_norm(name))
    if found is None:
        raise OptionError(f"task '{name}': no shipped class names (known: {', '.join(tasks)}); give classnames and templates")
    return tasks[found]


def benchmark_tasks(size: int | str) -> list[str]:
    """The task names of the paper's 8-, 14- or 20-task vision benchmark."""
    bench = clip_tasks()["benchmarks"]
    if str(size) not in bench:
        raise OptionError(f"benchmark: no {size}-task benchmark (choose {', '.join(bench)})")
    return list(bench[str(size)])


def format_prompts(classname: str, templates: Sequence[str]) -> list[str]:
    """Fill each template's ``{}`` with the class name."""
    return [t.replace("{}", classname) for t in templates]


@torch.no_grad()
def zero_shot_head(encode: TextEncoder, classnames: Sequence[str], templates: Sequence[str],
                   logit_scale: float = 100.0) -> ZeroShotHead:
    """CLIP zero-shot head: per class, the mean of its normalized prompt embeddings (design.md section 2.8)."""
    if not classnames or not templates:
        raise OptionError("zero-shot head: needs at least one class name and one template")
    rows = []
    for name in classnames:
        emb = F.normalize(encode(format_prompts(name, templates)).float(), dim=-1)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return ZeroShotHead(torch.stack(rows), logit_scale)


def hf_clip_text_encoder(model: nn.Module, tokenizer: Callable, *, batch_size: int = 256) -> TextEncoder:
    """A text encoder from an HF ``CLIPModel``: projected text embeddings of a list of prompts."""

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, return_tensors="pt")
            pooled = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
            out.append(model.text_projection(pooled))
        return torch.cat(out)

    return encode


def load_hf_clip_text(source: str, *, revision: str | None = None, trust_pickle: bool = False
                      ) -> tuple[TextEncoder, float]:
    """(text encoder, logit scale) of a full HF CLIP checkpoint (e.g. ``openai/clip-vit-base-patch32``); a
    ``pytorch_model.bin``-only directory is read from its safetensors copy when pickle is trusted, as the
    vision tower is (:func:`~massmerge.checkpoints.safetensors_model_dir`)."""
    from transformers import AutoTokenizer, CLIPModel

    path = resolve_source(source, revision)
    refuse_remote_code(path)
    path = safetensors_model_dir(path, trust_pickle=trust_pickle)
    check_pickle_policy(path, trust_pickle=trust_pickle)
    try:
        model = CLIPModel.from_pretrained(str(path)).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: zero-shot heads need a full CLIP model with its tokenizer ({reason})") from None
    return hf_clip_text_encoder(model, tokenizer), float(model.logit_scale.detach().exp())


def clip_zero_shot_heads(encode: TextEncoder, task_names: Sequence[str], *, logit_scale: float = 100.0,
                         overrides: Mapping[str, Mapping] | None = None) -> list[ZeroShotHead]:
    """One zero-shot head per task from the shipped class names/templates (or per-task overrides)."""
    heads = []
    for name in task_names:
        spec = dict(overrides.get(name, {})) if overrides else {}
        shipped = clip_task(name) if not (spec.get("classnames") and spec.get("templates")) else {}
        classnames = spec.get("classnames") or shipped["classnames"]
        templates = spec.get("templates") or shipped["templates"]
        heads.append(zero_shot_head(encode, classnames, templates, logit_scale))
    return heads


def linear_head_from_state(
    state: Mapping[str, torch.Tensor], *, prefix: str | None = None, name: str = "checkpoint"
) -> LinearHead:
    """A :class:`LinearHead` from a classifier's ``<prefix>.weight`` / ``<prefix>.bias`` in a state dict.

    Without ``prefix`` the usual names (classifier, score, head, fc) are tried. A multi-layer classifier (e.g.
    RoBERTa's dense + out_proj) is not linear and is refused.
    """
    prefixes = [prefix] if prefix else list(CLASSIFIER_NAMES)
    for p in prefixes:
        weight_key = next((k for k in state if k == f"{p}.weight" or k.endswith(f".{p}.weight")), None)
        if weight_key is not None:
            weight = state[weight_key]
            if weight.ndim != 2:
                raise CheckpointError(f"{name}: '{weight_key}' is not a matrix (shape {list(weight.shape)})")
            bias = state.get(weight_key[: -len("weight")] + "bias")
            return LinearHead(weight.float(), None if bias is None else bias.float())
    if any(".out_proj." in k or k.startswith("classifier.dense") for k in state):
        raise CheckpointError(f"{name}: the classifier has several layers (dense + out_proj); only linear heads are supported")
    raise CheckpointError(f"{name}: no classifier weight ({' or '.join(p + '.weight' for p in prefixes)})")
