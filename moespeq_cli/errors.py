"""Domain errors. The library raises these; the CLI turns each into one line on stderr
with a remedy (cli/errors.py). ``exit_code`` follows docs/design.md §7: 1 runtime, 2 usage."""

from __future__ import annotations

import os


def debug() -> bool:
    """MOESPEQ_DEBUG=1: tracebacks are shown, and optional measurements that fail raise."""
    return os.environ.get("MOESPEQ_DEBUG", "").strip().lower() not in ("", "0", "off", "no", "false")


def one_line(exc: BaseException, limit: int = 160) -> str:
    """``exc`` as one line of at most ``limit`` characters: its type and message."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]


class MoespeqError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user."""

    exit_code = 1


class UsageError(MoespeqError):
    """A bad option or argument value: the user must change the command line."""

    exit_code = 2


class UnknownModelError(UsageError):
    """MODEL is neither an alias, a cached hub id, nor a local checkpoint directory."""


class UnsupportedModelError(MoespeqError):
    """The checkpoint's architecture (config.json ``model_type``) is not implemented."""


class CheckpointError(MoespeqError):
    """A checkpoint is missing, truncated, corrupt, or disagrees with its config."""


class Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, a service manager stopping moespeq) or SIGHUP (the
    terminal closed, an ssh session dropped), raised in the main thread so that cleanups
    run as for Ctrl-C (temporary files, locks, the disk tier's scratch); not an
    Exception, so no error handler takes it for a failure. ``signum``: which."""

    def __init__(self, signum: int = 15):
        super().__init__(signum)
        self.signum = signum
