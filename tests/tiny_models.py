"""Helpers for the adapter tests: tiny random models of each family, saved in their real on-disk formats, and known low-rank perturbations.

Nothing is fine-tuned or downloaded: an "expert" is the base plus a known rank-2 delta on every matrix, so
every loaded task vector can be checked exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

logging.getLogger("transformers").setLevel(logging.ERROR)

HIDDEN = 32
DEPTH = 4


def clip_vision_config(depth: int = DEPTH):  # noqa: ANN201
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=16)


def clip_config():  # noqa: ANN201
    from transformers import CLIPConfig

    text = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPConfig(text_config=text, vision_config=clip_vision_config().to_dict(), projection_dim=16)


def bert_config():  # noqa: ANN201
    from transformers import BertConfig

    return BertConfig(vocab_size=99, hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def t5_config():  # noqa: ANN201
    from transformers import T5Config

    return T5Config(vocab_size=99, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=DEPTH, num_heads=4,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0)


def low_rank_deltas(model: nn.Module, seed: int, rank: int = 2, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A known rank-``rank`` delta for every matrix and a small delta for every other float parameter."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        if value.ndim == 2:
            m, n = value.shape
            deltas[key] = scale * torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen) / rank
        else:
            deltas[key] = 0.01 * torch.randn(value.shape, generator=gen)
    return deltas


def perturbed(model: nn.Module, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: (v + deltas[k]).contiguous() if k in deltas else v.clone() for k, v in state.items()}


def save_prefixed(state: dict[str, torch.Tensor], path: Path, prefix: str) -> Path:
    """Save a state dict as safetensors with every key prefixed (e.g. the transformers-4 'vision_model.')."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path




def save_clip_vision(tmp_path: Path, depth: int = DEPTH, seed: int = 0) -> tuple[nn.Module, Path]:
    """Build, save (save_pretrained, safetensors) and return a tiny CLIPVisionModel and its directory."""
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(clip_vision_config(depth)).eval()
    path = tmp_path / f"clip_vision_{depth}_{seed}"
    model.save_pretrained(str(path))
    return model, path


# ----- a tiny BERT zoo on disk: base (word-level tokenizer), 3 perturbed experts and their heads files -------

TINY_BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)] + ["spam", "cat", "mat"]


def write_tiny_bert_zoo(root: Path) -> Path:
    """``root/base`` (a tiny BERT with a word-level tokenizer), ``root/expert{0,1,2}`` and ``root/head{0,1,2}
    .safetensors`` (tasks t0..t2: a linear head, then zero-shot heads of 4 and 5 classes); returns ``root``."""
    import transformers

    from massmerge.heads import LinearHead, ZeroShotHead
    from massmerge.heads.files import write_head_file

    config = transformers.BertConfig(vocab_size=len(TINY_BERT_WORDS), hidden_size=16, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.BertModel(config).eval()
    base.save_pretrained(root / "base")
    (root / "base" / "vocab.txt").write_text("\n".join(TINY_BERT_WORDS) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(root / "base" / "vocab.txt")).save_pretrained(root / "base")
    for t in range(3):
        expert = transformers.BertModel(config)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn_like(p))
        expert.save_pretrained(root / f"expert{t}")
        head = ZeroShotHead(torch.randn(3 + t, 16), 30.0) if t else LinearHead(torch.randn(3, 16), torch.zeros(3))
        write_head_file(root / f"head{t}.safetensors", head, task=f"t{t}", class_names=[f"c{t}{i}" for i in range(3 + t)])
    return root


def build_tiny_text_artifact(root: Path) -> Path:
    """``massmerge build`` of :func:`write_tiny_bert_zoo`'s experts and heads into ``root/art``."""
    from massmerge.cli import main

    write_tiny_bert_zoo(root)
    main(["build", "--base", str(root / "base"), "--experts", *[str(root / f"expert{t}") for t in range(3)],
          "--heads", *[str(root / f"head{t}.safetensors") for t in range(3)], "--output", str(root / "art")])
    return root / "art"


def build_tiny_clip_artifact(root: Path) -> Path:
    """``massmerge build`` of a tiny CLIP vision tower, 3 low-rank experts (``vision_model.*`` keys) and zero-shot
    heads of 2, 3 and 4 classes (tasks task0..task2) into ``root/art``."""
    from massmerge.cli import main
    from massmerge.heads import ZeroShotHead
    from massmerge.heads.files import write_head_file

    model, base_dir = save_clip_vision(root)
    experts, heads = [], []
    for t in range(3):
        experts.append(str(save_prefixed(perturbed(model, low_rank_deltas(model, seed=t + 1)), root / f"e{t}",
                                         "vision_model.")))
        head = ZeroShotHead(torch.randn(2 + t, HIDDEN, generator=torch.Generator().manual_seed(t)), 30.0)
        write_head_file(root / f"h{t}.safetensors", head, task=f"task{t}", class_names=[f"c{t}_{i}" for i in range(2 + t)])
        heads.append(str(root / f"h{t}.safetensors"))
    main(["build", "--base", str(base_dir), "--experts", *experts, "--heads", *heads, "--output", str(root / "art")])
    return root / "art"
