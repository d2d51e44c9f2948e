"""``massmerge info``: what a checkpoint holds (keys, shapes, dtypes, sizes), read without loading tensors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from massmerge.checkpoints import open_checkpoint
from massmerge.cli import app

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@app.command("info")
def info_cmd(
    path: Annotated[Path, typer.Argument(help=".safetensors file or HF model directory")],
) -> None:
    """List every key of PATH with its shape, dtype and size, and the totals."""
    checkpoint = open_checkpoint(path)
    table = Table(title=str(path))
    for column in ("key", "shape", "dtype", "params", "size"):
        table.add_column(column, justify="right" if column in ("params", "size") else "left")
    total_params = total_bytes = 0
    for key in checkpoint:
        shape, dtype = checkpoint.shape(key), checkpoint.dtype_name(key)
        params = math.prod(shape)
        size = params * DTYPE_BYTES.get(dtype, 4)
        total_params += params
        total_bytes += size
        table.add_row(key, str(list(shape)), dtype, f"{params:,}", human_bytes(size))
    table.add_section()
    table.add_row(f"{len(checkpoint)} tensors", "", "", f"{total_params:,}", human_bytes(total_bytes))
    Console(soft_wrap=True).print(table)
