#!/usr/bin/env python3
"""Generate docs/cli.md from every command's --help; ``--check`` fails when it is stale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [[], ["pull"], ["quantize"], ["run"], ["profile"], ["bench"]]


def help_text(args: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}
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
    for args in COMMANDS:
        parts += [f"## `{' '.join(['moespeq', *args])}`", "", "```text", help_text(args), "```", ""]
    return "\n".join(parts)


def main() -> None:
    target = ROOT / "docs" / "cli.md"
    text = render()
    if "--check" in sys.argv:
        if not target.exists() or target.read_text() != text:
            print("docs/cli.md is stale: run python scripts/gen_cli_docs.py", file=sys.stderr)
            sys.exit(1)
        print("docs/cli.md is current")
        return
    target.write_text(text)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
