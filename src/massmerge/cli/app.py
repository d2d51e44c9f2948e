"""The typer app of the ``massmerge`` command line, and how it reports errors.

Every command module registers itself here with :func:`command`; :mod:`massmerge.cli` imports them all.
``main`` turns any :class:`~massmerge.errors.MassMergeError` into ``error: <one line>`` on stderr and exit
code 2, so users never see a traceback for a bad file or option.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from massmerge import __version__, progress
from massmerge.errors import MassMergeError


class Command(TyperCommand):
    """A command whose help reads like other well-kept CLIs: ``Usage: massmerge predict [OPTIONS] ARTIFACT
    INPUTS`` and one ``ARTIFACT  help`` line per argument (typer writes ``{ARTIFACT}`` and ``ARTIFACT <path>``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(_argument_name(param))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments = [(_argument_name(p).strip("[]"), p.help or "") for p in self.get_params(ctx)
                     if p.param_type_name == "argument"]
        options = [record for p in self.get_params(ctx) if p.param_type_name == "option"
                   and (record := p.get_help_record(ctx)) is not None]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _argument_name(param: Any) -> str:
    """``NAME`` (required), ``[NAME]`` (optional), ``NAME...`` (several): the metavar, else the upper-cased name."""
    name = param.metavar or (param.name or "ARG").upper()
    name = name if param.required else f"[{name}]"
    return f"{name}..." if param.nargs != 1 else name


def command(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command on :data:`app` with the conventional help layout (:class:`Command`)."""
    return app.command(name, cls=Command)


app = typer.Typer(
    name="massmerge",
    help="Merge fine-tuned experts of one pretrained network: MASS and the static merging baselines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain text: "[default: ...]" must show, not be eaten as markup
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"massmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Merge fine-tuned experts of one pretrained network: MASS and the static merging baselines."""


# Options that take several values after one flag (``--experts a b c``); see expand_multi_value_options.
MULTI_VALUE_OPTIONS = ("--experts", "--heads", "--task-names", "--include", "--exclude")


def expand_multi_value_options(argv: Sequence[str]) -> list[str]:
    """Rewrite ``--experts a b c`` as ``--experts a --experts b --experts c`` for click's repeated options.

    Why: the documented interface lists experts after one flag, which click options cannot take natively.
    """
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg.startswith("-"):
            current = arg if arg in MULTI_VALUE_OPTIONS else None
            if current is None or "=" in arg:
                out.append(arg)
            continue
        if current is not None:
            out.extend([current, arg])
        else:
            out.append(arg)
    return out


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit with ``code`` (2: a usage or input error)."""
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    raise SystemExit(code)


INTERRUPTED = 130  # the shell's code for a command ended by SIGINT
INTERRUPTED_MESSAGE = "interrupted; no output file was left half-written (temporary files were removed)"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``massmerge`` script."""
    args = expand_multi_value_options(sys.argv[1:] if argv is None else argv)
    progress.set_enabled(True)  # a bar on a terminal, log lines in a file (massmerge/progress.py)
    try:
        with progress.quiet_third_party():  # our stderr: our progress lines, then at most one error line
            code = app(args=args, prog_name="massmerge", standalone_mode=False)
    except MassMergeError as exc:
        fail(str(exc))
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        fail(f"massmerge {_command_of(args)}: the device ran out of memory; retry with a smaller --batch-size "
             "(or --device cpu)")
    except (KeyboardInterrupt, EOFError):
        fail(INTERRUPTED_MESSAGE, INTERRUPTED)
    except OSError as exc:
        fail(f"{getattr(exc, 'filename', None) or ''}: {exc.strerror or exc}".lstrip(": "))
    except Exception as exc:  # noqa: BLE001 - click's exceptions live in typer's private vendored module
        if not _is_click_error(exc):
            raise
        _report_click_error(exc)
    if code == INTERRUPTED:  # typer turns Ctrl-C inside a command into a silent return code 130
        fail(INTERRUPTED_MESSAGE, INTERRUPTED)
    if isinstance(code, int) and code:
        raise SystemExit(code)


def _command_of(args: Sequence[str]) -> str:
    """The command a command line runs (its first word that is not a flag)."""
    return next((arg for arg in args if not arg.startswith("-")), "")


def is_out_of_memory(exc: BaseException) -> bool:
    """A device out of memory (imported from massmerge.device only then: the CLI starts without torch)."""
    if "out of memory" not in str(exc).lower():
        return False
    from massmerge.device import is_out_of_memory as device_oom

    return device_oom(exc)


def _is_click_error(exc: BaseException) -> bool:
    """Usage errors and aborts from (typer's vendored) click, recognised by their interface, not their module."""
    return type(exc).__name__ == "Abort" or (hasattr(exc, "format_message") and hasattr(exc, "exit_code"))


def _report_click_error(exc: BaseException) -> None:
    """One line for a usage error (``error: Missing option '--output'.``); the help text for a bare command."""
    if type(exc).__name__ == "Abort":
        fail(INTERRUPTED_MESSAGE, INTERRUPTED)
    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()  # type: ignore[attr-defined]
        raise SystemExit(2)
    message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    command = getattr(getattr(exc, "ctx", None), "command_path", "massmerge")
    fail(f"{message} (see '{command} --help')")


__all__ = ["INTERRUPTED", "INTERRUPTED_MESSAGE", "app", "command", "fail", "main"]
