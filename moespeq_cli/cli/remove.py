"""``moespeq rm``: remove models from the Hugging Face cache (moespeq_cli/removal.py)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from moespeq_cli.cli import options as o

COMMAND = "rm"

EPILOG = """[bold]Examples[/bold]

  [dim]# asks first, says what it frees[/dim]
  moespeq rm mixtral

  [dim]# in a script: no question[/dim]
  moespeq rm Qwen/Qwen1.5-MoE-A2.7B-Chat --yes --json

  [dim]# what there is to remove[/dim]
  moespeq list
"""


def remove(
    model: Annotated[
        list[str],
        typer.Argument(
            help="Aliases, hub ids or cache folders of models in the Hugging Face cache.", show_default=False
        ),
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
    json_out: o.Json = False,
) -> None:
    """Remove models from the Hugging Face cache, with the drafts moespeq built for them.

    Every revision of each model goes, and the 4-bit drafts `moespeq quantize` kept for
    it in moespeq's cache; nothing else. A model is named by its alias or hub id
    (`moespeq list` shows those moespeq runs; another repository in the cache is removed
    by its id too) or by its folder in the cache (a path to it, or its name:
    models--ORG--NAME). Checkpoints in your own directories are never removed (delete a
    directory of yours yourself); `moespeq rm demo` removes only the drafts quantize
    built of the built-in demo. Every name is checked before anything is deleted; a
    model being downloaded or quantized is left alone. Asks before removing unless --yes
    (required where stdin is not a terminal). A Ctrl-C waits for the model being deleted
    to be gone (a second one stops at once); a `moespeq run` or `serve` using a removed
    model keeps reading its open files until it exits.
    """
    import json

    from moespeq_cli.cli.signals import uninterrupted
    from moespeq_cli.errors import UsageError
    from moespeq_cli.removal import nothing_writing, plan_removals, said
    from moespeq_cli.removal import remove as remove_one
    from moespeq_cli.runtime.planning.hardware import format_size
    from moespeq_cli.text import counted

    removals = plan_removals(model)
    if not yes:
        if sys.stdin is None or not sys.stdin.isatty():
            raise UsageError("stdin is not a terminal to ask on; give --yes to remove without asking")
        for r in removals:
            drafts = f"{counted(len(r.drafts), 'draft')} ({format_size(r.draft_size)})" if r.drafts else ""
            what = drafts  # (the demo: its drafts alone)
            if r.folder is not None:
                what = f"{format_size(r.size)} in {r.folder}" + (f", and {drafts}" if drafts else "")
            print(f"{said(r.name)}: {what}", file=sys.stderr)
        what = shown_name(removals[0]) if len(removals) == 1 else counted(len(removals), "model")
        print(f"Remove {what}, {format_size(sum(r.freed for r in removals))}? [y/N] ", end="", file=sys.stderr)
        sys.stderr.flush()
        try:
            answer = sys.stdin.readline()
        except KeyboardInterrupt:
            print(file=sys.stderr)
            raise
        if answer.strip().lower() not in ("y", "yes"):
            print(("" if answer.endswith("\n") else "\n") + "Nothing removed.", file=sys.stderr)
            if json_out:
                print(json.dumps({"removed": [], "freed_bytes": 0}))
            return
    done = []
    try:
        with nothing_writing(removals):
            for r in removals:
                with uninterrupted(f"removing {said(r.name)}"):  # (a signal is raised once it is gone)
                    remove_one(r)
                    done.append(r)
                    if not json_out:
                        print(f"Removed {shown_name(r)} ({format_size(r.freed)})")
    finally:  # (after a signal too: what is gone)
        if json_out and (done or sys.exc_info()[0] is None):
            rows = [
                {
                    "name": r.name,
                    "repo": r.repo,
                    "path": str(r.folder) if r.folder is not None else None,
                    "bytes": r.size,
                    "drafts": [str(d) for d in r.drafts],
                    "draft_bytes": r.draft_size,
                }
                for r in done
            ]
            print(json.dumps({"removed": rows, "freed_bytes": sum(r.freed for r in done)}))


def shown_name(r) -> str:
    """A removal as the prompt and the result name it: the demo's are its drafts alone."""
    from moespeq_cli.removal import said

    return f"{said(r.name)}'s drafts" if r.folder is None else said(r.name)
