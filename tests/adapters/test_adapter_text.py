"""Text encoders (BERT-like and T5): routing layer, mean pooling over the attention mask, key alignment, heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import DEPTH, bert_config, low_rank_deltas, perturbed, save_prefixed, t5_config

from massmerge.adapters import TextEncoderAdapter, adapter_for, detect_family
from massmerge.adapters.base import capture_input
from massmerge.errors import CheckpointError
from massmerge.heads.zoo import linear_head_from_state


def _batch(lengths: list[int], total: int = 9) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 99, (len(lengths), total), generator=gen)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(len(lengths), dtype=torch.long)}


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_mean_pooling_ignores_padding(family: str, tmp_path: Path) -> None:
    from transformers import BertModel, T5EncoderModel

    torch.manual_seed(0)
    model = (BertModel(bert_config()) if family == "bert" else T5EncoderModel(t5_config())).eval()
    model.save_pretrained(str(tmp_path / family))
    adapter = TextEncoderAdapter()
    loaded = adapter.load_model(str(tmp_path / family))
    layer = adapter.routing_layer(loaded)
    expected = "encoder.layer.3.intermediate.dense" if family == "bert" else "encoder.block.3.layer.1.DenseReluDense.wi_0"
    assert layer == expected
    batch = _batch([9, 4, 6])
    with torch.no_grad():
        z = adapter.pool(capture_input(loaded, layer, lambda: adapter.features(loaded, batch)), batch)
        feats = adapter.features(loaded, batch)
        for row, n in ((1, 4), (2, 6)):
            alone = {"input_ids": batch["input_ids"][row:row + 1, :n], "attention_mask": batch["attention_mask"][row:row + 1, :n]}
            act = capture_input(loaded, layer, lambda: adapter.features(loaded, alone))
            torch.testing.assert_close(z[row], act[0].mean(dim=0), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(feats[row], adapter.features(loaded, alone)[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(z[1], capture_input(loaded, layer, lambda: loaded(input_ids=batch["input_ids"]))[1].mean(0), atol=1e-4)


def test_classifier_checkpoint_aligns_and_gives_a_linear_head(tmp_path: Path) -> None:
    """A BertForSequenceClassification expert: `bert.*` keys align to BertModel, classifier becomes the head."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    adapter = TextEncoderAdapter(feature_pooling="pooler")
    base = BertForSequenceClassification(bert_config()).eval()
    base.bert.save_pretrained(str(tmp_path / "base"))
    encoder = adapter.load_model(str(tmp_path / "base"))
    deltas = low_rank_deltas(base, seed=5)
    expert_state = perturbed(base, deltas)
    expert_dir = save_prefixed(expert_state, tmp_path / "expert", "")
    (expert_dir / "config.json").write_text('{"model_type": "bert"}')
    aligned = adapter.load_weights(str(expert_dir), encoder)
    assert set(aligned) == set(encoder.state_dict())
    key = f"encoder.layer.{DEPTH - 1}.intermediate.dense.weight"
    torch.testing.assert_close(aligned[key] - encoder.state_dict()[key], deltas["bert." + key])
    head = linear_head_from_state(expert_state)
    batch = _batch([5, 7])
    with torch.no_grad():
        pooled = base.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        expected = torch.nn.functional.linear(pooled, expert_state["classifier.weight"], expert_state["classifier.bias"])
        torch.testing.assert_close(head(adapter.features(encoder, batch)), expected, atol=1e-5, rtol=1e-5)
    assert detect_family(expert_dir) == "text"


def test_multilayer_classifier_is_refused() -> None:
    state = {"classifier.dense.weight": torch.zeros(4, 4), "classifier.out_proj.weight": torch.zeros(2, 4)}
    with pytest.raises(CheckpointError, match="several layers"):
        linear_head_from_state(state, prefix="score")


def test_auto_detection_of_text_models() -> None:
    from transformers import BertModel

    assert adapter_for(BertModel(bert_config())).name == "text"


def test_default_router_uses_every_linear_layer_before_the_routing_layer() -> None:
    from massmerge.adapters import get_adapter
    from tiny_models import bert_config
    from transformers import BertModel

    model = BertModel(bert_config())
    adapter = get_adapter("text", special_ids=[0, 1]).bind(model)
    router = adapter.default_router(model)
    layers = router["routing_layers"]
    assert layers[-1] == adapter.routing_layer(model) == "encoder.layer.3.intermediate.dense"
    assert layers[:6] == tuple(f"encoder.layer.0.{n}" for n in ("attention.self.query", "attention.self.key",
                                                                "attention.self.value", "attention.output.dense",
                                                                "intermediate.dense", "output.dense"))
    assert "encoder.layer.3.output.dense" not in layers  # runs after the routing layer: the pass has stopped
    assert (router["pooling"], router["layer_combine"]) == ("content", "ppca")
    assert get_adapter("text").pooling == "mean"  # content pooling needs the tokenizer's special ids
    earlier = adapter.default_router(model, "encoder.layer.1.intermediate.dense")["routing_layers"]
    assert earlier[-1] == "encoder.layer.1.intermediate.dense" and earlier == layers[:len(earlier)]


def test_vision_keeps_the_papers_router_by_default() -> None:
    """No image experts exist offline to ablate on, so vision families keep the paper's rule as default."""
    from transformers import CLIPVisionModel

    from massmerge.adapters import get_adapter
    from tiny_models import clip_vision_config

    model = CLIPVisionModel(clip_vision_config())
    adapter = get_adapter("clip").bind(model)
    router = adapter.default_router(model)
    assert router == {"routing_layers": (adapter.routing_layer(model),), "pooling": "cls",
                      "layer_combine": "standardized"}
    other = "vision_model.encoder.layers.0.mlp.fc1"
    assert adapter.default_router(model, other)["routing_layers"] == (other,)  # one layer, wherever it exits


def test_t5_checkpoints_saved_by_transformers_align_with_the_tied_embedding_once(tmp_path: Path) -> None:
    """``save_pretrained`` writes T5's tied embedding once (``shared.weight``); the encoder keys name it once,
    so an expert's file aligns and its embedding delta is read from that one tensor."""
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    base = T5EncoderModel(t5_config()).eval()
    base.save_pretrained(str(tmp_path / "base"))
    expert = T5EncoderModel(t5_config()).eval()
    expert.load_state_dict(base.state_dict())
    with torch.no_grad():
        expert.shared.weight.add_(0.1)
    expert.save_pretrained(str(tmp_path / "expert"))
    adapter = TextEncoderAdapter()
    model = adapter.load_model(str(tmp_path / "base"))
    keys = adapter.encoder_keys(model)
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys
    assert len(keys) == len(set(id(v) for v in model.state_dict(keep_vars=True).values()))
    aligned = adapter.load_weights(str(tmp_path / "expert"), model)
    torch.testing.assert_close(aligned["shared.weight"] - model.shared.weight.detach(),
                               torch.full_like(model.shared.weight, 0.1))
