"""Where and in what precision massmerge computes: ``--device`` and ``--dtype``, checked and described once.

Default device: ``cuda`` when a CUDA GPU is visible, else ``cpu`` (``mps`` only when asked for: Apple's backend
has no float64, which the exact SVD and the set merges' eigendecompositions need, so those parts stay on the
CPU there). The serving precision (``--dtype``) is ``float32``, ``float16`` or ``bfloat16``; None keeps the
model's own. Every bad value is one line naming the flag.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from massmerge.errors import OptionError

SERVE_DTYPES = ("float32", "float16", "bfloat16")


def default_device() -> torch.device:
    """``cuda`` when a CUDA GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None = None, *, option: str = "--device") -> torch.device:
    """The device ``name`` names, checked to exist on this machine (None: :func:`default_device`)."""
    if name is None:
        return default_device()
    if isinstance(name, torch.device):
        device = name
    else:
        try:
            device = torch.device(str(name).strip())
        except (RuntimeError, ValueError):
            raise OptionError(f"{option}: '{name}' is not a device (choose cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{option} {name}: no CUDA GPU is visible on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise OptionError(f"{option} {name}: the MPS backend is not available on this machine")
        return device
    if device.type != "cpu":
        raise OptionError(f"{option}: '{name}' is not a device massmerge runs on (choose cpu, cuda, cuda:N or mps)")
    return device


def describe(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)``, ``mps`` or ``cpu (16 threads)``: the device line commands log."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def resolve_dtype(name: str | torch.dtype | None, *, option: str = "--dtype") -> torch.dtype | None:
    """The serving dtype ``name`` names (None: the model's own)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in SERVE_DTYPES:
        raise OptionError(f"{option}: unknown serving precision '{name}' (choose {', '.join(SERVE_DTYPES)})")
    return getattr(torch, name)


def float64_device(device: torch.device) -> torch.device:
    """Where float64 work for ``device`` runs: the device itself, or the CPU for a backend without float64."""
    return torch.device("cpu") if device.type == "mps" else device


def to_device(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """A batch (a tensor or a mapping of them) on ``device``, floating tensors cast to ``dtype`` when given; a
    tensor already there is returned as is (no copy)."""
    if isinstance(batch, torch.Tensor):
        cast = dtype if dtype is not None and batch.is_floating_point() else None
        return batch.to(device=device, dtype=cast, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device, dtype) for key, value in batch.items()}
    return batch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings of asynchronous CUDA kernels measure nothing otherwise)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory (CUDA or MPS)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and "out of memory" in text.lower() and ("CUDA" in text or "MPS" in text)


__all__ = ["SERVE_DTYPES", "default_device", "describe", "float64_device",
           "is_out_of_memory", "resolve_device", "resolve_dtype", "sync", "to_device"]
