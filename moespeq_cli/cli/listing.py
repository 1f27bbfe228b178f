"""``moespeq list``: the models on this machine (moespeq_cli/local_models.py)."""

from __future__ import annotations

import sys
import time

from moespeq_cli.cli import options as o
from moespeq_cli.text import counted, printable

COMMAND = "list"

EPILOG = """[bold]Examples[/bold]

  moespeq list

  [dim]# for scripts: paths, sizes in bytes, drafts[/dim]
  moespeq list --json

  [dim]# what else there is to pull[/dim]
  moespeq pull --list

  [dim]# remove one, with its drafts[/dim]
  moespeq rm acme/some-model
"""


def listing(json_out: o.Json = False) -> None:
    """List the models this machine can run without the network.

    The built-in demo and every model in the Hugging Face cache (`moespeq pull`'s, or
    another tool's) whose architecture moespeq runs, with its size on disk and the 4-bit
    draft `moespeq run` loads for it (`moespeq quantize` builds it; "stale" once the
    weights changed: quantize again). A model pulled with --config-only is listed
    for `moespeq plan`. Checkpoints in your own directories are not tracked: pass their
    path to `moespeq run`.
    """
    import json

    from moespeq_cli.local_models import local_models

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
                "incomplete": m.incomplete,
                "damaged": m.damaged,
                "draft": str(m.draft) if m.draft is not None else None,
                "draft_state": m.draft_state,
                "draft_bytes": m.draft_size if m.draft is not None else None,  # (null where it does not apply)
                "drafts": [str(d) for d in m.drafts],
                "modified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.modified)),
            }
            for m in models
        ]
        print(json.dumps({"models": rows, "other_repos": [{"repo": r, "reason": why} for r, why in others]}))
        return
    now = time.time()
    rows = [("NAME", "FAMILY", "SIZE", "DRAFT", "MODIFIED")] + [
        (
            m.name,
            m.model_type,
            size_cell(m),
            draft_cell(m),
            "built in" if m.repo is None else ago(now - m.modified),
        )
        for m in models
    ]
    # plain columns, as `ollama list` prints them: a name is never cut (it is what to type)
    # and a pipe gets whole lines for awk
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    for repo, why in others:  # (a folder's name may hold a newline or a terminal's escape)
        print(f"not listed: {printable(repo, 200)}: {why}", file=sys.stderr)


def size_cell(m) -> str:
    """The SIZE column: bytes on disk; "config only" without weights; "(incomplete: pull
    again)" beside the size where shards are missing, what is wrong where one is damaged."""
    from moespeq_cli.runtime.planning.hardware import format_size

    if m.incomplete:
        return f"{format_size(m.size)} (incomplete: pull again)"
    if m.damaged:
        return f"{format_size(m.size)} ({m.damaged})"
    return format_size(m.size) if m.weights else "config only"


def draft_cell(m) -> str:
    """The DRAFT column: the size of the draft `run` loads; "stale" where it is of other
    weights (run quantizes in memory instead: quantize again), "damaged" without its
    manifest; "-" without one."""
    from moespeq_cli.runtime.planning.hardware import format_size

    if m.draft is None:
        return "-"
    return format_size(m.draft_size) if m.draft_state == "ready" else f"{m.draft_state}: quantize again"


def ago(seconds: float) -> str:
    """``seconds`` as ``ollama list`` says a model's age: "5 minutes ago", "3 days ago"."""
    day = 86400
    for unit, size in (
        ("year", 365 * day),
        ("month", 30 * day),
        ("week", 7 * day),
        ("day", day),
        ("hour", 3600),
        ("minute", 60),
    ):
        if seconds >= size:
            n = int(seconds // size)
            return f"{counted(n, unit)} ago"
    return "just now"
