"""The host time the op count misses, measured on a model (``calibrate [--model CKPT]``).

The mock prices a region (an attention block, a router, one expert) by the kernels it
runs and the aten ops it dispatches (planning/costs.py), and a forward pass's code outside
every region by its ops and syncs. On a CPU the code costs more than that: Python runs
around each region (the forward hooks, the executor's loop, the attention module's own
logic) and between them (residual adds, routing, the scheduler, the sampler), and much of
it dispatches no op at all. Measured on this 2-core VM with the 791M Mixtral-shaped
checkpoint before this existed: an attention block took 0.52 ms against 0.28 ms priced,
and the code between regions 3.7 ms a token against 0.44 ms.

So ``calibrate --model CKPT`` (without ``--model``: the bundled demo model) decodes a few
tokens of that checkpoint for real (``--backend cpu``, or ``cuda`` on a GPU; the wall
clock, or on a GPU its events; the median of three decodes on one loaded engine) and on
the mock with the profile just measured, and writes each region kind's difference per
call into the profile's ``region_overhead`` (``layer``: the code between regions, per
layer of a forward pass). On a GPU that difference is the time the device waits for the
host: a decode step of a small batch is launch- and Python-bound there (measured on an
H200: two Mixtral-8x7B layers, every expert resident, 4.2 ms a token against 1.2 ms
priced by kernels and launches alone).
The runs hold every expert in RAM where it fits (8 GiB at most); the overheads are the
residual of the same run both ways, so whatever the mock already prices (kernels, ops,
reads) is not counted twice. A residual can be negative: the mock counts the ops of
torch's path, and on the cpu backend the CPU kernels dispatch fewer (a layer's attention
is one call there, about two dozen torch ops on the mock: on the demo, 4.6 ms measured
for 64 attention calls against 11.5 ms priced). Kept signed, it takes the op count's
excess back out; the mock never prices a region below its work without ops, and takes a
negative attention figure only from layers whose attention the kernels run in one call
(``kernels.modules.one_call_attention``): other families run their ops. (Until the
twenty-fourth session residuals were clamped at zero, and, with q, k and v priced as
three products, a profile calibrated on the demo predicted its decode at 0.64 of the
measured speed; 0.93 since.) They are measured on one model and apply to every model run
with the profile: the Python they stand for is moespeq's, the same for every family and
per layer about the same for every size (0.21 ms a layer on the 4-layer demo, 0.19 ms on
an 8-layer 791M checkpoint, on this VM). Where the checkpoint has a saved draft (``moespeq
quantize``), a speculative run each way measures the draft's expert regions too: in the
decode loop they took 1.06 ms a call on that checkpoint against 0.39 ms priced by the
4-bit kernel's curve (bitsandbytes' kernel, timed alone, runs between moespeq's own
kernels there, whose workers still spin on the cores).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

BETWEEN = "(between regions)"


def region_overheads(
    checkpoint: Path,
    figures: dict,
    say: Callable[[str], None],
    tokens: int = 16,
    ram_budget: int = 8 * 2**30,
    backend: str = "cpu",
) -> dict:
    """{region kind: host seconds a call beyond (negative: below) what the mock prices; "layer": the code
    between regions, per layer of a forward pass}, from ``tokens`` greedy tokens of
    ``checkpoint`` on the wall clock (``backend``: "cpu", or "cuda" priced by a gpu
    profile) and on the mock priced by ``figures`` (a profile without overheads), with
    every expert in RAM up to ``ram_budget`` bytes (beyond it the disk tier runs, priced
    alike both ways; on a GPU every expert the device's budget holds is resident)."""
    from moespeq_cli.cli.run import DEFAULT_PROMPT
    from moespeq_cli.errors import debug, one_line
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.quant.draft_store import saved_draft
    from moespeq_cli.runtime.bench import run_policy
    from moespeq_cli.runtime.engine import EngineOptions
    from moespeq_cli.runtime.planning.calibrate import profile_yaml
    from moespeq_cli.runtime.planning.hardware import parse_profile
    from moespeq_cli.runtime.tiers.disk import DiskExperts
    from moespeq_cli.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="moespeq-calibrate-") as tmp:
        path = Path(tmp) / "profile.yaml"
        path.write_text(profile_yaml({**figures, "region_overhead": {}}))
        hw = parse_profile(path)
    ckpt = Checkpoint(checkpoint)
    ids = Tokenizer(ckpt.path, ckpt.raw_config).encode(DEFAULT_PROMPT)
    ram = min(DiskExperts(ckpt).total_bytes, ram_budget)  # every expert, where RAM allows
    say(f"host time: decoding {checkpoint.name} for real, 3 times")
    # the median of three decodes on one loaded engine: this VM's speed wanders from one
    # second to the next (every expert is resident: a repeat starts as the first did)
    # a cuda run is priced by the profile being measured (without one it would calibrate)
    real_hw = hw if backend == "cuda" else None
    real = run_policy(
        checkpoint, ids, tokens, "lru", EngineOptions(backend=backend, hardware=real_hw, ram=ram), repeats=3
    )
    say(f"host time: decoding {checkpoint.name} on the mock")
    sim = run_policy(checkpoint, ids, tokens, "lru", EngineOptions(backend="mock", hardware=hw, ram=ram))
    measured = real.regions
    priced = sim.regions
    out = {}
    for kind, (count, seconds) in measured.items():
        if kind in (BETWEEN, "(stall)") or kind not in priced or not count:
            continue
        out[kind] = (seconds - priced[kind][1]) / count
    passes = priced.get("framework", [0, 0.0])[0]
    if passes:
        # per layer, not per pass: the code between regions runs once a layer (residual
        # adds, routing, the scheduler), so a profile measured on a 4-layer model prices a
        # 48-layer one (measured on this VM: 0.21 ms a layer on the 4-layer demo, 0.19 on
        # an 8-layer 791M checkpoint, where per pass they were 0.84 and 1.48 ms)
        wall, glue = between(measured, priced)
        out["layer"] = (wall - glue) / passes / ckpt.config.num_layers
    if saved_draft(ckpt.path, EngineOptions.quant_method, EngineOptions.blocksize) is not None:
        # the draft's own regions, from speculative runs (the draft's experts are regions
        # lru never runs), the median of three decodes each way as above: a first decode
        # pays the draft's first touches (its weights paged in, the kernels' packing), which
        # made one cold decode price a draft expert at 3.8 ms a call where the decode loop
        # takes 1.4; without a saved draft, quantizing one would take longer than all the
        # rest, so they stay priced by their kernel alone
        runs = []
        try:
            for kind, how in ((backend, "for real"), ("mock", "on the mock")):
                say(f"host time: the draft's experts, {how}, 3 times")
                o = EngineOptions(backend=kind, hardware=hw if kind == "mock" else real_hw, ram=ram, spec_depth=4)
                runs.append(run_policy(checkpoint, ids, tokens, "moespeq", o, repeats=3).regions)
        except Exception as e:  # noqa: BLE001 - the draft's figures are optional: the rest stands without them
            if debug():
                raise
            say(f"host time: the draft's experts not measured ({one_line(e, 120)})")
            return out  # priced by the 4-bit kernel's curve alone, as without a saved draft
        for kind, (count, seconds) in runs[0].items():
            if kind.startswith("draft") and kind in runs[1] and count:
                out[kind] = (seconds - runs[1][kind][1]) / count
    return out


def between(measured: dict, priced: dict) -> tuple[float, float]:
    """(seconds between regions on the wall clock, the mock's seconds for the same code),
    from two ``Timeline.breakdown``s of one run: the mock's are its regions the wall clock
    has no counterpart for (the framework, syncs, routing, submitting reads, waking)."""
    return measured.get(BETWEEN, [0, 0.0])[1], sum(s for kind, (_, s) in priced.items() if kind not in measured)
