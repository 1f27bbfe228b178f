"""``moespeq list``: the models on this machine (moespeq_cli/local_models.py)."""

from __future__ import annotations

import time

from moespeq_cli.cli import options as o

COMMAND = "list"

EPILOG = """[bold]Examples[/bold]

  moespeq list

  [dim]# for scripts: paths, sizes in bytes, drafts[/dim]
  moespeq list --json

  [dim]# what else there is to pull[/dim]
  moespeq pull --list
"""


def listing(json_out: o.Json = False) -> None:
    """List the models this machine can run without the network.

    The built-in demo and every model in the Hugging Face cache (`moespeq pull`'s, or
    another tool's) whose architecture moespeq runs, with its size on disk and the 4-bit
    draft `moespeq quantize` built for it. A model pulled with --config-only is listed
    for `moespeq plan`. Checkpoints in your own directories are not tracked: pass their
    path to `moespeq run`.
    """
    import json

    from moespeq_cli.local_models import local_models
    from moespeq_cli.runtime.planning.hardware import format_size

    models, others = local_models()
    if json_out:
        rows = [
            {
                "name": m.name,
                "repo": m.repo,
                "model_type": m.model_type,
                "path": str(m.path),
                "size_bytes": m.size,
                "weights": m.weights,
                "drafts": [str(d) for d in m.drafts],
                "draft_bytes": m.draft_size,
                "modified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.modified)),
            }
            for m in models
        ]
        print(json.dumps({"models": rows, "other_repos": others}))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "FAMILY", "SIZE", "DRAFT", "MODIFIED"):
        t.add_column(col, no_wrap=col != "NAME")
    now = time.time()
    for m in models:
        size = format_size(m.size) if m.weights else "config only"
        draft = format_size(m.draft_size) if m.drafts else "-"
        t.add_row(m.name, m.model_type, size, draft, "built in" if m.repo is None else ago(now - m.modified))
    out = Console()
    out.print(t)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        out.print(Text(f"not listed: {shown} (not an architecture moespeq runs)", style="dim"))


def ago(seconds: float) -> str:
    """``seconds`` as ``ollama list`` says a model's age: "5 minutes ago", "3 days ago"."""
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    for unit, size in (("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"
