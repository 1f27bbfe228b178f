"""The one place exceptions become what a user sees: a single line on stderr with a
remedy, exit code 2 for usage errors and 1 for runtime failures, and the traceback only
when MOESPEQ_DEBUG=1."""

from __future__ import annotations

import errno
import os
import sys

import typer

from moespeq_cli.errors import MoespeqError, Terminated, debug


def _click_exceptions() -> tuple[tuple, tuple]:
    """(usage errors, no-args-help) classes of typer's vendored click, and of click."""
    usage, no_args = [], []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            m = __import__(mod, fromlist=["UsageError"])
        except ImportError:
            continue
        usage.append(m.UsageError)
        if hasattr(m, "NoArgsIsHelpError"):
            no_args.append(m.NoArgsIsHelpError)
    return tuple(usage), tuple(no_args)


USAGE_ERRORS, NO_ARGS_HELP = _click_exceptions()


class Interrupted(Exception):
    """Ctrl-C in a command (typer would make it a silent exit 130)."""


class PipeClosed(Exception):
    """stdout's reader went away (`moespeq run | head -3`)."""


DEBUG_HINT = "set MOESPEQ_DEBUG=1 for the traceback"


def fail(message: str, code: int) -> None:
    print(f"moespeq: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush into a closed pipe
    prints no 'Exception ignored' message."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


def exit_for(exc: BaseException, command: str | None) -> None:
    """Map an exception escaping a command to a one-line message and an exit code."""
    if isinstance(exc, typer.Exit):
        sys.exit(exc.exit_code)
    if isinstance(exc, NO_ARGS_HELP):
        sys.exit(0)  # the help text was already printed
    if isinstance(exc, PipeClosed | BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE):
        quiet_stdout()  # `moespeq run | head -3`: the reader left; nothing to say
        sys.exit(141)
    if debug():
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, Interrupted | typer.Abort | KeyboardInterrupt):
        fail("interrupted", 130)
    if isinstance(exc, Terminated):
        fail("terminated", 143)
    if isinstance(exc, USAGE_ERRORS):
        where = f"moespeq {command} --help" if command else "moespeq --help"
        fail(f"{exc.format_message()} (see `{where}`)", 2)
    if isinstance(exc, MoespeqError):
        fail(str(exc), exc.exit_code)
    if isinstance(exc, MemoryError):
        fail("out of host memory; use a smaller model or a smaller --max-new-tokens", 1)
    fail(f"internal error: {type(exc).__name__}: {exc} ({DEBUG_HINT})", 1)
