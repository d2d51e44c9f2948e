"""Routing activation -> z: the explicit token layout, the masked mean, content tokens, per-token pooling.

Each rule is checked against a loop written here over a hand-made batch (padding, special tokens, a text made
only of special tokens), in both layouts.
"""

from __future__ import annotations

import pytest
import torch

from massmerge.errors import OptionError
from massmerge.mass.batch import batch_size_of
from massmerge.mass.pooling import (
    TokenPooler,

    content_mask,
    identity_pool,
    masked_mean,
    mean_pool,
    pool_tokens,
    token_pool,
)

CLS, SEP, PAD = 101, 102, 0
SPECIAL = (CLS, SEP, PAD)


def batch() -> dict[str, torch.Tensor]:
    """Three texts: one word, two words with padding, and one made only of special tokens."""
    ids = torch.tensor([[CLS, 7, SEP, PAD, PAD], [CLS, 8, 9, SEP, PAD], [CLS, SEP, PAD, PAD, PAD]])
    return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


def activation(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def loop_mean(tokens: torch.Tensor, keep: list[list[int]]) -> torch.Tensor:
    return torch.stack([tokens[b, positions].mean(0) for b, positions in enumerate(keep)])


def test_masked_mean_is_the_mean_over_kept_positions() -> None:
    tokens, mask = activation(), batch()["attention_mask"]
    assert torch.allclose(masked_mean(tokens, mask), loop_mean(tokens, [[0, 1, 2], [0, 1, 2, 3], [0, 1]]))
    assert torch.allclose(masked_mean(tokens, None), tokens.mean(1))
    empty = masked_mean(tokens, torch.zeros(3, 5))
    assert torch.equal(empty, torch.zeros(3, 4, dtype=torch.float64))  # no division by zero


def test_content_mask_drops_special_and_padding_and_falls_back_for_special_only_texts() -> None:
    mask = content_mask(batch(), SPECIAL)
    assert mask.tolist() == [[0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]


@pytest.mark.parametrize("layout", ["batch_first", "seq_first"])
def test_each_pooling_by_the_explicit_layout(layout: str) -> None:
    tokens = activation(1)
    given = tokens if layout == "batch_first" else tokens.transpose(0, 1)
    b = batch()

    def pool(name: str, **options: object) -> object:
        return pool_tokens(given, b, layout=layout, pooling=name, special_ids=SPECIAL, **options)

    assert torch.equal(pool("cls"), tokens[:, 0])
    assert torch.equal(pool("cls", token_index=2), tokens[:, 2])
    assert torch.allclose(pool("mean"), loop_mean(tokens, [[0, 1, 2], [0, 1, 2, 3], [0, 1]]))
    assert torch.allclose(pool("content"), loop_mean(tokens, [[1], [1, 2], [0, 1]]))
    kept, weights = pool("tokens")
    assert torch.equal(kept, tokens) and weights.tolist() == content_mask(b, SPECIAL).double().tolist()


def test_a_wrong_layout_is_refused_not_guessed() -> None:
    """x[0] of a batch-first activation is the first sample, not the CLS token (design.md section 4)."""
    tokens = torch.randn(3, 5, 4)
    with pytest.raises(OptionError, match="layout is wrong"):
        pool_tokens(tokens, batch(), layout="seq_first", pooling="cls")


def test_bad_poolings_and_shapes_are_one_line_errors() -> None:
    with pytest.raises(OptionError, match="special token ids"):
        pool_tokens(activation(), batch(), layout="batch_first", pooling="content")
    with pytest.raises(OptionError, match="unknown pooling 'max'"):
        pool_tokens(activation(), batch(), layout="batch_first", pooling="max")
    with pytest.raises(OptionError, match=r"\[B, L, D\]"):
        pool_tokens(torch.zeros(3, 5, 4, 2), batch(), layout="batch_first", pooling="mean")
    with pytest.raises(OptionError, match="token_pool"):
        identity_pool(torch.zeros(3, 5, 4), batch())
    flat = torch.randn(3, 4)
    assert pool_tokens(flat, batch(), layout="batch_first", pooling="cls") is flat
    assert identity_pool(flat, batch()) is flat


def test_poolers_keep_their_default_and_take_a_serve_time_override() -> None:
    tokens, b = activation(2), batch()
    mean = mean_pool(special_ids=SPECIAL)
    assert isinstance(mean, TokenPooler) and mean.pooling == "mean"
    assert torch.allclose(mean(tokens, b), pool_tokens(tokens, b, layout="batch_first", pooling="mean"))
    assert torch.allclose(mean(tokens, b, "content"), loop_mean(tokens, [[1], [1, 2], [0, 1]]))
    cls = token_pool(3, batch_first=False)
    assert torch.equal(cls(tokens.transpose(0, 1), b), tokens[:, 3])


def test_batch_size_of_reads_the_first_tensor() -> None:
    assert batch_size_of(torch.zeros(4, 2)) == 4
    assert batch_size_of({"note": "x", "input_ids": torch.zeros(6, 3)}) == 6
    with pytest.raises(OptionError, match="holds no tensor"):
        batch_size_of({"note": "x"})
