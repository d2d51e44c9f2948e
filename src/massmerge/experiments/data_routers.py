"""Routers that use data: the paper's router ablation and the identifiability ceiling (issue 22).

MASS routes without data. To tell how much of its loss with the task hidden *any* router could recover, the
suite also trains routers on the validation split and applies them to the test split. Each needs the val
inputs with their task ids (never their class labels) and is labelled so in the report:

- ``kNN``: cosine similarity to the stored val embeddings, majority vote of the k nearest (ties go to the
  nearest). Stores N_val x d numbers. k is chosen by leave-one-out accuracy on val from :data:`KNN_GRID`.
- ``logistic``: multinomial logistic regression on standardized features, full-batch L-BFGS; its L2 strength
  chosen by :data:`FOLDS`-fold cross-validation on val from :data:`L2_GRID`.
- ``MLP``: one hidden layer of :data:`MLP_WIDTH` GELU units, trained with AdamW; its weight decay chosen by
  cross-validation from :data:`DECAY_GRID`.

Settings are chosen on val only (cross-validated), never on test. The **identifiability ceiling** is the
(router, feature set) pair with the best cross-validated val accuracy, reported on test: the best task
classifier we can train with labels on any feature we have.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

#: Neighbour counts the kNN router chooses from (leave-one-out on val).
KNN_GRID = (1, 3, 5, 9, 15, 25)
#: L2 strengths the logistic router chooses from by cross-validation on val.
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
#: Weight decays the MLP router chooses from (fewer: each is FOLDS + 1 full trainings).
DECAY_GRID = (1e-4, 1e-2)
FOLDS = 5
MLP_WIDTH = 128
MLP_STEPS = 200
LBFGS_STEPS = 100

Predictor = Callable[[torch.Tensor], torch.Tensor]  # features [N, d] -> task ids [N]
Fit = Callable[[torch.Tensor, torch.Tensor, int, float], Predictor]  # (x, y, classes, setting) -> predictor


@dataclass(frozen=True)
class TrainedRouter:
    """A data router fitted on all of val with the setting cross-validation chose."""

    classifier: str
    setting: float
    val_accuracy: float  # cross-validated (kNN: leave-one-out) top-1 task accuracy on val
    predict: Predictor


# ----- classifiers ---------------------------------------------------------------------------------------------


def _standardizer(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    return lambda z: (z - mean) / std


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> Predictor:
    """Multinomial logistic regression (mean cross-entropy + ``l2`` * ||W||^2), L-BFGS on standardized x."""
    scale = _standardizer(x)
    xs = scale(x.double())
    weight = torch.zeros(xs.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=LBFGS_STEPS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = weight.detach(), bias.detach()
    return lambda z: (scale(z.double()) @ w + b).argmax(-1)


def fit_mlp(x: torch.Tensor, y: torch.Tensor, classes: int, decay: float, seed: int = 0) -> Predictor:
    """One hidden layer of :data:`MLP_WIDTH` GELU units, Adam (lr 1e-3, weight decay ``decay``), full batch."""
    scale = _standardizer(x)
    xs = scale(x.float())
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(xs.shape[1], MLP_WIDTH), torch.nn.GELU(),
                              torch.nn.Linear(MLP_WIDTH, classes))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[-1] ** -0.5 if p.ndim == 2 else 0.0))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=decay)
    with torch.enable_grad():
        for _ in range(MLP_STEPS):
            opt.zero_grad()
            F.cross_entropy(net(xs), y).backward()
            opt.step()
    net.eval()

    def predict(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(scale(z.float())).argmax(-1)

    return predict


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, k: int, classes: int,
                *, leave_one_out: bool = False) -> torch.Tensor:
    """Majority task of the ``k`` most cosine-similar stored embeddings (ties: the nearest's task).
    ``leave_one_out``: ``x`` is ``train_x`` and each row's own entry is left out."""
    sims = F.normalize(x.double(), dim=1) @ F.normalize(train_x.double(), dim=1).T
    if leave_one_out:
        sims.fill_diagonal_(-float("inf"))
    k = min(k, train_x.shape[0] - int(leave_one_out))
    top = sims.topk(k, dim=1)
    votes = F.one_hot(train_y[top.indices], classes).double().sum(1)
    votes += 1e-3 * F.one_hot(train_y[top.indices[:, 0]], classes)  # tie-break: the nearest neighbour
    return votes.argmax(-1)


# ----- choosing settings on val --------------------------------------------------------------------------------


def folds(n: int, count: int = FOLDS, seed: int = 0) -> list[torch.Tensor]:
    """``count`` disjoint index sets covering range(n), from a seeded permutation."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [order[i::count] for i in range(count)]


def cross_validated(fit: Fit, x: torch.Tensor, y: torch.Tensor, classes: int, setting: float) -> float:
    """Top-1 accuracy of ``fit(setting)`` over :data:`FOLDS` folds of (x, y), each held out once."""
    correct = 0
    for held in folds(len(y)):
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[held] = False
        predict = fit(x[keep], y[keep], classes, setting)
        correct += int((predict(x[held]) == y[held]).sum())
    return correct / len(y)


def train_router(classifier: str, x: torch.Tensor, y: torch.Tensor, classes: int) -> TrainedRouter:
    """The ``classifier`` (kNN, logistic, MLP) with its setting chosen on (x, y), refitted on all of it."""
    if classifier == "kNN":
        scores = {k: float((knn_predict(x, y, x, k, classes, leave_one_out=True) == y).float().mean())
                  for k in KNN_GRID}
        k = max(scores, key=lambda key: (scores[key], -key))  # ties: the smaller k
        return TrainedRouter("kNN", float(k), scores[k], lambda z: knn_predict(x, y, z, k, classes))
    fit: Fit = {"logistic": fit_logistic, "MLP": fit_mlp}[classifier]
    scores = {s: cross_validated(fit, x, y, classes, s) for s in (L2_GRID if classifier == "logistic" else DECAY_GRID)}
    best = max(scores, key=lambda key: (scores[key], key))  # ties: the stronger regularizer
    return TrainedRouter(classifier, best, scores[best], fit(x, y, classes, best))


CLASSIFIERS = ("kNN", "logistic", "MLP")


def settings() -> dict[str, object]:
    """Every constant that shapes a trained router (a cache key of the router study)."""
    return {"knn": KNN_GRID, "l2": L2_GRID, "decay": DECAY_GRID, "folds": FOLDS, "mlp": [MLP_WIDTH, MLP_STEPS],
            "lbfgs": LBFGS_STEPS, "classifiers": CLASSIFIERS}


def data_needed(classifier: str) -> str:
    """What a router needs beyond the experts, in the report's words."""
    if classifier == "kNN":
        return "val inputs with task ids, stored as embeddings"
    return "val inputs with task ids, to train on"


def router_predictions(features: Mapping[str, Mapping[str, torch.Tensor]], val_tasks: torch.Tensor,
                       classes: int, classifiers: Sequence[str] = CLASSIFIERS) -> list[dict[str, object]]:
    """Every (classifier, feature set): its chosen setting, cross-validated val accuracy and test task choices.

    ``features``: feature set name -> {"val": [N_val, d], "test": [N_test, d]}; ``val_tasks``: each val input's
    task id. The ceiling is the entry with the highest val accuracy (:func:`ceiling_of`).
    """
    out: list[dict[str, object]] = []
    for name, split in features.items():
        for classifier in classifiers:
            trained = train_router(classifier, split["val"], val_tasks, classes)
            out.append({"classifier": classifier, "features": name, "setting": trained.setting,
                        "val_accuracy": trained.val_accuracy, "data": data_needed(classifier),
                        "test_tasks": trained.predict(split["test"]).tolist()})
    return out


def ceiling_of(rows: Sequence[Mapping[str, object]]) -> int:
    """Index of the row with the best cross-validated val accuracy (ties: the first): chosen on val only."""
    return max(range(len(rows)), key=lambda i: (float(rows[i]["val_accuracy"]), -i))  # type: ignore[arg-type]


__all__ = ["CLASSIFIERS", "DECAY_GRID", "KNN_GRID", "L2_GRID", "TrainedRouter", "ceiling_of", "cross_validated", "data_needed",
           "fit_logistic", "fit_mlp", "folds", "knn_predict", "router_predictions", "settings", "train_router"]
