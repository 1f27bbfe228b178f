"""``moespeq calibrate``: measure this machine and write a hardware profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moespeq_cli.cli import options as o

EPILOG = """[bold]Examples[/bold]

  [dim]# writes ~/.cache/moespeq/profiles/calibrated-cpu.yaml[/dim]
  moespeq calibrate

  [dim]# then use it by name[/dim]
  moespeq run --hardware calibrated-cpu

  [dim]# measure the disk the models live on[/dim]
  moespeq calibrate --out mybox.yaml --disk-dir /models

  [dim]# time reads of the checkpoint itself[/dim]
  moespeq calibrate --model ./ckpt

  [dim]# then simulate --backend cpu with it[/dim]
  moespeq run ./ckpt --backend mock --hardware mybox.yaml --ram 2GB
"""


def default_profile_path(kind: str) -> Path:
    from moespeq_cli.fs import cache_dir

    return cache_dir() / "profiles" / f"calibrated-{kind}.yaml"


def keep_elsewhere(text: str) -> Path | None:
    """The profile ``text`` in a new file of the temporary directory, where ``--out``
    could not take it after the measuring (None: that failed too)."""
    import os
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix="moespeq-calibrated-", suffix=".yaml")
    except OSError:
        return None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError:
        os.unlink(name)  # (no half of a profile left behind)
        return None
    return Path(name)


def calibrate_lock() -> Path:
    """The lock one calibration at a time takes: this user's, in the temporary directory
    (moespeq's cache may be read-only, and another cache is the same machine)."""
    import os
    import tempfile

    return Path(tempfile.gettempdir()) / f"moespeq-calibrate-{os.getuid()}.lock"


def calibrate(
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Where to write the profile, in an existing directory (an existing file is replaced only if it is a "
            "hardware profile). "
            "Default: ~/.cache/moespeq/profiles/calibrated-cpu.yaml (-gpu with CUDA).",
            show_default=False,
        ),
    ] = None,
    disk_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--disk-dir",
            help="An existing directory on the disk the models live on: a 256 MiB scratch file is written there, read back "
            "with O_DIRECT, and removed. Default: moespeq's cache directory.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        Optional[Path],
        typer.Option(
            "--model",
            help="Time the disk on this checkpoint's files (read only, past the page cache): the disk as the runtime "
            "meets it, caches underneath included. A directory (its largest .safetensors) or a file. For a checkpoint "
            "directory, also decode 16 of its tokens for real (on the GPU where there is one) and on the mock and "
            "write the host time the op count misses (region_overhead); without --model that is measured on the "
            "bundled demo model.",
            show_default=False,
        ),
    ] = None,
    json_out: o.Json = False,
) -> None:
    """Measure this machine and write a hardware profile.

    Measures the CPU (memory bandwidth, FLOP/s, per-op and per-sync cost), the kernels the
    runtime calls (a non-expert layer, a routed expert, the 4-bit draft's expert, each by
    batch size from 1 to 16 tokens), the disk (O_DIRECT bandwidth with 1 to 4 reads in
    flight, latency) and, with CUDA, the GPU. Each figure is marked as measured, with the
    date and the method. Without a GPU the profile describes this CPU as the device
    (kind: cpu): `--backend mock --hardware PROFILE --ram X` then simulates `--backend cpu`.
    It also measures the host time per region that the op count misses (Python, per layer
    between regions), decoding the bundled demo model, or with `--model CKPT` that
    checkpoint (the draft's regions too when it has a saved draft), on the GPU where there
    is one. Takes about 25 s, about 75 s with `--model` on a 2-core machine, with a
    progress bar over its phases. Measure on an idle machine: where other processes take
    more than a tenth of the CPU meanwhile, it says the figures are likely low, some far off.
    """
    import errno
    import json
    import os
    import sys

    import torch

    from moespeq_cli.cli.render import styled_console
    from moespeq_cli.errors import MoespeqError, UsageError
    from moespeq_cli.fs import (
        atomic_write_text,
        cannot_write_in,
        check_output,
        check_replaces_own,
        is_dir,
        is_regular,
        shown,
        written_path,
    )
    from moespeq_cli.runtime.planning.calibrate import busy, profile_yaml
    from moespeq_cli.runtime.planning.calibrate import calibrate as measure
    from moespeq_cli.runtime.planning.hardware import PROFILE, load_profile

    cuda = torch.cuda.is_available()
    given = out is not None
    out = out or default_profile_path("gpu" if cuda else "cpu")
    if is_dir(out):
        raise UsageError(
            f"--out {shown(out)} is a directory; give a file name ending in .yaml, e.g. {out / 'mine.yaml'}"
        )
    if out.suffix not in (".yaml", ".yml"):
        raise UsageError(f"--out {out} must end in .yaml (it is a hardware profile)")
    replacing = is_regular(out) and os.path.getsize(out) > 0  # (an empty file held no profile)
    # refused before a minute of measuring: an --out that cannot be written (a given one's
    # directory must exist, as every file option's; the cache's, made when writing, must be
    # creatable in the nearest one that exists)
    where = out.parent
    while not os.path.lexists(where) and where != where.parent:
        where = where.parent
    # the default path lies in moespeq's cache: a cache that cannot be written is said as such
    named = "--out" if given else "the calibration (moespeq's cache; --out writes elsewhere)"
    if given or where == out.parent:
        check_output(out, named)
    elif not is_dir(where) or cannot_write_in(where) is not None:
        why = "not a directory" if not is_dir(where) else cannot_write_in(where)
        raise UsageError(f"{named} {out}: cannot create its directory in {where} ({why})")
    if given:  # (the default path lies in moespeq's cache: moespeq's own file, whatever it holds now)
        target = written_path(out)  # (a link: its target, which must be a profile too)
        if is_regular(target) and os.path.getsize(target) > 0 and target.suffix not in (".yaml", ".yml"):
            raise UsageError(
                f"--out {shown(out)} exists and is not a hardware profile (only a profile is replaced); "
                "give a new file name"
            )
        check_replaces_own(out, named, PROFILE)
    import contextlib

    from moespeq_cli.fs import cache_dir, exclusive_lock

    disk = disk_dir or cache_dir()
    if disk_dir is not None and not is_dir(disk):
        what = "does not exist" if not os.path.lexists(disk) else "is not a directory"
        raise UsageError(f"--disk-dir {shown(disk)} {what}; give the directory your models live in")
    model_file = checkpoint = None
    if model is not None:
        if is_dir(model):
            files = sorted(model.glob("*.safetensors"), key=lambda p: p.stat().st_size if is_regular(p) else -1)
            model_file = files[-1] if files and is_regular(files[-1]) else None
        elif is_regular(model):
            model_file = model
        if model_file is None:
            raise UsageError(f"--model {model} is neither a safetensors file nor a directory holding one")
        if is_regular(model_file.parent / "config.json"):
            checkpoint = model_file.parent  # the host time the op count misses is measured on it too
            from moespeq_cli.models.checkpoint import Checkpoint
            from moespeq_cli.tokenizer import Tokenizer

            ckpt = Checkpoint(checkpoint)  # refused now, not after a minute of measuring
            Tokenizer(ckpt.path, ckpt.raw_config)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = styled_console(stderr=True, highlight=False)
    # the bar counts the calibration's phases, in the order it measures them (each step's
    # words begin with its phase's), the step in hand beside it
    phases = ["host ", "disk:", "kernel ", *(["GPU:"] if cuda else []), "host time:"]
    bar = Progress(
        SpinnerColumn(),
        TextColumn("calibrating"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
        disable=json_out,  # (a script's terminal, as `profile --json` keeps its live view off)
    )
    with bar:
        task = bar.add_task("", total=len(phases))

        def say(step: str) -> None:
            done = max((i for i, p in enumerate(phases) if step.startswith(p)), default=None)
            bar.update(task, description=step, **({} if done is None else {"completed": done}))

        # two calibrations at once would each measure the other's load: one at a time, this
        # user's whatever their caches (a temporary directory that cannot be written: no lock)
        lock_path = calibrate_lock()
        lock = (
            exclusive_lock(lock_path, "calibrating this machine")
            if cannot_write_in(lock_path.parent) is None
            else contextlib.nullcontext()
        )
        try:
            with lock:
                figures = measure(disk, cuda=cuda, say=say, model_file=model_file, checkpoint=checkpoint)
        except OSError as e:
            if model_file:
                where = f"--model {model_file}"
            elif disk_dir is not None:
                where = f"--disk-dir {disk}"
            else:  # the default place: moespeq's cache, which the user never named
                where = f"moespeq's cache {disk} (where the disk is timed without --disk-dir)"
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the machine's state, not the command line
                raise MoespeqError(
                    f"{where}: no room for the disk test's 256 MiB scratch file ({e.strerror}); free some space "
                    "or give another --disk-dir"
                ) from None
            way = "give a writable --disk-dir DIR" if not model_file else "give a larger file, or --disk-dir DIR"
            raise UsageError(f"{where}: cannot time the disk there ({e.strerror}); {way}") from None
    text = profile_yaml(figures)
    try:
        try:
            if not given:  # the cache's (a given --out's exists: checked, not made)
                out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"{named} {out}: cannot create its directory ({e.strerror})") from None
        atomic_write_text(out, text, own=PROFILE if given else None)
    except MoespeqError as e:  # checked at the start, refused now (a full disk): a minute's work kept
        kept = keep_elsewhere(text)
        if kept is None:
            raise
        raise type(e)(f"{e}; the measurement is kept in {kept} (--hardware {kept} reads it)") from None
    profile = load_profile(str(out))  # what --hardware will read: refused here if it would be there
    summary = {
        "profile": str(out),
        "kind": profile.kind,
        "host_mem_bandwidth": profile.host_mem_bandwidth,
        "host_op_overhead": profile.host_op_overhead,
        "disk_bandwidth": profile.disk_bandwidth,
        "disk_queue_bandwidth": list(profile.disk_queue_bandwidth or ()),
        "disk_latency": profile.disk_latency,
        "kernels": sorted(profile.kernels),
    }
    if figures.get("_overhead_error"):
        summary["region_overhead_error"] = figures["_overhead_error"]
    summary["other_load"] = figures.get("_other_load")  # other processes' share of the CPU meanwhile
    summary["replaced"] = replacing  # an earlier profile at --out is gone
    if busy(figures):  # said on stderr with --json too: a script keeps a profile it should not trust
        console.print(
            f"[yellow]other processes took {figures['_other_load']:.0%} of the CPU while calibrating: the figures "
            "are likely low, some far off (the profile says so); do not use it: calibrate again when the machine is "
            "idle[/yellow]",
            markup=True,
            highlight=False,
        )
    if json_out:
        print(json.dumps(summary))
        return
    if figures.get("_overhead_error"):
        from rich.markup import escape

        console.print(
            f"[yellow]the host time per region was not measured (decoding the demo model failed: "
            f"{escape(figures['_overhead_error'])}); the profile prices ops alone[/yellow]",
            markup=True,
            highlight=False,
        )
    console.print(
        f"[dim]memory {profile.host_mem_bandwidth / 1e9:.1f} GB/s, {profile.host_op_overhead * 1e6:.1f} us per op, "
        f"disk {profile.disk_bandwidth / 1e9:.2f} GB/s with 4 reads in flight "
        f"({(profile.disk_queue_bandwidth or [0])[0] / 1e9:.2f} with one), "
        f"{len(profile.kernels)} kernel curves[/dim]"
    )
    if figures.get("_direct") is False:
        console.print(
            "[yellow]the disk's file system refused O_DIRECT (tmpfs does): its figures are buffered reads, "
            "on tmpfs memory's speed; time the disk your models live on with --disk-dir DIR[/yellow]",
            markup=True,
            highlight=False,
        )
    from rich.text import Text

    from moespeq_cli.runtime.planning.hardware import named_profile

    named = named_profile(out.stem)  # a name only where --hardware NAME loads this very file
    by_name = named is not None and named.resolve() == out.resolve()
    if replacing:  # the earlier calibration is gone: said, not left to be noticed
        console.print(Text(f"replaced the earlier profile {out}", style="dim"))
    console.print(Text(f"use it with --hardware {out.stem if by_name else out}", style="dim"))
    print(out, file=sys.stdout)
