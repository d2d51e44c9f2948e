"""--device and --dtype: names checked against the machine, batches moved, one line per bad value."""

from __future__ import annotations

import pytest
import torch

from massmerge.device import default_device, describe, resolve_device, resolve_dtype, to_device
from massmerge.errors import OptionError


def test_the_default_is_cuda_when_visible_else_cpu() -> None:
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == default_device()
    assert resolve_device("cpu") == torch.device("cpu") and describe(torch.device("cpu")).startswith("cpu (")


@pytest.mark.parametrize("name,message", [("gpu", "'gpu' is not a device"), ("cuda:x", "is not a device"),
                                          ("meta", "not a device massmerge runs on")])
def test_bad_device_names_are_one_line_errors(name: str, message: str) -> None:
    with pytest.raises(OptionError, match=f"--device.*{message}"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_says_so() -> None:
    with pytest.raises(OptionError, match="--device cuda: no CUDA GPU is visible"):
        resolve_device("cuda")


def test_dtypes() -> None:
    assert resolve_dtype(None) is None and resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(OptionError, match="--dtype: unknown serving precision 'float8'"):
        resolve_dtype("float8")


def test_to_device_casts_floating_tensors_only_and_keeps_what_is_there(device: torch.device) -> None:
    batch = {"input_ids": torch.tensor([[1, 2]]), "pixel_values": torch.zeros(1, 3), "note": "x"}
    moved = to_device(batch, device, torch.float16)
    assert moved["input_ids"].dtype == torch.long and moved["pixel_values"].dtype == torch.float16
    assert moved["input_ids"].device.type == device.type and moved["note"] == "x"
    same = torch.zeros(2, device=device)
    assert to_device(same, device) is same
