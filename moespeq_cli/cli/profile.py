"""``moespeq profile``: a generation under a live view of expert transfers and compute."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from moespeq_cli.cli import options as o
from moespeq_cli.errors import MoespeqError, Terminated, UsageError

EPILOG = """[bold]Examples[/bold]

  [dim]# the demo model on a simulated RTX 3060[/dim]
  moespeq profile

  moespeq profile ./ckpt --vram 6GB --trace run.json --report run.html

  [dim]# scripts and CI[/dim]
  moespeq profile --no-live --report run.html --json

  [dim]# experts read from disk, on the wall clock[/dim]
  moespeq profile ./ckpt --backend cpu --ram 2GB
"""


def profile(
    model: o.ModelArg = None,
    prompt: o.Prompt = None,
    prompt_file: o.PromptFile = None,
    max_new_tokens: o.MaxNewTokens = 128,
    temperature: o.Temperature = 0.0,
    top_p: o.TopP = 1.0,
    top_k: o.TopK = 0,
    seed: o.Seed = None,
    backend: o.Backend = "auto",
    hardware: o.Hardware = None,
    vram: o.Vram = None,
    ram: o.Ram = None,
    policy: o.Policy = "moespeq",
    cpu_experts: o.CpuExperts = None,
    draft: o.Draft = "auto",
    spec_depth: o.SpecDepth = "auto",
    cpu_threads: o.CpuThreads = None,
    trace: o.Trace = None,
    report: Annotated[
        Optional[Path], typer.Option("--report", help="Write a self-contained HTML report.", show_default=False)
    ] = None,
    no_live: Annotated[bool, typer.Option("--no-live", help="No live view (for scripts and CI).")] = False,
    context: o.Context = None,
    json_out: o.Json = False,
) -> None:
    """Generate under a live view: compute and copy lanes, expert residency, figures.

    The view shows the last stretch of the timeline (target compute, draft compute,
    stalls, host-to-device copies), which experts are on the device per MoE layer
    (resident, in flight, missed at the last layer), and rolling tokens/s, stall share,
    overlap, hit rate, acceptance and the current k. At the end it writes --trace (Chrome
    trace JSON) and --report (one HTML file).
    """
    import sys

    from moespeq_cli.cli.render import LoadingStatus
    from moespeq_cli.cli.run import check_outputs, json_with_files, prepare, result_dict, sampling_params, write_trace

    options = o.engine_options(locals())
    with LoadingStatus(quiet=json_out) as status:  # first: what follows imports torch (a second)
        check_outputs({"--trace": trace, "--report": report}, model, prompt_file, hardware, draft)
        if trace is not None and report is not None and trace.resolve() == report.resolve():
            raise UsageError("--trace and --report name the same file; give two names")
        sampling = sampling_params(temperature, top_p, top_k, seed)
        name, engine, text, prompt_ids = prepare(
            model, prompt, prompt_file, max_new_tokens, context=context, offload_for="profile", status=status, **options
        )
    live = not (no_live or json_out) and sys.stdout.isatty()
    if not json_out:
        from moespeq_cli.cli.render import Renderer, end_note

        Renderer().plan(engine)  # the memory plan and its notes (a --vram beyond the card), as `run` says them
    token_ids: list[int] = []
    missed: set = set()
    cache = engine.cache

    def on_lookup(layer: int, needed: list, ready: list) -> None:
        missed.difference_update([k for k in missed if k[0] == layer])
        missed.update((layer, e) for e in needed if e not in ready)

    engine.target_exec.lookup_hook = on_lookup
    where = engine.hw.name if engine.hw else "this CPU, experts from disk"
    title = f"moespeq profile · {name} · {where} · {engine.policy_name} · {engine.backend.clock_kind} clock"
    layers = sorted(engine.model.moe_blocks)
    E = engine.ckpt.config.num_experts

    def snapshot() -> dict:
        b = engine.backend
        now = b.now()
        tl = b.timeline
        copy_s = tl.busy("copy")
        cs = cache.stats
        spec = engine.spec_stats
        return {
            "tokens": len(token_ids),
            "tokens_per_s": len(token_ids) / now if now else None,
            "stall_share": b.io_stall_s / now if now else None,
            "overlap": (tl.overlap_s() / copy_s) if copy_s else None,
            "hit_rate": cs.hit_rate,
            "acceptance": (spec.acceptance_rate if spec else None),
            "k": (engine.governor.history[-1] if engine.scheduler is not None and engine.governor.history else None),
            "mb": b.bytes_h2d / 1e6,
            "mb_read": b.bytes_read / 1e6 if engine.plan.disk_tier else None,
        }

    from moespeq_cli.profiling.live import render
    from moespeq_cli.tokenizer import StreamDecoder

    decoder, text = StreamDecoder(engine.tokenizer), [""]  # the text so far, a token's piece at a time

    def view():
        b = engine.backend
        now = b.now()
        return render(
            title,
            b.timeline.intervals,
            now,
            max(now * 0.25, 1e-4),
            cache,
            layers,
            E,
            missed,
            snapshot(),
            text[0],
            engine.tiers.host if engine.plan.disk_tier else None,
            tuple(shutil.get_terminal_size((120, 40))),
        )

    import time

    def finish(started: float, interrupted: bool = False) -> None:
        """The result (what ran so far where ``interrupted``), printed with the files written."""
        result = result_dict(name, engine, prompt_ids, token_ids, time.perf_counter() - started)
        if interrupted:
            result["interrupted"], result["finish_reason"] = True, "interrupted"
        result["trace"] = str(trace) if trace else None
        result["report"] = str(report) if report else None

        def write_the_report() -> None:
            from moespeq_cli.profiling.report import write_report

            cs = cache.stats
            layer_hits = {layer: cs.layer_hits[layer] / n for layer, n in cs.layer_lookups.items() if n}
            write_report(report, result, engine.backend.timeline.to_list(), layer_hits)

        writers = [("trace", lambda: write_trace(engine, trace, result))] if trace is not None else []
        writers += [("report", write_the_report)] if report is not None else []
        if json_out:  # the files first: the result then says which were written (a script reads stdout alone)
            json_with_files(result, writers)
            return
        out = Renderer()
        if not live:
            print(result["text"])
        out.stats_line(result)
        if note := end_note(engine, result):
            out.note(note)
        # the files after the output: one that cannot be written (a user's file appeared there)
        # loses no answer and no statistics
        for _key, write in writers:
            write()
        for label, p in (("trace", trace), ("report", report)):
            if p:
                print(f"{label}: {p}", file=sys.stderr)

    started = time.perf_counter()
    events = engine.generate(prompt_ids, max_new_tokens, sampling)
    try:
        if live:
            from rich.live import Live

            from moespeq_cli.cli.render import styled_console

            with Live(view(), console=styled_console(), refresh_per_second=8, transient=False) as lv:
                for ev in events:
                    token_ids.append(ev.token)
                    text[0] += decoder.push(ev.token)
                    lv.update(view())
        else:
            for ev in events:
                token_ids.append(ev.token)
    except (KeyboardInterrupt, Terminated):
        # Ctrl-C (or kill): what ran so far, its statistics and its trace and report, as a
        # profiler writes what it recorded when stopped; then `interrupted` (exit 130)
        if token_ids:
            with contextlib.suppress(OSError, MoespeqError):  # (a terminal gone after SIGHUP)
                finish(started, interrupted=True)
        raise
    finish(started)
