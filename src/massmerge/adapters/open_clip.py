"""open_clip visual towers (``model.visual``: ``VisionTransformer`` with ``transformer.resblocks``).

The task-vectors papers fine-tune open_clip ``ViT-B-32``/``ViT-B-16``/``ViT-L-14`` image encoders. Their layout
changed across open_clip versions: older ones run the blocks sequence-first ``[L, B, D]`` (the class token is
``x[0]``), newer ones batch-first ``[B, L, D]`` with ``transformer.batch_first = True``. The adapter reads that
attribute from the built model (absent means the old sequence-first layout) instead of guessing from shapes.

Routing matrix: ``mlp.c_fc`` of resblock ``round(0.75 * depth)``. Features: ``visual(images)`` (the projected,
pooled embedding). ``open_clip`` itself (which needs torchvision) is imported only to build a model by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from massmerge.adapters.base import BaseAdapter, Batch
from massmerge.adapters.clip import pixel_values_of
from massmerge.adapters.families import OPEN_CLIP_BLOCKS, OPEN_CLIP_MLP
from massmerge.adapters.weights import AlignedCheckpoint
from massmerge.checkpoints import load_state_dict
from massmerge.errors import MassMergeError
from massmerge.sources import resolve_source


def visual_of(model: nn.Module) -> nn.Module:
    """The visual tower: ``model.visual`` of a whole CLIP model, else the model itself."""
    return getattr(model, "visual", model)


def is_batch_first(model: nn.Module) -> bool:
    """Whether the visual transformer runs ``[B, L, D]``; open_clip < 2.24 has no attribute and is ``[L, B, D]``."""
    transformer = getattr(visual_of(model), "transformer", None)
    return bool(getattr(transformer, "batch_first", False))


class OpenCLIPAdapter(BaseAdapter):
    """open_clip ViT visual tower; call :meth:`bind` (done by :func:`massmerge.adapters.adapter_for`) first."""

    name = "open_clip"
    block_suffixes = OPEN_CLIP_BLOCKS
    block_exclude = ()
    mlp_names = OPEN_CLIP_MLP
    default_pooling = "cls"

    def blocks(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """Resblocks of the *visual* transformer (a whole CLIP model also has a text transformer)."""
        prefix, blocks = super().blocks(visual_of(model))
        return (f"visual.{prefix}" if visual_of(model) is not model else prefix), blocks

    def bind(self, model: nn.Module) -> OpenCLIPAdapter:
        """Read the token layout from the model (``transformer.batch_first``)."""
        super().bind(model)
        self.layout = "batch_first" if is_batch_first(model) else "seq_first"
        return self

    def feature_dim(self, model: nn.Module) -> int | None:
        """The visual tower's output embedding width."""
        width = getattr(visual_of(model), "output_dim", None)
        return int(width) if width is not None else None

    def features(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The visual tower's output embedding ``[B, embed_dim]``."""
        return visual_of(model)(pixel_values_of(batch))

    def __init__(self, *, routing_layer: str | int | None = None, pooling=None, arch: str | None = None) -> None:  # noqa: ANN001
        super().__init__(routing_layer=routing_layer, pooling=pooling)
        self.arch = arch

    def encoder_keys(self, model: nn.Module) -> list[str]:
        """Only the visual tower is merged; a whole CLIP model's text tower is left alone."""
        keys = list(model.state_dict())
        visual = [k for k in keys if k.startswith("visual.")]
        return visual or keys

    def load_model(self, source: str, *, revision: str | None = None, trust_pickle: bool = False) -> nn.Module:
        """Build ``open_clip.create_model(arch)`` and load the weights at ``source``; needs ``open_clip_torch``."""
        if self.arch is None:
            raise MassMergeError(f"{source}: an open_clip checkpoint needs its architecture name (arch: ViT-B-32)")
        model = create_open_clip(self.arch)
        path = resolve_source(source, revision)
        raw = load_state_dict(_weights_file(path), trust_pickle=trust_pickle)
        state = AlignedCheckpoint(raw, self.encoder_keys(model), name=str(path))
        model.load_state_dict(dict(state), strict=False)
        self.bind(model)
        return model.eval()


def create_open_clip(arch: str) -> nn.Module:
    """Build an untrained open_clip model by architecture name (lazy import; clear error when missing)."""
    try:
        import open_clip  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision failing inside it
        raise MassMergeError(
            f"open_clip model '{arch}': `import open_clip` failed ({type(exc).__name__}); "
            "`pip install open_clip_torch` (it needs torchvision), or convert the checkpoint to HF CLIP"
        ) from None
    try:
        return open_clip.create_model(arch, pretrained=None)
    except RuntimeError as exc:
        raise MassMergeError(f"open_clip model '{arch}': unknown architecture ({exc})") from None


def _weights_file(path: Path) -> Path:
    """A checkpoint file inside a directory (open_clip hub repos hold one weights file)."""
    if path.is_file():
        return path
    for name in ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    raise MassMergeError(f"{path}: no open_clip weights file (open_clip_model.safetensors) inside")
