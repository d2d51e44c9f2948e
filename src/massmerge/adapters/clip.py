"""HF CLIP vision towers (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``).

Layout: HF CLIP is batch-first ``[B, L, D]`` with the class token at position 0, so the routing vector is
``activation[:, 0]`` (never ``activation[0]``, which is the first sample). Routing matrix: ``mlp.fc1`` of block
``round(0.75 * depth)`` of the vision encoder. Features: the projected image embedding (``visual_projection``
of the pooled, post-layernormed class token), i.e. the space CLIP zero-shot heads live in.

The experts of the paper's benchmark (e.g. ``tanganke/clip-vit-base-patch32_<task>``) are bare
``CLIPVisionModel`` checkpoints whose base is a full ``CLIPModel``; their projection is the base's, which the
adapter keeps aside (``projection``) because it is not merged.
"""

from __future__ import annotations

from pathlib import Path
from pickle import UnpicklingError

import torch
from safetensors import SafetensorError
from torch import nn

from massmerge.adapters.base import BaseAdapter, Batch
from massmerge.adapters.families import CLIP_BLOCKS, CLIP_MLP
from massmerge.adapters.weights import check_pickle_policy, open_weights, refuse_remote_code
from massmerge.checkpoints import safetensors_model_dir
from massmerge.errors import MassMergeError, OptionError
from massmerge.sources import resolve_source

IMAGE_KEYS = ("pixel_values", "image", "images")


def pixel_values_of(batch: Batch) -> torch.Tensor:
    """The image tensor ``[B, 3, H, W]`` of a batch (a bare tensor or a mapping with ``pixel_values``)."""
    if isinstance(batch, torch.Tensor):
        return batch
    for key in IMAGE_KEYS:
        if isinstance(batch.get(key), torch.Tensor):
            return batch[key]
    raise OptionError(f"batch: a vision batch needs one of the keys {', '.join(IMAGE_KEYS)}; got {sorted(batch)}")


class CLIPAdapter(BaseAdapter):
    """HF CLIP vision tower: CLS at token 0, batch-first, routing at ``mlp.fc1``."""

    name = "clip"
    block_suffixes = CLIP_BLOCKS
    block_exclude = ("text_model",)
    mlp_names = CLIP_MLP
    default_pooling = "cls"

    def __init__(self, *, routing_layer: str | int | None = None, pooling=None, projection: nn.Linear | None = None) -> None:  # noqa: ANN001
        super().__init__(routing_layer=routing_layer, pooling=pooling)
        self.projection = projection

    def encoder_keys(self, model: nn.Module) -> list[str]:
        """Only the vision tower is merged: a ``CLIPModel``'s text tower and projections are left out."""
        keys = list(model.state_dict())
        vision = [k for k in keys if k.startswith("vision_model.")]
        return vision if hasattr(model, "text_model") and vision else keys

    def feature_dim(self, model: nn.Module) -> int | None:
        """The projection's width when there is one, else the vision tower's hidden size."""
        config = getattr(model, "config", None)
        if hasattr(model, "visual_projection"):
            return int(model.visual_projection.out_features)
        if self.projection is not None:
            return int(self.projection.out_features)
        vision = getattr(config, "vision_config", config)
        return getattr(vision, "hidden_size", None)

    def features(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Projected image embedding ``[B, projection_dim]`` (or the pooled output when no projection exists)."""
        pixels = pixel_values_of(batch)
        tower = getattr(model, "vision_model", None)
        if tower is not None and hasattr(model, "visual_projection") and hasattr(model, "text_model"):
            return model.visual_projection(tower(pixel_values=pixels).pooler_output)  # CLIPModel
        out = model(pixel_values=pixels)
        if getattr(out, "image_embeds", None) is not None:  # CLIPVisionModelWithProjection
            return out.image_embeds
        pooled = out.pooler_output
        return self.projection(pooled) if self.projection is not None else pooled

    def load_model(self, source: str, *, revision: str | None = None, trust_pickle: bool = False) -> nn.Module:
        """The vision tower (``CLIPVisionModel``) from a CLIP or CLIP-vision directory / hub id; keeps the base's
        projection aside. A directory holding only ``pytorch_model.bin`` (the OpenAI B/32 and B/16 bases) is read
        from its safetensors copy, converted once when the user trusts pickle
        (:func:`~massmerge.checkpoints.safetensors_model_dir`), so the projection comes from the same weights."""
        from transformers import CLIPVisionModel

        path = _resolve(source, revision)
        refuse_remote_code(path)
        path = safetensors_model_dir(path, trust_pickle=trust_pickle)
        check_pickle_policy(path, trust_pickle=trust_pickle)
        try:
            model = CLIPVisionModel.from_pretrained(str(path))
        except (OSError, ValueError, RuntimeError, UnpicklingError, SafetensorError) as exc:
            raise MassMergeError(f"{path}: cannot load a CLIP vision model ({_first_line(exc)})") from None
        if self.projection is None:
            self.projection = load_visual_projection(path, trust_pickle=trust_pickle)
        return model.eval()


def load_visual_projection(path: Path, *, trust_pickle: bool = False) -> nn.Linear | None:
    """The base's ``visual_projection`` (a bias-free Linear) if the checkpoint at ``path`` has one, in whichever
    format its weights are (safetensors lazily, a trusted pickle weights-only)."""
    try:
        ckpt = open_weights(path, trust_pickle=trust_pickle)
    except MassMergeError:
        return None
    key = next((k for k in ckpt if k == "visual_projection.weight" or k.endswith(".visual_projection.weight")), None)
    return linear_from_weight(ckpt[key]) if key else None


def linear_from_weight(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding the given ``[out, in]`` weight (and bias)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.eval()


def _resolve(source: str, revision: str | None) -> Path:
    return resolve_source(source, revision)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
