"""The model half of the offline hub replica: the real repos' layouts in miniature.

- :func:`write_openai_base`: a tiny ``CLIPModel`` laid out as ``openai/clip-vit-base-patch32`` and ``-patch16``
  are on the hub's main branch: the weights ONLY as ``pytorch_model.bin`` (a torch zip pickle of the
  transformers-4 state dict, ``*.embeddings.position_ids`` buffers included, as the 2021 upload holds them),
  ``config.json`` (``CLIPModel``), ``preprocessor_config.json`` in the transformers-4 spelling (sizes as ints,
  ``CLIPFeatureExtractor``) and the tokenizer files ``vocab.json``, ``merges.txt``, ``tokenizer.json``,
  ``tokenizer_config.json``, ``special_tokens_map.json``; TF and Flax weights beside them as junk bytes, which
  nothing may open (the file names checked against public scripts that download the repo file by file, since the
  hub itself cannot be reached here: config, pytorch_model.bin, preprocessor_config and the five tokenizer files,
  special_tokens_map.json 389 bytes). The projection is 24 wide, the vision tower 32 (ViT-B/32: 512 and 768). With
  ``safetensors=True`` it is the ViT-L/14 layout instead: ``model.safetensors`` too, beside a ``pytorch_model.bin``
  of junk bytes, so a test fails if the pickle is opened.
- :func:`write_fusionbench_expert`: a vision-only expert as ``tanganke/clip-vit-base-patch32_<task>`` is (what
  FusionBench's ``CLIPVisionModelPool.save_model`` writes: ``CLIPVisionModel.save_pretrained`` under
  transformers 4): ``config.json`` (``CLIPVisionModel``, ``clip_vision_model``) and a float32
  ``model.safetensors`` with ``vision_model.*`` keys.
- :func:`write_vision_only_base`: a ``CLIPVisionModel`` base with no projection (the bad input).

Put them in a local HF cache with :func:`hub_fixtures.cache_repo`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny_models import low_rank_deltas
from torch import nn

VISION_WIDTH = 32
PROJECTION_DIM = 24  # != VISION_WIDTH, as 512 != 768 for ViT-B/32
IMAGE_SIZE = 32
TEXT_POSITIONS = 77
JUNK = b"not a weights file: opening it is a test failure\n"

#: openai/clip-vit-base-patch32's preprocessor_config.json, at the tiny model's image size
PREPROCESSOR = {
    "crop_size": IMAGE_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": IMAGE_SIZE,
}
SPECIAL_TOKENS = {
    "bos_token": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                  "single_word": False},
    "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                  "single_word": False},
    "pad_token": "<|endoftext|>",
    "unk_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                  "single_word": False},
}


def tiny_clip_config():  # noqa: ANN201
    """A CLIPConfig small enough for CI whose projection differs from the vision width."""
    from transformers import CLIPConfig

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=len(_vocab()), max_position_embeddings=TEXT_POSITIONS, bos_token_id=512,
                eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=VISION_WIDTH, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=8, projection_dim=PROJECTION_DIM)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION_DIM)
    config.architectures = ["CLIPModel"]
    return config


def tiny_clip_model(seed: int = 0) -> nn.Module:
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config()).eval()


def transformers4_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as transformers 4 saved CLIP in 2021: the position-id buffers included."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    positions = {"text_model": TEXT_POSITIONS, "vision_model": (IMAGE_SIZE // 8) ** 2 + 1}
    for tower, count in positions.items():
        state[f"{tower}.embeddings.position_ids"] = torch.arange(count).unsqueeze(0)
    return state


def write_openai_base(folder: Path, *, seed: int = 0, safetensors: bool = False) -> tuple[nn.Module, Path]:
    """A tiny CLIPModel in the openai repos' layout (see the module docstring); returns (model, folder)."""
    model = tiny_clip_model(seed)
    folder.mkdir(parents=True, exist_ok=True)
    state = transformers4_state(model)
    if safetensors:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        (folder / "pytorch_model.bin").write_bytes(JUNK)
    else:
        torch.save(state, folder / "pytorch_model.bin")
    model.config.to_json_file(str(folder / "config.json"))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    write_clip_tokenizer(folder)
    for junk in ("tf_model.h5", "flax_model.msgpack"):
        (folder / junk).write_bytes(JUNK)
    return model, folder


def write_clip_tokenizer(folder: Path) -> None:
    """CLIP's byte-level BPE over single bytes (no merges): the openai repos' five tokenizer files."""
    from transformers import CLIPTokenizer

    vocab = _vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_POSITIONS)
    tokenizer.save_pretrained(str(folder))  # tokenizer.json, tokenizer_config.json
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2))


def _vocab() -> dict[str, int]:
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def vision_config_json(model: nn.Module) -> dict:
    """The config.json FusionBench's experts hold: the base's vision config as a ``CLIPVisionModel``."""
    config = model.config.vision_config.to_dict()
    config.update(architectures=["CLIPVisionModel"], model_type="clip_vision_model", torch_dtype="float32")
    return config


def write_fusionbench_expert(folder: Path, base: nn.Module, *, seed: int) -> Path:
    """A vision-only expert of ``base`` (base + a known low-rank delta on the vision tower), FusionBench's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    vision = {k: v for k, v in base.state_dict().items() if k.startswith("vision_model.")}
    deltas = low_rank_deltas(_Holder(vision), seed=seed)
    expert = {k: (v + deltas[k]).float().contiguous() if k in deltas else v.clone() for k, v in vision.items()}
    save_file(expert, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(vision_config_json(base), indent=2))
    return folder


def write_vision_only_base(folder: Path, base: nn.Module) -> Path:
    """A ``CLIPVisionModel`` base (no ``visual_projection``): its features are the vision width."""
    folder.mkdir(parents=True, exist_ok=True)
    vision = {k: v.contiguous() for k, v in base.state_dict().items() if k.startswith("vision_model.")}
    save_file(vision, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(vision_config_json(base), indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return folder


class _Holder(nn.Module):
    """A state dict dressed as a module, for :func:`tiny_models.low_rank_deltas`."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return self._state
