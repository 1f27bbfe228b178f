"""The one place exceptions become what a user sees: a single line on stderr with a
remedy, exit code 2 for usage errors and 1 for runtime failures, and the traceback only
when MOESPEQ_DEBUG=1."""

from __future__ import annotations

import errno
import os
import signal
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


class OutputError(MoespeqError):
    """Standard output cannot be written (a full disk behind ``> /dev/full``, an I/O error)."""


class _Stream:
    """A standard stream whose writes go through ``_call`` (what its write errors become);
    everything else is the stream's own."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def _call(self, method, *args):
        return getattr(self.stream, method)(*args)

    def write(self, text):
        return self._call("write", text)

    def writelines(self, lines):
        return self._call("writelines", lines)

    def flush(self):
        return self._call("flush")


class GuardedOutput(_Stream):
    """``sys.stdout`` whose write errors are ``OutputError`` (one line, exit 1), not an
    "internal error" (a closed pipe stays a ``BrokenPipeError``: its reader left).
    ``closed``: the process was started with no stdout (``>&-``): the first write is that
    error too, as ``echo hi >&-`` is, not output dropped and exit 0."""

    def __init__(self, stream, closed: bool = False):
        super().__init__(stream)
        self.started_closed = closed  # (``closed`` stays the stream's own)

    def _call(self, method, *args):
        if self.started_closed and method != "flush" and any(args):
            raise OutputError("cannot write to standard output (it is closed); give it a file or a pipe")
        try:
            return getattr(self.stream, method)(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(f"cannot write to standard output ({e.strerror or e}); write it elsewhere") from None


class BestEffortErrors(_Stream):
    """``sys.stderr`` whose write errors are dropped: messages, progress and the loading
    line are best effort, so a stderr that cannot take them (``2>/dev/full``, one opened
    read-only) neither loses the answer on stdout nor turns a usage error's exit 2 into an
    "internal error"."""

    def _call(self, method, *args):
        try:
            return getattr(self.stream, method)(*args)
        except (OSError, ValueError):  # (ValueError: the stream was closed)
            return len(args[0]) if method == "write" else None


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


def flush_stdout(command: str | None) -> None:
    """Flush standard output, its failure mapped as a command's (``exit_for``)."""
    try:
        sys.stdout.flush()
    except (OSError, OutputError) as e:
        exit_for(e, command)
    except ValueError:  # closed
        pass


def out_of_memory(exc: BaseException) -> str | None:
    """ "host" or "GPU" where ``exc`` is an allocation that failed, however it surfaced
    (Python's MemoryError, torch's allocator or its mmap of a checkpoint, CUDA's caching
    allocator, a shared library that could not be mapped under a ulimit); else None."""
    text = str(exc)
    if type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text:
        return "GPU"
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return "host"
    if isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "Cannot allocate memory" in text):
        return "host"
    if isinstance(exc, ImportError) and "failed to map segment" in text:
        return "host"
    return None


RUN_MEMORY_HINT = "give a smaller --ram or a shorter --context, or free some memory"
MEMORY_HINTS = {  # (which memory, command) -> what to do; (which, None): any other command
    ("host", None): "free some memory, or raise the memory limit this runs under",
    ("GPU", None): "give a smaller --vram (other programs hold some of the GPU's memory) or a shorter --context",
    **{("host", c): RUN_MEMORY_HINT for c in ("run", "chat", "serve", "profile", "bench")},
}


# where text follows the model's name as ollama takes it (a prompt, a message): where it goes here
EXTRA_ARGUMENT_HINTS = {
    **{
        c: f'a prompt goes in -p "..." (or on standard input): moespeq {c} MODEL -p "..."'
        for c in ("run", "profile", "bench", "plan")
    },
    "chat": "chat takes its messages at its prompt, or piped on standard input",
}


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
        fail("hung up (its terminal closed)" if exc.signum == signal.SIGHUP else "terminated", 128 + exc.signum)
    if isinstance(exc, USAGE_ERRORS):
        where = f"moespeq {command} --help" if command else "moespeq --help"
        message = exc.format_message()
        if command in EXTRA_ARGUMENT_HINTS and message.startswith("Got unexpected extra argument"):
            message += f"; {EXTRA_ARGUMENT_HINTS[command]}"
        fail(f"{message} (see `{where}`)", 2)
    if isinstance(exc, MoespeqError):
        if isinstance(exc, OutputError):
            quiet_stdout()  # what is still buffered would fail again at exit
        fail(str(exc), exc.exit_code)
    memory = out_of_memory(exc)
    if memory is not None:
        fail(f"out of {memory} memory; {MEMORY_HINTS.get((memory, command), MEMORY_HINTS[memory, None])}", 1)
    fail(f"internal error: {type(exc).__name__}: {exc}" + ("" if debug() else f" ({DEBUG_HINT})"), 1)
