"""``moespeq plan``: where every part of a model would live, per policy, and how fast it
would run -- from config.json alone, before downloading the weights."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from moespeq_cli.cli import options as o

EPILOG = """[bold]Examples[/bold]

  [dim]# will it run, and how fast?[/dim]
  moespeq plan mixtral --vram 12GB --hardware desktop-3060-ddr4

  moespeq plan qwen3-moe --vram 24GB --hardware workstation-4090-ddr5 \\
    --context 8192

  [dim]# experts beyond 48 GB read from disk[/dim]
  moespeq plan mixtral --vram 12GB --ram 48GB --hardware desktop-3060-ddr4

  moespeq plan ./Mixtral-8x7B-Instruct-v0.1 --vram 12GB --json

  moespeq pull org/name --config-only && moespeq plan org/name --vram 16GB

  [dim]# a config.json saved from a model's page[/dim]
  moespeq plan ~/Downloads/config.json --vram 16GB
"""

# (policy, --cpu-experts) per row: moespeq with and without CPU experts, then the baselines
PLAN_ROWS = (
    ("moespeq", None),
    ("moespeq", False),
    ("hybrid", None),
    ("gate-prefetch", None),
    ("lru", None),
    ("ondemand", None),
    ("resident", None),
)


DEFAULT_PLAN_CONTEXT = 4096


def plan(
    model: o.ModelArg = None,
    vram: o.Vram = None,
    ram: o.Ram = None,
    hardware: o.Hardware = None,
    context: Annotated[
        Optional[int],
        typer.Option(
            "--context",
            "-c",
            min=1,
            help="Tokens of context to plan the KV cache for (at most the model's limit). Default: what `run` "
            "plans for with the same prompt options (the prompt's tokens plus --max-new-tokens) for the demo or "
            "when one is given; otherwise 4096, or the model's limit when smaller.",
            show_default=False,
        ),
    ] = None,
    prompt: o.Prompt = None,
    prompt_file: o.PromptFile = None,
    max_new_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--max-new-tokens",
            "-n",
            min=1,
            help="Plan the context a `run` of this many new tokens takes (with the prompt; needs the model's "
            "tokenizer). Default: run's 128 where the context is run's.",
            show_default=False,
        ),
    ] = None,
    chat: o.Chat = None,
    dtype: o.Dtype = None,
    acceptance: Annotated[
        float,
        typer.Option(
            "--acceptance",
            parser=o.number_from(0.0, 1.0),
            metavar="FLOAT",
            help="Assumed chance that the 4-bit draft's token is accepted, per position (moespeq's estimate).",
        ),
    ] = 0.8,
    list_hardware: Annotated[
        bool, typer.Option("--list-hardware", help="List the hardware profiles --hardware takes, and exit.")
    ] = False,
    json_out: o.Json = False,
) -> None:
    """Plan device memory and estimate tokens/s for every policy, from config.json alone.

    No weights are read: the model is built on PyTorch's meta device. For each policy it
    shows what goes on the device (non-expert weights, KV cache, workspace, expert slots,
    the 4-bit draft), what host RAM holds (--ram; by default what this machine has
    available), what stays on disk and is read as needed, and the decoding tokens/s the
    roofline model predicts on the hardware profile (the prompt's prefill not counted, as
    in run's 1/TPOT; uniform routing assumed; `moespeq bench` measures). Aliases work
    offline from bundled configs.
    """
    import json

    from moespeq_cli.cli.render import LoadingStatus

    if list_hardware:
        show_profiles(json_out)
        return
    with LoadingStatus(quiet=json_out) as status:  # a large model's first plan counts its ops: seconds
        report = plan_report(
            model, vram, ram, hardware, context, prompt, prompt_file, max_new_tokens, chat, dtype, acceptance, status
        )
    if json_out:
        print(json.dumps(report))
        return
    from moespeq_cli.cli.render import plan_table

    for note in (report["budget_note"], report["ram_note"], report["cpu_note"], report["pricing_note"]):
        if note:
            print(f"note: {note}", file=sys.stderr)
    plan_table(report)


def plan_report(
    model, vram, ram, hardware, context, prompt, prompt_file, max_new_tokens, chat, dtype, acceptance, status
) -> dict:
    """``plan``'s report (what ``--json`` prints): each policy's plan and estimate for these
    options; ``status`` says what is being planned (a terminal's transient line)."""
    from moespeq_cli.cli.run import DEFAULT_MAX_NEW_TOKENS
    from moespeq_cli.errors import UsageError
    from moespeq_cli.model_ref import DEMO, default_vram, resolve_config
    from moespeq_cli.models import build_model, language_config, parse_config
    from moespeq_cli.models.config import DTYPES
    from moespeq_cli.runtime.backends import library_bytes
    from moespeq_cli.runtime.engine import DEFAULT_HARDWARE, cpu_profile_takes_no_vram
    from moespeq_cli.runtime.executors.grouped import grouped_scratch_bytes
    from moespeq_cli.runtime.planning.estimate import StepModel, estimate, plan_moespeq
    from moespeq_cli.runtime.planning.hardware import beyond_device, format_size, load_profile, parse_size
    from moespeq_cli.runtime.planning.planner import beyond_memory, default_ram, host_tier_ram, make_plan
    from moespeq_cli.runtime.scheduling.policies import make_policy
    from moespeq_cli.runtime.tiers.disk import ram_slot_bytes

    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
    name, raw, source = resolve_config(model)
    raw, _ = language_config(raw)  # a multimodal config: its language model
    arch, cfg = parse_config(raw, source)
    hw = load_profile(DEFAULT_HARDWARE if hardware is None else hardware)
    status.show(f"planning {name} on {hw.name}")
    host = hw.kind == "cpu"  # this CPU is the device: RAM is the tier it computes from, as run simulates it
    if host and vram is not None:
        raise UsageError(cpu_profile_takes_no_vram(hw))
    if name == DEMO:  # the demo's own budget, as run and chat use it
        vram = default_vram(name, vram, hw, None)
    if name == DEMO or any(v is not None for v in (prompt, prompt_file, max_new_tokens, chat)):
        # run's context for these prompt options; a --context they do not fit is refused as run refuses it
        new = max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        context = run_context(name, source, prompt, prompt_file, new, chat, context, cfg.context_limit)
    elif context is None:
        context = min(DEFAULT_PLAN_CONTEXT, cfg.context_limit)
    elif context > cfg.context_limit:
        raise UsageError(
            f"--context {context} is beyond the model's context of {cfg.context_limit} tokens; "
            f"use --context {cfg.context_limit} or less"
        )
    budget = parse_size(vram, "--vram") if vram is not None else hw.usable_memory
    storage = DTYPES[dtype] if dtype else cfg.dtype
    shape_model = build_model(arch, raw, context, source)
    if host:  # RAM beside the weights, KV cache and workspace (which the CPU keeps in RAM too)
        sizes = make_plan(shape_model, cfg, storage, 10**15, context, "lru", compute_tier="host")
        ram_bytes, ram_source = host_tier_ram(sizes, parse_size(ram, "--ram") if ram is not None else None)
        budget = ram_bytes
    else:
        ram_bytes, ram_source = (parse_size(ram, "--ram"), None) if ram is not None else default_ram()
    step = StepModel(shape_model, cfg, hw, storage, context)
    blocksize = saved_blocksize(source)
    total_experts = cfg.num_experts * len(cfg.moe_layers)
    host_experts_bytes = total_experts * step.expert_bytes
    rows = []
    for policy, cpu in PLAN_ROWS:
        if host and (policy == "hybrid" or cpu is not None):
            continue  # every expert runs on the CPU: nothing to pair with it (run refuses these)
        label = policy if cpu is None else f"{policy} (no cpu)"
        cpu_on = make_policy(policy, cpu).host_compute and not host
        tier = "host" if host else "device"
        try:
            if policy == "moespeq":
                ram_arg = None if host else ram_bytes
                p, est = plan_moespeq(
                    step, budget, cpu_on, blocksize, acceptance, ram_arg, compute_tier=tier, ram_source=ram_source
                )
            else:
                p = make_plan(
                    shape_model,
                    cfg,
                    storage,
                    budget,
                    context,
                    policy,
                    cpu_experts=cpu_on,
                    ram=None if host else ram_bytes,
                    ram_source=ram_source,
                    compute_tier=tier,
                    library_bytes=0 if host else library_bytes("mock", hw),
                    grouped_scratch=0 if host else grouped_scratch_bytes(hw, cfg, storage, context),
                )
                est = estimate(step, p, acceptance)
        except UsageError as e:
            rows.append({"policy": label, "fits": False, "reason": str(e)})
            continue
        rows.append(
            {
                "policy": label,
                "fits": True,
                "plan": p.to_dict(),
                "device_bytes": p.fixed_bytes + p.slot_bytes,
                "host_bytes": p.host_bytes,
                "disk_bytes": (p.total_experts - p.host_slots) * p.expert_bytes,
                "estimate": est.to_dict(),
                "note": p.note,
            }
        )
    held = max((r["plan"]["ram_held_bytes"] for r in rows if r["fits"]), default=0)
    report = {
        "model": name,
        "model_type": cfg.model_type,
        "config": source,
        "hardware": hw.name,
        "compute_tier": "host" if host else "device",
        "vram_bytes": None if host else budget,
        "ram_bytes": ram_bytes,
        "ram_source": ram_source,
        "experts_bytes": host_experts_bytes,
        # what RAM slots take for every expert (whole pages each, for reads that land in
        # place): a --ram of at least this holds them all, with no disk tier
        "experts_ram_bytes": total_experts * ram_slot_bytes(step.expert_bytes),
        "context_tokens": context,
        "dtype": str(storage).removeprefix("torch."),
        "acceptance_assumed": acceptance,
        "total_experts": total_experts,
        "expert_bytes": step.expert_bytes,
        "policies": rows,
        "budget_note": beyond_device(budget, hw) if vram is not None else None,
        # this machine's memory matters where the plan is for a run here: the default
        # hardware (what `run` simulates) or this CPU, not another machine's profile
        "ram_note": (
            beyond_memory(ram_bytes, held)
            if ram is not None and (host or hw.name == DEFAULT_HARDWARE)  # (the default, given or not)
            else None
        ),
        # the cpu backend then decodes from memory (engine.make_plan's plan None), as the rows do not say
        "cpu_note": (
            f"every expert fits in --ram {format_size(ram_bytes)}: `run --backend cpu` decodes from memory, without "
            "offloading or a draft; the rows are what the mock plans with this profile"
            if host and ram_bytes >= sizes.all_experts_ram_bytes
            else None
        ),
        "pricing_note": compact_pricing_note(cfg, hw, storage),
    }
    return report


def compact_pricing_note(cfg, hw, storage) -> str | None:
    """Said where the tok/s of compact experts (block FP8, MXFP4) is under-priced: on a GPU
    without a grouped GEMM each is charged the roofline of its stored bytes, not the
    unpacking its code does (docs/mock-backend.md), so a card with one (priced for what its
    code moves) reads slower than cards without."""
    from moespeq_cli.runtime.executors.grouped import profile_groups

    fmt = cfg.expert_format
    if hw.kind != "gpu" or not fmt.compact or profile_groups(hw, storage):
        return None
    return (
        f"this model's experts are stored {fmt.quant}: on {hw.name} (no grouped GEMM) each is priced at the "
        "roofline of its stored bytes, which leaves out unpacking them, so tok/s is optimistic and not comparable "
        "with a GPU that has one (h100-pcie); docs/mock-backend.md"
    )


def saved_blocksize(source: str) -> int:
    """The block size of the draft ``run --draft auto`` would load for a checkpoint (one
    `quantize` saved with other options), so that the plan sizes it; the default for a
    bundled config or where none is saved."""
    from pathlib import Path

    from moespeq_cli.errors import MoespeqError
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.quant.draft_store import draft_options
    from moespeq_cli.runtime.engine import EngineOptions

    default = EngineOptions.blocksize
    if not source.endswith("config.json"):
        return default
    try:
        return draft_options(Checkpoint(Path(source).parent), EngineOptions.quant_method, default)[1]
    except MoespeqError:  # no weights (a config-only pull): no draft either
        return default


def run_context(
    name: str,
    source: str,
    prompt,
    prompt_file,
    max_new_tokens: int,
    chat: bool | None,
    context: int | None = None,
    limit: int | None = None,
) -> int:
    """The context ``moespeq run`` plans for with these prompt options: the prompt's tokens
    (text piped on standard input as run reads it, else run's default prompt) plus
    ``max_new_tokens``, counted by run's own code with the model's tokenizer; ``context``
    (``--context``) where given, refused as run refuses it when they do not fit. Without
    a tokenizer (a bundled config) a given ``context`` is taken as it is, below the
    model's ``limit``."""
    from pathlib import Path

    from moespeq_cli.cli.run import encode_prompt, prompt_text
    from moespeq_cli.errors import MoespeqError, UsageError
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    engine, failed = None, None
    if source.endswith("config.json"):  # a checkpoint's folder, not a bundled config
        try:
            # reads no weight, and looks for no draft (``saved_blocksize`` does, once)
            engine = Engine(Path(source).parent, EngineOptions(backend="cpu", context=context, draft="none"))
        except MoespeqError as e:
            failed = e
    if engine is None and context is not None:  # a config alone: the context given, if -n leaves a prompt room
        if limit is not None and context > limit:
            raise UsageError(
                f"--context {context} is beyond the model's context of {limit} tokens; use --context {limit} or less"
            )
        if max_new_tokens >= context:
            raise UsageError(
                f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in --context {context}; "
                "raise --context or lower --max-new-tokens"
            )
        return context
    folder = Path(source).parent
    if failed is not None and context is None and any(folder.glob("*.safetensors")):
        raise failed  # more than a config (a weights file damaged, a tokenizer missing): what run would say
    if engine is None:
        raise UsageError(
            f"{name}: the prompt's tokens need the model's tokenizer and files, which a config alone lacks; "
            "give --context N instead of the prompt options"
        )
    text = prompt_text(name, prompt, prompt_file)
    ids = encode_prompt(engine, text, chat, max_new_tokens)
    return engine.context_for(len(ids), max_new_tokens)


def show_profiles(json_out: bool) -> None:
    """The bundled hardware profiles: name, device memory, link and memory bandwidth."""
    import json

    from moespeq_cli.errors import MoespeqError
    from moespeq_cli.runtime.engine import DEFAULT_HARDWARE
    from moespeq_cli.runtime.planning.hardware import (
        available_profiles,
        bundled_profiles,
        check_profiles_dir,
        format_size,
        load_profile,
    )

    check_profiles_dir()
    rows, unreadable = [], []
    bundled = bundled_profiles()
    for name in available_profiles():
        try:
            hw = load_profile(name)
        except MoespeqError as e:  # a calibration in the cache that no longer reads (an older version's, edited)
            if name in bundled:
                raise
            unreadable.append(f"{name} ({e})")
            continue
        rows.append(
            {
                "name": name,
                "kind": hw.kind,
                "device_memory_bytes": hw.device_memory,
                "link_bandwidth": hw.link_bandwidth,
                "mem_bandwidth": hw.mem_bandwidth,
                "default": name == DEFAULT_HARDWARE,
                "description": hw.description,
            }
        )
    if json_out:
        print(json.dumps({"profiles": rows, "unreadable": unreadable}))
        return
    for r in rows:
        mark = " (default)" if r["default"] else ""
        print(
            f"{r['name']:24} {format_size(r['device_memory_bytes']):>10}  link {r['link_bandwidth'] / 1e9:5.1f} GB/s  "
            f"memory {r['mem_bandwidth'] / 1e9:6.0f} GB/s  {r['description']}{mark}"
        )
    for line in unreadable:
        print(f"skipped: {line}", file=sys.stderr)
    if not any(r["name"].startswith("calibrated-") for r in rows):
        print("\nor a profile of this machine: moespeq calibrate (then --hardware calibrated-cpu), or --out mine.yaml")
