"""What a request may hold and what an answer holds: pydantic models (FastAPI's OpenAPI comes from them), and
the checks that turn a bad body into one line naming the field.

The per-request settings are :data:`~massmerge.artifact.predictor.REQUEST_SETTINGS`, typed as
:class:`~massmerge.mass.config.ServeSettings` types them; their ranges are then checked by the predictor exactly
as ``massmerge predict`` checks its flags (one declaration, one check).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from massmerge.artifact.predictor import REQUEST_SETTINGS
from massmerge.mass.config import GenerateSettings, ServeSettings
from massmerge.server.limits import ServerLimits, flag


class RequestError(Exception):
    """A request the server will not run: the HTTP status and one line naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _settings_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in REQUEST_SETTINGS:
        info = ServeSettings.model_fields[name]
        fields[name] = (info.annotation | None, Field(default=None, description=(
            f"{info.description or name}; unset: the server's setting")))  # type: ignore[operator]
    return fields


PredictRequest = create_model(  # type: ignore[call-overload]
    "PredictRequest",
    __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="Inputs to classify (texts, or base64-encoded images for image artifacts) and optional router "
            "settings for this request alone.",
    inputs=(list[str], Field(min_length=1, description="texts, or base64 images (PNG, JPEG, ...; a data: URL "
                                                       "prefix is accepted)")),
    **_settings_fields(),
)


RouterSettings = create_model(  # type: ignore[call-overload]
    "RouterSettings", __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="Router settings for this request alone (unset: the server's).", **_settings_fields())

GenerationOptions = create_model(  # type: ignore[call-overload]
    "GenerationOptions", __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="Generation options (massmerge's GenerateSettings; unset: its defaults).",
    **{name: (info.annotation | None, Field(default=None, description=info.description))  # type: ignore[operator]
       for name, info in GenerateSettings.model_fields.items()})


class GenerateRequest(BaseModel):
    """Prompts for a generative artifact, optional router settings and generation options, and whether to
    stream (server-sent events; exactly one input)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    inputs: list[str] = Field(min_length=1, description="prompts")
    settings: RouterSettings | None = None  # type: ignore[valid-type]
    generation: GenerationOptions | None = None  # type: ignore[valid-type]
    stream: bool = Field(default=False, description="server-sent events: one per text chunk, then the row")


class GenerationRow(BaseModel):
    """One prompt's answer: the fields of a ``massmerge predict`` generation row, without ``index``."""

    selected: list[str] = Field(description="the task set the router chose; the second pass merged these")
    probs: dict[str, float] = Field(description="the router's probability per task")
    text: str | list[str] = Field(description="the generated text (a list when several sequences per prompt)")


class GenerateResponse(BaseModel):
    """One generation per prompt, in input order."""

    generations: list[GenerationRow]


class PredictionRow(BaseModel):
    """One input's answer: the fields of a ``massmerge predict`` JSON line, without ``index``."""

    model_config = ConfigDict(populate_by_name=True)
    task: str = Field(description="the task the input was answered as")
    label: int = Field(description="the class index in that task's head")
    class_: str | int = Field(alias="class", description="the class name (the index when the head has none)")
    selected: list[str] = Field(description="the task set the router chose; the second pass merged these")
    probs: dict[str, float] = Field(description="the router's probability per task")


class PredictResponse(BaseModel):
    """One prediction per input, in input order."""

    predictions: list[PredictionRow]


class ErrorResponse(BaseModel):
    """Every error: one line naming the field, option or limit at fault."""

    error: str


class HealthResponse(BaseModel):
    status: Literal["ok", "ready", "draining", "loading"]


