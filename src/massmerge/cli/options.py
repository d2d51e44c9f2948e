"""Help texts and checks shared by several commands, so one idea has one flag and one wording everywhere.

Every default a help text states is read from where it is defined (``mass/config.py``), never retyped; the serve
flags themselves (names, metavars, help sentences) are made from the fields of ``ServeSettings``
(:func:`with_serve_flags`, which ``massmerge predict`` and ``massmerge serve`` share). Kept free of heavy imports:
the CLI must start fast (``massmerge --help`` imports no torch).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from massmerge.errors import OptionError
from massmerge.mass.config import DEFAULT_MAX_SIZE, ServeSettings, SettingFlag, generate_flags, serve_flags

RANK_FRACTION_HELP = "kept rank per task and matrix: floor(min(m, n) x FLOAT) [default: 1/T]"
EPS_HELP = "de-redundancy: leave a task out of the first pass where its cosine with a kept task exceeds FLOAT"
DEREDUNDANCY_HELP = "drop redundant tasks from the first-pass merge (see --eps)"
MAX_SIZE_HELP = ("cut every task's rank by one common fraction so the artifact is at most FLOAT x the base's "
                 f"bytes; 0 keeps the design ranks [default: {DEFAULT_MAX_SIZE} where reachable]")
DEVICE_HELP = "cpu, cuda, cuda:N or mps [default: cuda when a GPU is visible, else cpu]"
DTYPE_HELP = f"{ServeSettings.model_fields['dtype'].description} [default: the model's own]"
TRUST_PICKLE_HELP = "allow pickle checkpoints (.bin/.pt), loaded weights-only; only for files you trust"

ROUTER_HELP = "a named router rule applied before the other router flags: paper (the paper's exact rule)"


# ----- serve settings: every flag derived from mass/config.py's ServeSettings ------------------------------------

def serve_flag(field: str) -> SettingFlag:
    """The command-line option of serve setting ``field``."""
    found = next((flag for flag in serve_flags() if flag.field == field), None)
    if found is None:
        raise KeyError(f"'{field}' is not a serve setting with a flag")
    return found


def artifact_help(flag: SettingFlag) -> str:
    """Help of a serve flag of ``predict``: unset means the artifact's value (shown with the engine default)."""
    if flag.artifact_default is not None:
        return f"{flag.help} [default: the artifact's: {flag.artifact_default}]"
    shown = f", {flag.default}" if flag.default is not None and not isinstance(flag.default, tuple) else ""
    return f"{flag.help} [default: the artifact's{shown}]"


def engine_help(field: str, default: Any = None) -> str:
    """Help of a serve flag of ``suite``: unset means the engine's default (or ``default`` when given)."""
    flag = serve_flag(field)
    return f"{flag.help} [default: {default if default is not None else flag.default}]"


def serve_parameters(help_of: Callable[[SettingFlag], str], fields: Sequence[str] | None = None
                     ) -> list[inspect.Parameter]:
    """Typer parameters of the serve flags (all, or ``fields``), each unset (None) by default: named and typed
    from the settings' fields, with the help ``help_of`` writes."""
    import typer

    chosen = [flag for flag in serve_flags() if fields is None or flag.field in fields]
    return [inspect.Parameter(flag.field, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        (list[str] if flag.multiple else flag.kind) | None,
        typer.Option(flag.flag, metavar=flag.metavar, help=help_of(flag))]) for flag in chosen]


def with_serve_flags(help_of: Callable[[SettingFlag], str], fields: Sequence[str] | None = None
                     ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the serve flags (all, or ``fields``) in place of its ``serve`` parameter; the command
    receives them as ``serve``, a dict of setting -> value with unset ones None (``massmerge predict`` and
    ``massmerge serve`` share this one list)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        own = list(signature.parameters.values())
        at = [p.name for p in own].index("serve")
        added = serve_parameters(help_of, fields)
        flags = {flag.field: flag for flag in serve_flags()}

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            serve = {p.name: flags[p.name].value(kwargs.pop(p.name, None)) for p in added}
            return command(*args, serve=serve, **kwargs)

        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        run.__signature__ = signature.replace(parameters=[*keyword[:at], *added, *keyword[at + 1:]])  # type: ignore[attr-defined]
        run.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != "serve"},
                               **{p.name: p.annotation for p in added}}
        return run

    return decorate


def with_generate_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the generation flags (one per :class:`~massmerge.mass.config.GenerateSettings` field) in
    place of its ``generation`` parameter, which receives them as a dict (unset ones None; a switch False)."""
    import typer

    signature = inspect.signature(command, eval_str=True)
    own = list(signature.parameters.values())
    at = [p.name for p in own].index("generation")
    added = [inspect.Parameter(flag.field, inspect.Parameter.KEYWORD_ONLY,
                               default=False if flag.kind is bool else None, annotation=Annotated[
        bool if flag.kind is bool else flag.kind | None,
        typer.Option(flag.flag, help=f"{flag.help} [default: {flag.default}] (artifacts that generate)",
                     **({} if flag.kind is bool else {"metavar": flag.metavar}))]) for flag in generate_flags()]

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        generation = {p.name: kwargs.pop(p.name, None) for p in added}
        return command(*args, generation=generation, **kwargs)

    keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    run.__signature__ = signature.replace(parameters=[*keyword[:at], *added, *keyword[at + 1:]])  # type: ignore[attr-defined]
    run.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != "generation"},
                           **{p.name: p.annotation for p in added}}
    return run


def check_positive(option: str, value: float | None) -> None:
    """``None`` (unset) passes; zero or a negative number is a one-line error naming the option."""
    if value is not None and value <= 0:
        raise OptionError(f"{option} must be >= 1, got {value}" if isinstance(value, int)
                          else f"{option} must be > 0, got {value}")
