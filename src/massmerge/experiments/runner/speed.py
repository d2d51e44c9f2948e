"""Throughput: the served MASS model and other forwards against a plain forward, on the same mixed inputs."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from massmerge.device import sync, to_device
from massmerge.experiments import metrics as ev
from massmerge.experiments.pool import TaskPool
from massmerge.experiments.runner.static import placement
from massmerge.mass.model import MASSModel
from massmerge.mass.serving import first_pass_batches, serve


def mixed_inputs(pool: TaskPool, count: int, batch_size: int) -> tuple[list[Any], list[list[int]]]:
    """``count`` test inputs of mixed tasks in a seeded order, and the size-sorted windows ``serve`` batches
    its first pass in (so a plain forward pads exactly as the served model does)."""
    order = list(range(sum(task.size for task in pool.split("test"))))
    random.Random(0).shuffle(order)  # the permutation depends on the length only: as shuffling the items
    picked = {index: rank for rank, index in enumerate(order[:count])}
    items: list[Any] = [None] * len(picked)
    stream = (item for task in pool.split("test") for item in task.items())
    for index, item in enumerate(stream):  # one pass; only the picked inputs are kept
        if index in picked:  # a copy: a row of a decoded batch would keep the whole batch alive
            items[picked[index]] = item.clone() if isinstance(item, torch.Tensor) else item
    sizes = [pool.size_of(item) for item in items] if pool.size_of else [0] * len(items)
    return items, first_pass_batches(sizes, batch_size, pool.num_tasks)


def forward_runner(pool: TaskPool, model: nn.Module, items: Sequence[Any], batches: Sequence[Sequence[int]]
                   ) -> Callable[[], None]:
    """A call that runs ``model`` to the features over ``items`` in ``batches`` (and waits for the device)."""
    device, dtype = placement(model)

    def run() -> None:
        with torch.inference_mode():
            for rows in batches:
                pool.features(model, to_device(pool.collate([items[i] for i in rows]), device, dtype))
        sync(device)

    return run


def throughput(pool: TaskPool, model: nn.Module, mass: MASSModel, count: int = 512) -> dict[str, Any]:
    """Inputs/s of the served MASS model (:func:`~massmerge.mass.serving.serve`, as ``massmerge predict``) and of
    the plain base forward to the features, on the same ``count`` test inputs of mixed tasks, same batch size."""
    size = mass.settings.batch_size
    items, batches = mixed_inputs(pool, count, size)

    def served() -> None:
        list(serve(mass, items, pool.collate, batch_size=size, size_of=pool.size_of))
        sync(mass.device)

    plain = ev.throughput(forward_runner(pool, model, items, batches), len(items), repeats=1)
    routed = ev.throughput(served, len(items), repeats=1)
    return {"base_samples_per_s": plain, "mass_samples_per_s": routed, "ratio": routed / plain,
            "path": f"massmerge.mass.serving.serve (what massmerge predict runs), {len(items)} test inputs of mixed "
                    f"tasks in input order, batch {size}, warm caches; base: forward to the features, batched as "
                    "serve batches its first pass (size-sorted windows)"}


def forward_ratio(pool: TaskPool, model: nn.Module, other: nn.Module, batch_size: int, count: int = 512) -> float:
    """Throughput of ``other``'s forward over the plain ``model``'s, same mixed inputs and batches, one run."""
    items, batches = mixed_inputs(pool, count, batch_size)
    plain = ev.throughput(forward_runner(pool, model, items, batches), len(items), repeats=1)
    return ev.throughput(forward_runner(pool, other, items, batches), len(items), repeats=1) / plain
