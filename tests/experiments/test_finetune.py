"""Expert fine-tuning on a tiny BERT: it learns, it is cached by every setting, and it resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from massmerge.experiments import finetune as ft
from massmerge.data.tasks import Split, TaskData
from massmerge.heads import ZeroShotHead


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ft.Backbone:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(ft.backbone_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    model = BertModel(config, add_pooling_layer=False).eval()
    path = tmp_path_factory.mktemp("tiny")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return ft.Backbone(model, tokenizer, path)


def _task(name: str = "toy") -> TaskData:
    texts = [f"apple banana fruit {i}" for i in range(20)] + [f"car truck engine {i}" for i in range(20)]
    labels = [0] * 20 + [1] * 20
    return TaskData(name, ["fruit", "vehicle"], ("a {}.",), Split(texts, labels), Split(texts[:4], labels[:4]),
                    Split([], []))  # fmt: skip


def _head(tiny: ft.Backbone, task: TaskData) -> ZeroShotHead:
    return ZeroShotHead(ft.class_embeddings(tiny, task.classes, task.templates), 20.0)


CONFIG = ft.FinetuneConfig(steps=6, batch_size=8, lr=1e-3, max_length=16)


def test_expert_is_cached_and_base_untouched(tiny: ft.Backbone, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    task = _task()
    first = ft.finetune_expert(tiny, _head(tiny, task), task, CONFIG, tmp_path)
    assert first.path.exists() and first.meta["resumed_from_step"] == 0
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    mtime = first.path.stat().st_mtime_ns
    again = ft.finetune_expert(tiny, _head(tiny, task), task, CONFIG, tmp_path)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    changed = any(not torch.equal(before[k], v) for k, v in first.state_dict().items())
    assert changed


def test_key_covers_every_setting(tiny: ft.Backbone) -> None:
    task = _task()
    key = ft.expert_key(task, CONFIG, tiny.path)
    assert key != ft.expert_key(task, CONFIG.model_copy(update={"lr": 2e-3}), tiny.path)
    assert key != ft.expert_key(task, CONFIG.model_copy(update={"seed": 1}), tiny.path)
    assert key != ft.expert_key(_task("other"), CONFIG, tiny.path)
    relabelled = TaskData("toy", ["fruit", "car"], task.templates, task.train, task.val, task.test)
    assert key != ft.expert_key(relabelled, CONFIG, tiny.path)


def test_training_lowers_the_loss(tiny: ft.Backbone, tmp_path: Path) -> None:
    task = _task()
    config = CONFIG.model_copy(update={"steps": 30})
    result = ft.finetune_expert(tiny, _head(tiny, task), task, config, tmp_path)
    assert result.meta["final_loss"] < 0.3 and result.meta["val_accuracy"] == 1.0


def test_interrupted_training_resumes_to_the_same_weights(tiny: ft.Backbone, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    task = _task()
    clean = ft.finetune_expert(tiny, _head(tiny, task), task, CONFIG, tmp_path / "clean", checkpoint_every=2)
    original = ft._Trainer.train_step

    def crash_at_5(self: ft._Trainer) -> float:
        if self.step == 5:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(ft._Trainer, "train_step", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune_expert(tiny, _head(tiny, task), task, CONFIG, tmp_path / "resumed", checkpoint_every=2)
    monkeypatch.setattr(ft._Trainer, "train_step", original)
    resumed = ft.finetune_expert(tiny, _head(tiny, task), task, CONFIG, tmp_path / "resumed", checkpoint_every=2)
    assert resumed.meta["resumed_from_step"] == 4
    a, b = clean.state_dict(), resumed.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_features_average_over_non_padding_tokens() -> None:
    from massmerge.mass.pooling import masked_mean

    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    assert masked_mean(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 2.0]]


def test_expert_key_object_keeps_the_digest_of_the_hand_built_key(tiny: ft.Backbone) -> None:
    """Experts cached before keys became objects are reused: the digest is the old hand-built one."""
    import hashlib
    import json

    task = _task()
    for device, suffix in ((None, {}), (torch.device("cuda"), {"device": "cuda"})):
        legacy = {"backbone": ft.fingerprint(tiny.path), "task": task.name, "classes": task.classes,
                  "templates": list(task.templates),
                  "train": hashlib.sha256(json.dumps([task.train.texts, task.train.labels]).encode()).hexdigest(),
                  "config": CONFIG.model_dump(), **suffix}
        expected = hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:20]
        assert ft.expert_key(task, CONFIG, tiny.path, device) == expected
