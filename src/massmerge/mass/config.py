"""MASS hyper-parameters with the defaults of design.md, validated once with one-line errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from massmerge.errors import OptionError

RoutingMode = Literal["topk", "top1", "batch"]


class MASSConfig(BaseModel):
    """Every setting that shapes a MASS model (the artifact's manifest and cache keys hold all of them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    routing_layer: str = Field(min_length=1, description="dotted name of the nn.Linear whose input routes")
    rank_fraction: float | None = Field(default=None, gt=0.0, le=1.0, description="k = floor(min(m,n)*f); None=1/T")
    eps: float | None = Field(default=0.3, ge=0.0, le=1.0, description="de-redundancy cosine threshold; None=off")
    alpha: float = Field(default=1.0, allow_inf_nan=False, description="scale of the merged delta")
    eta: float = Field(default=0.2, ge=0.0, lt=1.0, description="probability threshold for selection")
    top_k: int = Field(default=3, ge=1, description="at most K tasks per sample")
    tau: float = Field(default=1.0, gt=0.0, allow_inf_nan=False, description="softmax temperature")
    mode: RoutingMode = "topk"
    svd: Literal["auto", "exact", "randomized"] = "auto"


def make_config(**values: Any) -> MASSConfig:
    """Build a :class:`MASSConfig`, turning pydantic's report into a one-line error naming the option."""
    try:
        return MASSConfig(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        option = "--" + "-".join(str(part) for part in first["loc"]).replace("_", "-")
        raise OptionError(f"{option}: {first['msg']} (got {first.get('input')!r})") from None
