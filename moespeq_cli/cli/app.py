"""The ``moespeq`` command: wiring only. Each command lives in its own module and imports
torch inside its function, so ``moespeq --help`` answers instantly."""

from __future__ import annotations

import inspect
import os
import signal

import typer
from typer.core import TyperGroup

from moespeq_cli import __version__
from moespeq_cli.cli.signals import Signals
from moespeq_cli.errors import Terminated


def standard_streams():
    """A closed standard stream (``2>&-``: Python leaves None there, and the first message
    failed on it, the error then landing on stdout) reads and writes /dev/null; text an
    output's encoding cannot show (``PYTHONIOENCODING=ascii``) is replaced, not an error
    in the middle of an answer; stdout's write errors are one line (cli/errors.py
    ``GuardedOutput``), stderr's are dropped (``BestEffortErrors``). -> what restores the
    streams."""
    import sys

    from moespeq_cli.cli.errors import BestEffortErrors, GuardedOutput, PipeClosed

    before = sys.stdin, sys.stdout, sys.stderr
    stdout_closed = sys.stdout is None

    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, mode))  # noqa: SIM115 - the process's own, for its life
        elif name != "stdin" and hasattr(stream, "reconfigure"):
            if (stream.encoding or "").lower().replace("-", "").replace("_", "") != "utf8":
                try:
                    stream.reconfigure(errors="replace")
                except (ValueError, OSError):
                    pass
    sys.stdout = GuardedOutput(sys.stdout, closed=stdout_closed)
    sys.stderr = BestEffortErrors(sys.stderr)
    from rich.console import Console

    def on_broken_pipe(console) -> None:  # rich's own exits 1: a closed pipe is 141 whatever prints
        console.quiet = True
        raise PipeClosed()

    rich_handler, Console.on_broken_pipe = Console.on_broken_pipe, on_broken_pipe

    def restore():
        sys.stdin, sys.stdout, sys.stderr = before
        Console.on_broken_pipe = rich_handler

    return restore


# other names users of ollama and friends type, not listed in --help
COMMAND_ALIASES = {"ls": "list", "remove": "rm"}


def help_command(argv: list[str]) -> list[str]:
    """``moespeq help [COMMAND]`` (as git's and ollama's): that command's --help, or the
    list of commands (``help help`` too); options after it are ignored; an unknown
    COMMAND is said as any unknown command is."""
    if argv[:1] != ["help"]:
        return argv
    named = next((a for a in argv[1:] if not a.startswith("-")), None)
    return ["--help"] if named in (None, "help") else [named, "--help"]


class MoespeqGroup(TyperGroup):
    """Runs commands in non-standalone mode so that cli/errors.py maps every failure;
    ``ls``/``remove`` are other names of ``list``/``rm``, and ``help`` shows help."""

    def get_command(self, ctx, cmd_name):
        return super().get_command(ctx, COMMAND_ALIASES.get(cmd_name, cmd_name))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        import sys

        from moespeq_cli.cli.errors import exit_for, flush_stdout
        from moespeq_cli.errors import debug

        if not debug():
            import warnings

            # Library warnings (torch, transformers) are not for users: an error must be the
            # one line on stderr. MOESPEQ_DEBUG=1 shows them.
            warnings.simplefilter("ignore")
        if os.environ.get("_MOESPEQ_COMPLETE"):
            # the shell asks for completions: typer renders each option's help through rich,
            # which wraps it at 80 columns, and fish and zsh read each line as a candidate
            os.environ["COLUMNS"] = "100000"
        from moespeq_cli.fs import anchor_hub_cache

        anchor_hub_cache()  # (before huggingface_hub reads its environment)
        argv = help_command(list(sys.argv[1:] if args is None else args))
        command = next((a for a in argv if not a.startswith("-")), None)
        command = COMMAND_ALIASES.get(command, command)
        if command not in self.commands:
            command = None
        restore_streams = standard_streams()
        signals = Signals()
        try:
            if not argv or "-h" in argv or "--help" in argv:
                from moespeq_cli.cli import help_layout  # imports rich's help machinery: only for help

                help_layout.install()  # (after Signals: a Ctrl-C while it imports is one line)
            argv = completion_for_named_shell(argv)
            if argv is None:  # printed or installed
                raise SystemExit(0)
            rv = super().main(argv, prog_name or "moespeq", complete_var, standalone_mode=False, **extra)
        except BaseException as exc:  # noqa: BLE001 - the one mapping at the edge
            if isinstance(exc, SystemExit):
                raise
            exit_for(exc, command)
        else:
            raise SystemExit(rv if isinstance(rv, int) else 0)
        finally:
            try:
                flush_stdout(command)  # what is still buffered: a failure to write it is the command's
            finally:
                late = signals.restore()
                restore_streams()
            if late is not None:  # came in the last import and was never raised: the command's still
                exit_for(KeyboardInterrupt() if late == signal.SIGINT else Terminated(late), command)

    def invoke(self, ctx):
        """Ctrl-C and a closed stdout leave the command as exceptions typer does not
        rewrite (it turns them into silent exit codes), for cli/errors.py to map."""
        import errno

        from moespeq_cli.cli.errors import Interrupted, PipeClosed

        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted() from None
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise PipeClosed() from None
            raise