def _where(loc: tuple[Any, ...]) -> str:
    """``('inputs', 2)`` -> ``inputs[2]``; the body itself when there is no location."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_line(exc: ValidationError, fields: tuple[str, ...] = ("inputs", *REQUEST_SETTINGS)
                    ) -> tuple[int, str]:
    """(status, one line) for a pydantic error: 400 for a body that is not JSON, 422 for JSON that does not fit."""
    first = exc.errors()[0]
    kind, message = first["type"], str(first["msg"])
    if kind == "json_invalid":
        return 400, f"body: malformed JSON ({message.removeprefix('Invalid JSON: ')})"
    where = _where(tuple(first["loc"]))
    if kind == "extra_forbidden":
        allowed = ", ".join(fields)
        if "." in where:
            return 422, f"{where}: unknown field"
        return 422, f"{where}: unknown field (a request holds {allowed})"
    if kind == "model_type" or kind == "model_attributes_type":
        return 422, "body: expected a JSON object {\"inputs\": [...]}"
    value = first.get("input")
    shown = f" (got {value!r})" if isinstance(value, (int, float, str, bool)) and len(repr(value)) <= 60 else ""
    return 422, f"{where}: {message}{shown}"


def parse_predict(body: bytes, limits: ServerLimits) -> Any:
    """The validated request in ``body``, or a :class:`RequestError` naming the field (UTF-8 first: JSON is
    text, and a byte that is not UTF-8 is named by its offset)."""
    _utf8(body)
    try:
        request = PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        raise RequestError(*validation_line(exc)) from None
    _count(request.inputs, limits)
    return request


def _utf8(body: bytes) -> None:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"body: not UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})") from None


def _count(inputs: list[str], limits: ServerLimits) -> None:
    if len(inputs) > limits.max_inputs:
        raise RequestError(422, f"inputs: {len(inputs)} inputs, more than {flag('max_inputs')} {limits.max_inputs}")


GENERATE_FIELDS = tuple(GenerateRequest.model_fields)


def parse_generate(body: bytes, limits: ServerLimits) -> GenerateRequest:
    """The validated generate request in ``body`` (as :func:`parse_predict`); streaming takes one input."""
    _utf8(body)
    try:
        request = GenerateRequest.model_validate_json(body)
    except ValidationError as exc:
        raise RequestError(*validation_line(exc, GENERATE_FIELDS)) from None
    _count(request.inputs, limits)
    if request.stream and len(request.inputs) != 1:
        raise RequestError(422, f"stream: streaming takes exactly one input (got {len(request.inputs)})")
    return request


def set_fields(part: BaseModel | None) -> dict[str, Any]:
    """The fields a nested object sets (unset ones left to the server or the defaults)."""
    return {} if part is None else {k: v for k, v in part.model_dump().items() if v is not None}


def settings_of(request: Any) -> dict[str, Any]:
    """The router settings a request sets (unset ones left to the server)."""
    return {name: getattr(request, name) for name in REQUEST_SETTINGS if getattr(request, name) is not None}


def check_texts(texts: list[str], limits: ServerLimits) -> list[str]:
    """Texts within ``--max-input-chars``."""
    for i, text in enumerate(texts):
        if len(text) > limits.max_input_chars:
            raise RequestError(422, f"inputs[{i}]: {len(text)} characters, more than {flag('max_input_chars')} "
                                    f"{limits.max_input_chars}")
    return texts


DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,")


def image_bytes(texts: list[str]) -> list[bytes]:
    """Base64 strings (a ``data:`` URL prefix allowed) as bytes; a string that is not base64 is named."""
    out = []
    for i, text in enumerate(texts):
        try:
            out.append(base64.b64decode(DATA_URL.sub("", text, count=1), validate=True))
        except (binascii.Error, ValueError) as exc:
            raise RequestError(422, f"inputs[{i}]: not base64 ({exc})") from None
    return out


def option_line(message: str) -> str:
    """A predictor's check names a CLI flag (``--eta: ...``); in a request the field is ``eta``."""
    return re.sub(r"^--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), message)


__all__ = ["ErrorResponse", "GenerateRequest", "GenerateResponse", "GenerationOptions", "GenerationRow",
           "HealthResponse", "PredictRequest", "PredictResponse", "PredictionRow", "RequestError", "RouterSettings",
           "check_texts", "image_bytes", "option_line", "parse_generate", "parse_predict", "set_fields",
           "settings_of", "validation_line"]
