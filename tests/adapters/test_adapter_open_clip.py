"""open_clip adapter on a hand-built module with open_clip's layout (open_clip itself needs torchvision).

The module mirrors ``open_clip.transformer.VisionTransformer``: conv1 patches, class_embedding,
positional_embedding, ln_pre, ``transformer.resblocks[i]`` with ``attn`` / ``ln_1`` / ``mlp.c_fc`` / ``mlp.c_proj``
/ ``ln_2``, ln_post on the class token, and ``proj``. ``batch_first`` switches between the old sequence-first
layout (no attribute at all, as in open_clip < 2.24) and the new batch-first one.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from massmerge.adapters import OpenCLIPAdapter, adapter_for, detect_family
from massmerge.adapters.base import capture_input
from massmerge.adapters.weights import AlignedCheckpoint, open_weights
from massmerge.adapters.open_clip import create_open_clip
from massmerge.errors import MassMergeError

WIDTH, PATCH, IMAGE = 32, 8, 32
TOKENS = 1 + (IMAGE // PATCH) ** 2  # 17


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, batch_first: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=batch_first)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, batch_first: bool | None) -> None:
        super().__init__()
        if batch_first is not None:  # old open_clip had no attribute and always ran [L, B, D]
            self.batch_first = batch_first
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, bool(batch_first)) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, layers: int = 4, batch_first: bool | None = None, output_dim: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn(TOKENS, WIDTH) * 0.1)
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = Transformer(WIDTH, layers, batch_first)
        self.ln_post = nn.LayerNorm(WIDTH)
        self.proj = nn.Parameter(torch.randn(WIDTH, output_dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        if not getattr(self.transformer, "batch_first", False):
            x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        if not getattr(self.transformer, "batch_first", False):
            x = x.permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    """Whole-model wrapper: open_clip's ``CLIP`` holds the image tower as ``visual``."""

    def __init__(self, batch_first: bool | None) -> None:
        super().__init__()
        self.visual = VisionTransformer(batch_first=batch_first)
        self.token_embedding = nn.Embedding(10, WIDTH)  # stands for the text tower


@pytest.mark.parametrize("batch_first", [None, False, True])
def test_layout_detection_and_cls_per_sample(batch_first: bool | None) -> None:
    torch.manual_seed(0)
    model = CLIP(batch_first).eval()
    adapter = adapter_for(model)
    assert isinstance(adapter, OpenCLIPAdapter)
    assert adapter.layout == ("batch_first" if batch_first else "seq_first")
    layer = adapter.routing_layer(model)
    assert layer == "visual.transformer.resblocks.3.mlp.c_fc"
    images = torch.randn(TOKENS, 3, IMAGE, IMAGE)  # B == L: a wrong token axis keeps the shape
    with torch.no_grad():
        activation = capture_input(model, layer, lambda: adapter.features(model, images))
        z = adapter.pool(activation, images)
        for i in (0, 7):
            alone = capture_input(model, layer, lambda: adapter.features(model, images[i:i + 1]))
            torch.testing.assert_close(z[i], adapter.pool(alone, images[i:i + 1])[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(z[i], alone.reshape(-1, WIDTH)[0], atol=1e-5, rtol=1e-5)  # token 0, sample i
        wrong = OpenCLIPAdapter()
        wrong.layout = "seq_first" if adapter.layout == "batch_first" else "batch_first"
        assert not torch.allclose(wrong.pool(activation, images), z, atol=1e-3)


def test_bare_visual_tower_and_task_vectors_checkpoint_names(tmp_path: Path) -> None:
    """A checkpoint saved as the task-vectors ImageEncoder (`model.visual.*`) aligns to the tower's keys."""
    torch.manual_seed(0)
    tower = VisionTransformer(batch_first=True).eval()
    adapter = adapter_for(tower, family="open_clip")
    assert adapter.routing_layer(tower) == "transformer.resblocks.3.mlp.c_fc"
    file = tmp_path / "expert.safetensors"
    save_file({f"model.visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}, str(file))
    aligned = AlignedCheckpoint(open_weights(file), adapter.encoder_keys(tower), name=str(file))
    assert set(aligned) == set(tower.state_dict())
    torch.testing.assert_close(aligned["proj"], tower.state_dict()["proj"])
    assert detect_family(file) == "open_clip"


def test_pickle_checkpoint_needs_trust(tmp_path: Path) -> None:
    file = tmp_path / "expert.pt"
    torch.save(VisionTransformer().state_dict(), file)
    with pytest.raises(MassMergeError, match="trust-pickle"):
        open_weights(file)
    assert "proj" in open_weights(file, trust_pickle=True)


def test_building_by_name_without_open_clip_is_a_clear_error() -> None:
    try:
        import open_clip  # noqa: F401
    except Exception:  # noqa: BLE001
        with pytest.raises(MassMergeError, match="pip install open_clip_torch"):
            create_open_clip("ViT-B-32")
    else:  # pragma: no cover - open_clip present
        pytest.skip("open_clip is installed here")
