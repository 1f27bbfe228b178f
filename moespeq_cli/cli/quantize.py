"""``moespeq quantize``: build the 4-bit self-draft of a model and save it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from moespeq_cli.cli import options as o

EPILOG = """[bold]Examples[/bold]

  [dim]# nf4, blocksize 64, saved beside it[/dim]
  moespeq quantize ./Mixtral-8x7B-Instruct-v0.1

  moespeq quantize mixtral --method fp4 --blocksize 128

  moespeq quantize ./ckpt --out ./ckpt-draft --json
"""


def quantize(
    model: o.ModelArg = None,
    method: Annotated[str, typer.Option("--method", help="nf4 | fp4 (bitsandbytes 4-bit formats).")] = "nf4",
    blocksize: Annotated[int, typer.Option("--blocksize", help="Weights per absmax block.")] = 64,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Draft directory (default: beside the checkpoint, <dir>.moespeq-draft-<method>-b<blocksize>, "
            "or ~/.cache/moespeq/drafts for a pulled model, the demo, or where that is not writable).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Quantize again even where the draft there is up to date.")
    ] = False,
    json_out: o.Json = False,
) -> None:
    """Quantize a model's routed experts to 4 bits: MoE-SpeQ's self-draft.

    Only the routed experts are quantized; everything else is shared with the full-precision
    model at run time. The draft is written atomically with a manifest (method, blocksize, a
    fingerprint of the source checkpoint: config.json, the weight files' headers and samples
    of their data); `moespeq run --draft auto` finds it where quantize put it (with whatever
    --method and --blocksize it was built); a draft written to --out is used with `--draft
    DIR`. A draft built from other weights is not used (`run` quantizes in memory and says
    so; `--draft DIR` refuses it). A draft of these weights, method and block size already
    there is left as it is, and said up to date (--force quantizes again). A draft that no
    longer matches its weights in ways the fingerprint misses only lowers acceptance: the
    output is the full-precision model's either way.
    """
    import json
    import sys

    from moespeq_cli.model_ref import resolve
    from moespeq_cli.quant.draft import check_method
    from moespeq_cli.quant.draft_store import default_draft_dir, draft_lock, fingerprint

    check_method(method, blocksize)
    name, path = resolve(model)
    from moespeq_cli.models.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    target = out or default_draft_dir(ckpt.path, method, blocksize)
    fp = fingerprint(ckpt)
    stale_ok = out is None  # the default path: a draft there of the checkpoint's earlier weights is replaced
    with draft_lock(target, fp, stale_ok) as real:  # refuses an --out that is not this checkpoint's draft, first
        done = None if force else up_to_date(name, ckpt, method, blocksize, real)
        result = done or _quantize_and_save(name, ckpt, method, blocksize, real, fp, stale_ok, json_out)
    result["draft"] = os.path.abspath(result["draft"])  # (as `list --json` gives paths)
    if json_out:
        print(json.dumps(result))
        return
    if done is not None:
        print(
            f"the draft is up to date (built from these weights, {method}, blocksize {blocksize}); --force "
            "quantizes again",
            file=sys.stderr,
        )
    else:
        from moespeq_cli.local_models import tree_size
        from moespeq_cli.runtime.planning.hardware import format_size

        print(
            f"quantized {result['experts']} experts ({method}, blocksize {blocksize}): "
            f"{format_size(result['draft_bytes'])} of 4-bit weights ({format_size(tree_size(Path(result['draft'])))} "
            f"on disk), {result['ratio']:.0%} of the experts as stored, in {result['seconds']:.1f} s",
            file=sys.stderr,
        )
    if out is not None:
        import shlex

        print(f"`moespeq run {shlex.quote(name)} --draft {shlex.quote(result['draft'])}` uses it", file=sys.stderr)
    print(result["draft"])


def up_to_date(name, ckpt, method, blocksize, target: Path) -> dict | None:
    """``quantize``'s result for the draft already at ``target`` where it is this
    checkpoint's, whole, of this draft format and of this method and block size (nothing
    to do: a re-run of a large model's quantize took minutes for the same bytes), else
    None. Its manifest is touched: ``run --draft auto`` takes the draft quantize saved
    last, by that time, as it would after quantizing again."""
    from moespeq_cli.models.checkpoint import read_json
    from moespeq_cli.quant.draft_store import FORMAT_VERSION, draft_state

    if draft_state(target, ckpt) != "ready":
        return None
    m = read_json(target / "manifest.json", "")
    if (m.get("method"), m.get("blocksize"), m.get("format_version")) != (method, blocksize, FORMAT_VERSION):
        return None
    size = m.get("bytes")
    if not isinstance(size, int):
        return None
    os.utime(target / "manifest.json")
    return quantize_result(name, ckpt, method, blocksize, target, size, 0.0, up_to_date=True)


def quantize_result(name, ckpt, method, blocksize, draft: Path, size: int, seconds: float, up_to_date: bool) -> dict:
    """What ``quantize --json`` prints, for a draft of ``size`` bytes at ``draft``."""
    from moespeq_cli.quant.draft import draft_keys

    count = len(draft_keys(ckpt))
    # the experts as the checkpoint stores them (FP8's bytes, not the compute dtype's)
    full = ckpt.config.expert_bytes(ckpt.config.dtype.itemsize) * count
    return {
        "model": name,
        "draft": str(draft),
        "method": method,
        "blocksize": blocksize,
        "experts": count,
        "draft_bytes": size,
        "full_precision_bytes": full,
        "ratio": round(size / full, 4) if full else None,
        "seconds": round(seconds, 3),
        "up_to_date": up_to_date,
    }


def _quantize_and_save(name, ckpt, method, blocksize, target, fp, stale_ok, json_out) -> dict:
    import sys
    import time

    from moespeq_cli.quant.draft import draft_keys, quantized_experts, write_draft

    t0 = time.perf_counter()
    count = len(draft_keys(ckpt))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from moespeq_cli.cli.render import styled_console

    with Progress(
        TextColumn("quantizing experts"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=json_out or not sys.stderr.isatty(),
        console=styled_console(stderr=True),
    ) as bar:
        task = bar.add_task("q", total=count)
        experts = quantized_experts(
            ckpt, method, blocksize, progress=lambda done, total: bar.update(task, completed=done)
        )  # streamed into the file: memory holds one expert, not the draft
        saved, size = write_draft(target, ckpt, experts, method, blocksize, ckpt.config.dtype, fp, stale_ok)
    return quantize_result(name, ckpt, method, blocksize, saved, size, time.perf_counter() - t0, up_to_date=False)
