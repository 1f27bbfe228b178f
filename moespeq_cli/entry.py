"""The ``moespeq`` console script and ``python -m moespeq_cli``.

The command's own modules (typer, rich: about 0.2 s) are imported here, inside a guard:
a Ctrl-C that lands while they import is one line and exit 130, as everywhere else,
not a Python traceback (cli/app.py installs moespeq's signal handling once they are
in); a Ctrl-C after the command, while Python shuts down, is exit 130 at once."""

from __future__ import annotations


def main() -> None:
    import os
    import signal
    import sys

    try:
        from moespeq_cli.cli.app import main as run
    except KeyboardInterrupt:
        sys.stderr.write("moespeq: error: interrupted\n")
        raise SystemExit(130) from None
    try:
        run()
    finally:
        # the command is done and its output flushed: a Ctrl-C while Python shuts down
        # (torch's exit handlers) ends the process at once with 130, not a traceback and 0
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
