#!/usr/bin/env python3
"""Generate docs/cli.md from every command's --help, and the README's table of the options
``run``, ``chat``, ``serve``, ``profile`` and ``bench`` share from the commands themselves;
``--check`` fails when either is stale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ["run", "chat", "serve", "profile", "bench"]
BEGIN, END = "<!-- shared-options:begin (scripts/gen_cli_docs.py) -->", "<!-- shared-options:end -->"


def help_text(args: list[str], columns: int = 100) -> str:
    """``moespeq ARGS --help`` as a ``columns``-wide terminal without colour shows it."""
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1", "TERM": "dumb", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "moespeq_cli", *args, "--help"], capture_output=True, text=True, env=env, check=True
    ).stdout
    return "\n".join(line.rstrip() for line in out.strip("\n").splitlines())


def render() -> str:
    parts = [
        "# moespeq command-line reference",
        "",
        "Generated from `--help` by `scripts/gen_cli_docs.py`; CI checks that it is current.",
        "",
    ]
    import typer.main

    from moespeq_cli.cli.app import app

    # every command, in the order `moespeq --help` lists them
    for args in [[], *([name] for name in typer.main.get_command(app).commands)]:
        parts += [f"## `{' '.join(['moespeq', *args])}`", "", "```text", help_text(args), "```", ""]
    return "\n".join(parts)


def options_table() -> str:
    """The options every one of SHARED takes, in run's order, with run's help text (and the
    commands whose own help says otherwise named: `chat`'s and `serve`'s --context)."""
    import typer.main

    from moespeq_cli.cli.app import app

    group = typer.main.get_command(app)
    params = {name: [p for p in group.commands[name].params if p.param_type_name == "option"] for name in SHARED}
    common = set.intersection(*({p.name for p in ps} for ps in params.values()))
    rows = ["| option | meaning |", "|---|---|"]
    for p in params["run"]:
        if p.name not in common or p.name == "help":
            continue
        names = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
        meaning = (p.help or "").replace("|", "\\|")
        other = [c for c in SHARED if next(q.help for q in params[c] if q.name == p.name) != p.help]
        if other:
            meaning += " (" + " and ".join(f"`{c}`" for c in other) + ": their own, in their `--help`)"
        rows.append(f"| {names} | {meaning} |")
    return "\n".join([BEGIN, "", "Options shared by " + ", ".join(f"`{c}`" for c in SHARED) + ":", "", *rows, "", END])


def readme_with_table() -> str:
    readme = (ROOT / "README.md").read_text()
    start, stop = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[:start] + options_table() + readme[stop:]


def main() -> None:
    target = ROOT / "docs" / "cli.md"
    text = render()
    readme = readme_with_table()
    if "--check" in sys.argv:
        if not target.exists() or target.read_text() != text:
            print("docs/cli.md is stale: run python scripts/gen_cli_docs.py", file=sys.stderr)
            sys.exit(1)
        if (ROOT / "README.md").read_text() != readme:
            print("README.md's shared-options table is stale: run python scripts/gen_cli_docs.py", file=sys.stderr)
            sys.exit(1)
        print("docs/cli.md is current")
        return
    target.write_text(text)
    (ROOT / "README.md").write_text(readme)
    print(f"wrote {target} and README.md's shared-options table")


if __name__ == "__main__":
    main()
