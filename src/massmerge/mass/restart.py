"""Beyond two passes: the second pass restarts at block j from the first pass's hidden states.

The first pass runs ``theta_0 + alpha * TSV-M(all)`` up to the routing layer in block l; the second pass runs
``theta_0 + alpha * TSV-M(S)`` from the embeddings. With ``restart_block = j`` (``0 < j <= l``) the second pass
takes the first pass's output of block ``j - 1`` (the input of block j) and runs only blocks ``j..L-1`` with the
set's weights: every block before j returns that output instead of computing (:class:`~massmerge.mass.routed.
RoutedBlock`), so the second pass costs ``(L - j) / L`` of a forward plus the embeddings, and the whole call
about ``(l + L - j) / L`` forwards. ``j = 0`` is the two-pass rule exactly (nothing is recorded or skipped).

What changes: blocks ``0..j-1`` see the first pass's weights (all tasks merged) instead of the set's. What
stays: everything from block j on, the heads, the routing (the router reads the first pass either way).

Serving regroups a window's inputs by task set between the passes, so the hidden states are kept per sample
(:func:`split_rows`: the rows at the non-padding positions of its first-pass batch) and laid out again in the
second-pass batch (:func:`join_rows`: at the non-padding positions of the new batch, zeros at padding, which
attention masks out). Memory: the hidden states of one routing window (at most ``window_batches(T)`` batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from massmerge.errors import OptionError
from massmerge.mass.batch import attention_mask_of


@dataclass(frozen=True)
class RestartState:
    """What a second pass restarting at ``block`` returns from the blocks before it, for its rows."""

    block: int
    hidden: torch.Tensor  # [B, L, D]: the first pass's output of block - 1, rows in the pass's order
    length: int | None  # None: the blocks return a bare tensor; n: a tuple of n items, the hidden first

    def output(self) -> Any:
        return self.hidden if self.length is None else (self.hidden, *([None] * (self.length - 1)))

    def rows(self, index: torch.Tensor | slice) -> RestartState:
        """The state of a subset of the rows (one task set's group)."""
        return RestartState(self.block, self.hidden[index], self.length)


def block_hidden(output: Any) -> tuple[torch.Tensor, int | None]:
    """(hidden states, tuple length or None) of a block's output: a tensor, or a tuple whose first item is the
    hidden states and whose other items are empty (None)."""
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) \
            and all(item is None for item in output[1:]):
        return output[0], len(output)
    raise OptionError("restart_block: a block returns more than its hidden states (e.g. attention weights); "
                      "use restart_block 0 for this model")


def split_rows(hidden: torch.Tensor, batch: Any) -> list[torch.Tensor]:
    """Each sample's hidden states at its non-padding positions ([n_i, D]; every position without a mask)."""
    if hidden.ndim != 3:
        raise OptionError(f"restart_block: block outputs of shape {list(hidden.shape)} are not [batch, tokens, "
                          "width] (a sequence-first model cannot restart; use restart_block 0)")
    mask = attention_mask_of(batch, hidden.shape[:2])
    return [hidden[b] if mask is None else hidden[b][mask[b]] for b in range(hidden.shape[0])]


def join_rows(rows: Sequence[torch.Tensor], batch: Any, tokens: int) -> torch.Tensor:
    """The samples' hidden states laid out for a batch of ``tokens`` positions: at its non-padding positions,
    zeros elsewhere."""
    width = rows[0].shape[-1]
    hidden = rows[0].new_zeros(len(rows), tokens, width)
    mask = attention_mask_of(batch, hidden.shape[:2])
    for b, row in enumerate(rows):
        if mask is None:
            if row.shape[0] != tokens:
                raise OptionError(f"restart_block: a sample has {row.shape[0]} positions, the batch {tokens}")
            hidden[b] = row
        else:
            if int(mask[b].sum()) != row.shape[0]:
                raise OptionError("restart_block: an input was tokenized differently in the two passes")
            hidden[b, mask[b]] = row
    return hidden


__all__ = ["RestartState", "block_hidden", "join_rows", "split_rows"]
