"""What the engine answers: a batch's predictions (:class:`MASSOutput`) and the router's view (:class:`Routing`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MASSOutput:
    """Predictions for a batch: the chosen task and class, and how the router saw each sample."""

    task: torch.Tensor  # [B] long, index into task_names
    label: torch.Tensor  # [B] long, class index in that task's label space
    probs: torch.Tensor  # [B, T] router probabilities (one-hot when the task is given)
    selected: torch.Tensor  # [B, T] bool, the task set S of each sample
    residuals: dict[str, torch.Tensor] | None  # routing layer -> [B, T] residuals (None when the task is given)
    features: torch.Tensor | None = None  # [B, d] second-pass features (when asked for)


@dataclass
class Routing:
    """The router's view of a batch (and, with ``restart_block``, each sample's first-pass hidden states at the
    restart block, for its second pass: :mod:`massmerge.mass.restart`)."""

    residuals: dict[str, torch.Tensor]
    probs: torch.Tensor
    selected: torch.Tensor
    restart: list[torch.Tensor] | None = None

    @classmethod
    def cat(cls, parts: list[Routing]) -> Routing:
        """The routing of consecutive batches as one (their restart states are not kept)."""
        return cls({layer: torch.cat([p.residuals[layer] for p in parts]) for layer in parts[0].residuals},
                   torch.cat([p.probs for p in parts]), torch.cat([p.selected for p in parts]))

    def rows(self, index: torch.Tensor) -> Routing:
        """The routing of samples ``index`` (in that order)."""
        restart = None if self.restart is None else [self.restart[int(i)] for i in index.tolist()]
        return Routing({layer: r[index] for layer, r in self.residuals.items()}, self.probs[index],
                       self.selected[index], restart)


@dataclass
class Generated:
    """Routed generation of a batch of prompts: HF's output of ``generate()`` (token ids ``[B * n, L]``, ``n``
    sequences per prompt; or HF's dict output when asked for) and the router's view of the prompts."""

    sequences: object  # torch.Tensor, or HF's ModelOutput with return_dict_in_generate
    routing: Routing


__all__ = ["Generated", "MASSOutput", "Routing"]
