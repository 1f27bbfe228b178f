"""``moespeq bench``: the policies side by side on one model, profile and budget."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from moespeq_cli.cli import options as o
from moespeq_cli.errors import UsageError

EPILOG = """[bold]Examples[/bold]

  [dim]# the demo model on a simulated RTX 3060[/dim]
  moespeq bench

  moespeq bench ./ckpt --hardware rtx4090-24gb --vram 6GB -n 64

  moespeq bench ./ckpt --policies moespeq,lru --spec-depths auto,2,4 --json

  [dim]# llama.cpp's static CPU/GPU split against moespeq's choice per expert[/dim]
  moespeq bench ./ckpt --hardware desktop-3060-ddr4 --policies moespeq,hybrid

  [dim]# for real: experts read from disk, on the wall clock[/dim]
  moespeq bench ./ckpt --backend cpu --ram 2GB -n 64
"""


def bench(
    model: o.ModelArg = None,
    prompt: o.Prompt = None,
    prompt_file: o.PromptFile = None,
    max_new_tokens: o.MaxNewTokens = 64,
    backend: o.Backend = "auto",
    hardware: o.Hardware = None,
    vram: o.Vram = None,
    ram: o.Ram = None,
    policies: Annotated[
        Optional[str],
        typer.Option(
            "--policies",
            help="Comma-separated policies to compare, e.g. moespeq,lru. Default: moespeq, hybrid, "
            "gate-prefetch, lru and ondemand (without hybrid on --backend cpu or a CPU's profile).",
            show_default=False,
        ),
    ] = None,
    spec_depths: Annotated[
        str, typer.Option("--spec-depths", help="moespeq runs: comma-separated auto or N.")
    ] = "auto",
    same_cache: Annotated[
        bool,
        typer.Option(
            "--same-cache",
            help="Give moespeq the draft's bytes on top of --vram (--ram on --backend cpu): the same full-precision "
            "slots as the baselines.",
        ),
    ] = False,
    cpu_experts: o.CpuExperts = None,
    draft: o.Draft = "auto",
    cpu_threads: o.CpuThreads = None,
    context: o.Context = None,
    json_out: o.Json = False,
) -> None:
    """Compare offloading policies on one model, hardware profile and budget.

    Every policy generates the same greedy tokens; the table shows tokens/s, the speedup
    over each baseline, the expert hit rate, the share of time waiting for experts, bytes
    moved, and each run's ratio to the physical lower bound. With --backend cpu and a
    --ram below the experts' size the policies run for real, experts read from disk, on
    the wall clock.
    """
    import json
    import sys

    from moespeq_cli.cli.run import DEFAULT_PROMPT, DEMO_PROMPT, encode_prompt, read_prompt
    from moespeq_cli.model_ref import DEMO, default_vram, resolve
    from moespeq_cli.runtime.planning.hardware import load_profile
    from moespeq_cli.runtime.scheduling.policies import POLICIES

    hw = None if hardware is None else load_profile(hardware)  # read once, for every policy's engine
    if policies is None:
        # hybrid computes experts on the CPU beside a GPU: not where the CPU is the device
        on_cpu = backend == "cpu" or (hw is not None and hw.kind == "cpu")
        policies = "moespeq,gate-prefetch,lru,ondemand" if on_cpu else "moespeq,hybrid,gate-prefetch,lru,ondemand"
    names = [p.strip() for p in policies.split(",")]
    if not any(names):
        raise UsageError("--policies names no policy; give a comma-separated list such as moespeq,lru")
    if not all(names):
        raise UsageError(f"--policies {policies!r} has an empty entry; give a comma-separated list such as moespeq,lru")
    for p in names:
        if p not in POLICIES:
            raise UsageError(f"unknown policy {p!r} in --policies; choose from {', '.join(POLICIES)}")
    twice = next((p for i, p in enumerate(names) if p in names[:i]), None)
    if twice is not None:
        raise UsageError(f"--policies names {twice} twice; give each policy once")
    depths = [d.strip() for d in spec_depths.split(",")]
    depths = [str(int(d)) if d.isdigit() else d for d in depths]  # 02 is 2 (a depth named twice)
    for d in depths:
        if d != "auto" and not (d.isdigit() and 0 <= int(d) <= 64):
            raise UsageError(f"--spec-depths {spec_depths!r}: {d!r} is not auto or a number from 0 to 64")
    if depths != ["auto"] and "moespeq" not in names:
        raise UsageError("--spec-depths sets moespeq's depths, and --policies leaves moespeq out; add it or drop them")
    if same_cache and "moespeq" not in names:
        raise UsageError(
            "--same-cache gives moespeq the draft's bytes, and --policies leaves moespeq out; add it or drop it"
        )
    if len(set(depths)) != len(depths):
        raise UsageError(f"--spec-depths {spec_depths!r} names a depth twice; give each once")
    name, path = resolve(model)
    text = read_prompt(prompt, prompt_file, DEMO_PROMPT if name == DEMO else DEFAULT_PROMPT)
    vram = default_vram(name, vram, hw, backend)

    from moespeq_cli.runtime.bench import bench as run_bench
    from moespeq_cli.runtime.engine import Engine, EngineOptions, refuse_depth_without_draft

    opts = EngineOptions(
        backend=backend,
        hardware=hw,
        vram=vram,
        ram=ram,
        draft=draft,
        cpu_threads=cpu_threads,
        cpu_experts=cpu_experts,
        context=context,
    )
    probe = Engine(path, opts)
    fixed = [d for d in depths if d != "auto" and int(d) > 0]
    if fixed and "moespeq" in names:  # refused now, as run refuses it, not after the policies before it have run
        refuse_depth_without_draft(f"--spec-depths {','.join(fixed)}", draft, probe.ckpt.config.expert_format)
    ids = encode_prompt(probe, text, None, max_new_tokens)
    context = probe.context_for(len(ids), max_new_tokens)
    plan = probe.make_plan(context)  # refused before any run loads weights
    if plan is None:
        raise UsageError(
            "bench compares offloading policies, and every expert fits in RAM here: give --ram below the experts' "
            "size, or use --backend mock or cuda"
        )
    if probe.hw is not None and probe.hw.kind != "cpu":  # a cpu profile's budget is --ram: it takes no --vram
        opts.vram = probe.budget
    opts.ram = plan.host_budget_bytes  # every policy gets the same host budget (the default is measured once)
    # what `run` notes of these budgets, said once for every policy's run
    budget_note = probe.budget_note
    ram_note = probe.ram_beyond_memory(plan, context)
    if not json_out:
        for note in (budget_note, ram_note):
            if note:
                print(f"note: {note}", file=sys.stderr)
    results = run_bench(
        path,
        ids,
        max_new_tokens,
        names,
        opts,
        same_cache=same_cache,
        spec_depths=depths,
    )
    tokens = {tuple(r.token_ids) for r in results}
    if len(tokens) != 1:
        raise RuntimeError("policies produced different tokens; this is a bug, please report it")
    report = {
        "model": name,
        "hardware": probe.hw.name if probe.hw else None,
        "backend": probe.backend_name,
        "vram_bytes": opts.vram,
        "ram_bytes": opts.ram,
        "disk_tier": plan.disk_tier,
        "same_cache": same_cache,
        "new_tokens": max_new_tokens,
        "budget_note": budget_note,
        "ram_note": ram_note,
        "results": [
            {
                "policy": r.policy,
                "label": r.label,
                "slots": r.slots,
                "draft_bytes": r.draft_bytes,
                "stats": r.stats.to_dict(),
                "speedup_vs": r.speedup_vs,
                "mean_union": r.mean_union,
                "union_bound": r.union_bound,
            }
            for r in results
        ],
    }
    if json_out:
        print(json.dumps(report))
        return
    from moespeq_cli.cli.render import bench_table

    bench_table(report)