def completion_for_named_shell(argv: list[str]) -> list[str] | None:
    """``moespeq --install-completion zsh`` / ``--show-completion zsh``: typer's flags take
    no shell name where they can detect the running shell, so the name was ignored and
    bash's completion installed from bash. Here the named shell's script is printed or
    installed with typer's own functions; -> None where it was, else the command line to
    go on with (anything but a shell's name after the flag is a usage error; ``--help``
    wins: the completion flag is dropped, as it would otherwise act before the help)."""
    flag, eq, shell = argv[0].partition("=") if argv else ("", "", "")
    if eq:  # --show-completion=zsh
        argv = [flag, shell, *argv[1:]]
    if argv and argv[0] in ("--install-completion", "--show-completion") and ("--help" in argv or "-h" in argv):
        return ["--help"]
    if len(argv) < 2 or argv[0] not in ("--install-completion", "--show-completion") or argv[1].startswith("-"):
        return argv
    import shutil

    from moespeq_cli.errors import UsageError

    shells = ["bash", "zsh", "fish", "powershell", "pwsh"]
    if len(argv) > 2 or argv[1] not in shells:
        raise UsageError(f"{argv[0]} takes at most a shell's name: {', '.join(shells)}")
    shell = argv[1]
    if shell in ("powershell", "pwsh") and argv[0] == "--install-completion" and not shutil.which(shell):
        raise UsageError(f"{shell} is not installed here; install completion from the shell it is for")
    try:
        from typer._completion_shared import get_completion_script, install
    except ImportError:  # a typer without them: its flags detect the shell they run in
        raise UsageError(f"this typer cannot take a shell's name; run `moespeq {argv[0]}` from {shell}") from None
    var = "_MOESPEQ_COMPLETE"
    if argv[0] == "--show-completion":
        print(get_completion_script(prog_name="moespeq", complete_var=var, shell=shell))
    else:
        shell, path = install(shell=shell, prog_name="moespeq", complete_var=var)
        print(f"{shell} completion installed in {path}")
        print("Completion will take effect once you restart the terminal")
    return None


def _no_flag_placeholder() -> None:
    """Flags (``--json``, ``--chat/--no-chat``, ``--help``) take no value, so --help shows
    no ``<bool>`` placeholder beside them (this typer version prints one for flags)."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return "" if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich


_no_flag_placeholder()

app = typer.Typer(
    cls=MoespeqGroup,
    name="moespeq",
    help="Run Mixture-of-Experts models that do not fit in GPU memory: a 4-bit self-draft predicts "
    "which experts are needed next, and their copies overlap compute.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version_callback(value: bool) -> None:
    if value:
        import sys

        from moespeq_cli.cli.errors import PipeClosed

        try:  # (said here: typer makes a closed pipe in an option's callback a silent exit 1)
            print(f"moespeq {__version__}")
            sys.stdout.flush()
        except BrokenPipeError:
            raise PipeClosed() from None
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run Mixture-of-Experts models that do not fit in GPU memory."""


def _register() -> None:
    from moespeq_cli.cli import bench, calibrate, chat, listing, plan, profile, pull, quantize, remove, run, serve

    for module in (pull, listing, remove, run, chat, serve, quantize, profile, bench, plan, calibrate):
        name = module.__name__.rpartition(".")[2]
        command = getattr(module, name)
        app.command(name=getattr(module, "COMMAND", name), epilog=module.EPILOG, help=prose(command.__doc__))(command)


def prose(doc: str) -> str:
    """A command's docstring as --help shows it: each paragraph on one line, for the
    terminal to wrap at its own width (typer keeps the source's line breaks, which an
    80-column terminal then breaks again, mid-line)."""
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


_register()


def main() -> None:
    app()
