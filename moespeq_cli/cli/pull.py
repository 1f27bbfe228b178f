"""``moespeq pull``: download a model into the Hugging Face cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moespeq_cli.cli import options as o

EPILOG = """[bold]Examples[/bold]

  [dim]# the aliases and their sizes[/dim]
  moespeq pull --list

  [dim]# mistralai/Mixtral-8x7B-Instruct-v0.1[/dim]
  moespeq pull mixtral

  moespeq pull Qwen/Qwen1.5-MoE-A2.7B-Chat --revision main

  [dim]# just config.json, for `moespeq plan`[/dim]
  moespeq pull mixtral --config-only
"""


def pull(
    model: Annotated[Optional[str], typer.Argument(help="An alias or a hub id org/name.", show_default=False)] = None,
    revision: Annotated[
        Optional[str], typer.Option("--revision", help="Branch, tag or commit.", show_default=False)
    ] = None,
    local_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--local-dir", help="Download into this directory instead of the Hugging Face cache.", show_default=False
        ),
    ] = None,
    config_only: Annotated[
        bool, typer.Option("--config-only", help="Only config.json and generation_config.json.")
    ] = False,
    list_aliases: Annotated[bool, typer.Option("--list", help="List the aliases with their sizes and exit.")] = False,
    json_out: o.Json = False,
) -> None:
    """Download a model's safetensors, config and tokenizer from the Hugging Face Hub.

    A repository moespeq cannot run (no config.json of a family it implements, no
    safetensors weights) is refused before anything is downloaded. Files go into the
    standard Hugging Face cache (other tools reuse them); --local-dir takes a new or empty
    directory, or one an earlier pull of the same model wrote. An interrupted
    pull keeps the files it finished; the same command again fetches the rest (a file cut
    short by the interruption starts over; a dropped connection is resumed within the pull). Later commands find the model by the same alias or id without the
    network. Prints the local path last.
    """
    import json

    from moespeq_cli.errors import UsageError
    from moespeq_cli.model_ref import ALIASES, cached_snapshot

    if list_aliases and model is not None:
        raise UsageError(f"--list lists every alias and takes no MODEL; drop {model!r}, or drop --list to pull it")
    if list_aliases:
        rows = [
            {"alias": a, "repo": r, "size_gb": gb, "cached": cached_snapshot(r) is not None}
            for a, (r, gb) in ALIASES.items()
        ]
        if json_out:
            print(json.dumps({"aliases": rows}))
            return
        from rich.table import Table

        from moespeq_cli.cli.render import styled_console

        t = Table(title="moespeq aliases")
        for col in ("alias", "hub id", "download", "cached"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["alias"], r["repo"], f"{r['size_gb']:.1f} GB", "yes" if r["cached"] else "")
        styled_console().print(t)
        return
    if model is None:
        raise UsageError("pull needs a MODEL (an alias or org/name); see `moespeq pull --list`")
    from moespeq_cli.hub import pull as do_pull

    path = do_pull(model, revision, local_dir, config_only)
    if json_out:
        print(json.dumps({"model": model, "path": str(path)}))
    else:
        print(path)
