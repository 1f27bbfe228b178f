"""A simulator priced from the code that runs: the mock charges every op the code
dispatched (counted, not hand-kept), the draft's cost follows its kernel's path, measured
kernel curves price what they measured, gate-prefetch's router is charged once,
prefetch precision stays a fraction, and `moespeq calibrate` writes a profile with which
the mock simulates `--backend cpu`."""

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from offload_helpers import prompt_for, run_engine, vram_for_slots

from moespeq_cli.kernels import modules
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.executors.instrument import charges
from moespeq_cli.runtime.executors.opcount import OpCounter, count_ops
from moespeq_cli.runtime.planning.costs import Cost, expert_cost
from moespeq_cli.runtime.planning.hardware import KernelCurve, load_profile
from moespeq_cli.runtime.sampling import SamplingParams

HW = load_profile("rtx3060-12gb")


def test_the_counter_tells_launches_views_casts_and_syncs():
    x = torch.randn(4, 8)
    w = torch.randn(16, 8).to(torch.bfloat16)

    def step():
        y = torch.nn.functional.linear(x, w.to(x.dtype))  # a cast, then a launch
        y.t()  # a view: nothing launched
        return int(torch.argmax(y))  # a launch, then reading it back: a launch and a sync

    _, c = count_ops(step)
    assert (c.ops, c.views, c.syncs) == (4, 1, 1)
    with torch.inference_mode(), OpCounter(skip_casts=True) as gpu:
        step()
    assert (gpu.ops, gpu.casts) == (3, 1)  # a GPU computing in bf16 does not run the cast

    scratch = torch.empty(16, 8)
    with torch.inference_mode(), OpCounter(skip_casts=True) as gpu:
        scratch.copy_(w)  # widened into a float32 scratch buffer (executors/experts.py): a cast
        scratch.copy_(x.repeat(4, 1))  # a copy of the same dtype: a launch
    assert (gpu.ops, gpu.casts) == (2, 1)


def test_every_op_of_a_pass_is_charged_once(tiny):
    """One decode pass on the mock under an independent counter: the ops the mock charged
    (its regions and the pass's glue) plus its own bookkeeping (copies, reads) are exactly
    what the code dispatched -- none missed, none charged twice."""
    path, _ = tiny("mixtral", "top3")
    prompt = prompt_for(21, 8)
    for policy in ("gate-prefetch", "lru", "hybrid"):
        _, eng = run_engine(path, prompt, 6, policy=policy, slots=5)
        b = eng.backend
        kv = eng.model.new_cache()
        eng.model(torch.tensor(prompt), kv)
        before, internal = len(b.timeline.intervals), b.counter.internal
        with torch.inference_mode(), OpCounter(skip_casts=True) as outer:
            eng.model(torch.tensor([7]), kv)
        charged = sum(iv.ops for iv in b.timeline.intervals[before:])
        assert outer.ops == charged + (b.counter.internal - internal), policy
        names = [iv.name for iv in b.timeline.intervals[before:]]
        assert names[-1] == "framework" and sum(n.startswith("attention") for n in names) == len(eng.model.model.layers)


@pytest.mark.parametrize(("family", "variant"), [("deepseek_v3", "v3"), ("glm4_moe", "base"), ("gemma4", "kv_eq")])
def test_every_module_the_plan_prices_is_charged_in_a_pass(tiny, family, variant):
    """The dense MLP of a first dense layer (DeepSeek-V3: three of 0.8 GB each) is in the
    table `plan` prices a step from, but the layer called its forward directly: its cost
    hooks never fired and the mock's clock left it out."""
    from moespeq_cli.runtime.executors.instrument import charges

    path, _ = tiny(family, variant)
    _, eng = run_engine(path, prompt_for(21, 8), 4, policy="lru", slots=64)
    b = eng.backend
    kv = eng.model.new_cache()
    eng.model(torch.tensor(prompt_for(21, 8)), kv)
    before = len(b.timeline.intervals)
    eng.model(torch.tensor([7]), kv)
    names = {iv.name for iv in b.timeline.intervals[before:]}
    priced = {name for _, name, *_ in charges(eng.model, 4)}
    assert any(n.startswith("mlp L") for n in priced) or family == "gemma4"
    assert priced <= names, sorted(priced - names)


@pytest.mark.parametrize(("family", "variant", "paired"), [("mixtral", "top3", True), ("phimoe", "base", False)])
def test_gate_prefetch_charges_the_router_once(tiny, family, variant, paired):
    """Each layer's router is charged once a pass. Paired (softmax routing): with the next
    layer's guess in its product, one region each; otherwise the guess is a region of its
    own (its router again, on this layer's input)."""
    path, _ = tiny(family, variant)
    prompt = prompt_for(22, 8)
    _, eng = run_engine(path, prompt, 8, policy="gate-prefetch", slots=6)
    ivs = eng.backend.timeline.intervals
    passes = sum(iv.name == "framework" for iv in ivs)
    layers = len(eng.model.moe_blocks)
    assert sum(iv.name.startswith("router L") for iv in ivs) == passes * layers  # the layer's own, once
    prefetched = [iv for iv in ivs if iv.name.startswith("gate-prefetch L")]
    assert all(iv.ops >= 1 for iv in prefetched)
    assert bool(prefetched) is not paired  # paired: the guess is in the router's region
    assert eng.target_exec.cache.stats.prefetches > 0


@pytest.mark.parametrize("policy", ["moespeq", "gate-prefetch", "lru"])
def test_prefetch_precision_is_a_fraction(tiny, policy):
    path, _ = tiny("qwen2_moe", "shared")
    cfg = Checkpoint(path).config
    for slots in (cfg.top_k, cfg.top_k + 2, 8):
        extra = {} if policy != "moespeq" else {"spec_depth": "3"}
        vram = vram_for_slots(path, slots, 40) + (10**6 if policy == "moespeq" else 0)
        eng = Engine(path, EngineOptions(backend="mock", policy=policy, vram=vram, **extra))
        eng.load(40)
        list(eng.generate(prompt_for(23, 10), 24, SamplingParams()))
        p = eng.last_stats.prefetch_precision
        assert p is None or 0.0 <= p <= 1.0, (policy, slots, p)


def test_the_drafts_cost_follows_its_kernels_path(tiny, monkeypatch):
    """The draft's modelled cost comes from the path ``QuantizedExperts.forward`` takes
    (bitsandbytes' packed CPU kernel, its CUDA GEMV, or dequantize-then-matmul): change the
    path and the cost changes; no constant stands in for it."""
    from moespeq_cli.quant.draft import QuantizedExperts

    path, _ = tiny("mixtral", "top3")
    eng = Engine(path, EngineOptions(backend="mock", policy="moespeq", spec_depth="2"))
    eng.load(30)
    d = eng.draft_exec
    cuda = d.cost(0, 1, 1, "cuda")
    reference = d.cost(0, 1, 1, "cpu")  # these shapes do not suit the packed kernel
    assert cuda.kernel == "draft:cuda" and reference.kernel == "draft:reference"
    assert reference.seconds(HW) > cuda.seconds(HW)  # the dequantized weights stream through memory too
    monkeypatch.setattr(QuantizedExperts, "path", lambda self, key, device_type: "packed")
    packed = d.cost(0, 1, 1, "cpu")
    assert packed.kernel == "draft:packed" and packed.seconds(HW) == pytest.approx(cuda.seconds(HW))
    curve = KernelCurve((1, 4), (1e3, 1e6), ((1e-3, 2e-3), (5e-3, 9e-3)), ops=6)
    measured = replace(HW, kernels={"draft:packed": curve})
    assert packed.seconds(measured, ops=6) == pytest.approx(curve.seconds(1, packed.weight_bytes))


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_plan_prices_the_draft_as_the_mock_prices_the_loaded_one(tiny, kind):
    """``moespeq plan`` prices a draft expert before any draft exists by the path its code
    will take (``planned_path``): the same path, bytes and measured curve the mock charges
    for the loaded draft's expert, and the same measured host time of its region."""
    from moespeq_cli.quant.draft import planned_path
    from moespeq_cli.runtime.planning.estimate import StepModel

    path, _ = tiny("mixtral", "top3")
    ck = Checkpoint(path)
    cfg = ck.config
    hw = HW if kind == "gpu" else replace(HW, name="a-cpu", kind="cpu", disk_bandwidth=1e9, disk_latency=1e-4)
    eng = Engine(path, EngineOptions(backend="mock", policy="moespeq", spec_depth="2", hardware=hw))
    eng.load(30)
    device = "cuda" if kind == "gpu" else "cpu"
    loaded = eng.draft_exec.quant.path((0, 1), device)
    assert planned_path(device, cfg.hidden_size, cfg.expert_intermediate, eng.draft_exec.quant.blocksize) == loaded
    # a measured curve of that kernel, 10 ms a call, and 2 ms of the region's own Python
    curve = KernelCurve((1, 4), (1e3, 1e9), ((1e-2, 1e-2), (1e-2, 1e-2)), ops=8)
    measured = replace(hw, kernels={f"draft:{loaded}": curve}, region_overhead={"draft expert": 2e-3})
    with torch.device("meta"):
        model = ck.arch.Model(ck.raw_config)
    step = StepModel(model, cfg, measured, cfg.dtype, 30)
    mock = eng.draft_exec.cost(0, 1, 1, device).seconds(measured) + measured.host_overhead("draft expert")
    assert step.t_draft_expert(1.0) == pytest.approx(mock) == pytest.approx(12e-3)
    eng.close()


def test_a_smaller_weight_is_never_priced_above_a_larger_one(monkeypatch):
    """A calibration beside a busy process put a 1.6 MB weight at 6.95 ms and a 7.3 MB one
    at 0.40 (a measurement the machine interrupted): a smaller weight's figure is at most
    the larger's, at every token count, in every curve measured."""
    import moespeq_cli.runtime.planning.calibrate as cal

    monkeypatch.setattr(cal, "SHAPES", ((64, 128), (128, 256)))
    monkeypatch.setattr(cal, "COLD_BYTES", 1)
    monkeypatch.setattr(cal, "TOKENS", (1, 2))

    def timed(call, *a, **k):  # the large shape: a second a token; the small one's interrupted: 50 s
        x = call.__defaults__[0]
        return 50.0 if x.shape[1] == 64 else float(x.shape[0])

    monkeypatch.setattr(cal, "timed", timed)
    monkeypatch.setattr(cal, "spikes", lambda row: [])
    curves = cal.kernel_curves(torch.device("cpu"), lambda s: None)
    assert curves
    for c in curves.values():
        (small, large), ratio = c["seconds"], c["sizes"][0] / c["sizes"][1]
        assert large == [float(t) for t in c["tokens"]], c
        assert small == pytest.approx([t * ratio for t in large]), c  # the larger's, scaled: growing with bytes
    assert cal.at_most_larger([[1.0, 9.0], [2.0, 3.0]], [1, 2]) == [[1.0, 1.5], [2.0, 3.0]]


def test_kernel_curves_price_what_they_measured():
    curve = KernelCurve((1, 2, 4), (1e6, 3e6), ((1e-4, 1.5e-4, 2e-4), (3e-4, 4e-4, 6e-4)), ops=5)
    assert curve.seconds(1, 1e6) == pytest.approx(1e-4) and curve.seconds(4, 3e6) == pytest.approx(6e-4)
    assert curve.seconds(3, 2e6) == pytest.approx((1.75e-4 + 5e-4) / 2)  # between tokens and sizes
    assert curve.seconds(8, 3e6) == pytest.approx(6e-4 + (8 - 4) * 1e-4)  # beyond: the last slope
    hw = replace(
        HW,
        kernels={
            "expert:bfloat16:float32": curve,
            "expert:bfloat16:float32@busy": replace(curve, times=((2e-4,) * 3, (8e-4,) * 3)),
        },
    )
    c = expert_cost(400, 1000, 2, 2, "expert:bfloat16:float32", ops=7)  # 2.4 MB of weights: within the curve
    w = c.weight_bytes
    assert c.seconds(hw, ops=7) == pytest.approx(
        curve.seconds(2, w) + 2 * hw.launch_overhead
    )  # 2 ops beyond the curve's
    assert c.seconds(hw, ops=7, busy=True) > c.seconds(hw, ops=7)  # the curve measured while the disk read
    plain = Cost(1e9, 1e6) + Cost(1e6, 1e9)
    assert plain.seconds(HW, ops=0) == pytest.approx(1e9 / HW.peak_flops + 1e9 / HW.mem_bandwidth)  # each on its own


def test_a_queue_curve_that_dips_is_drift_and_is_pooled():
    from moespeq_cli.runtime.planning.calibrate import non_decreasing

    assert non_decreasing([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert non_decreasing([1.58, 0.98, 1.68, 1.28]) == pytest.approx([1.28, 1.28, 1.48, 1.48])
    assert non_decreasing([2.0, 1.0]) == [1.5, 1.5]


def test_calibration_reads_spans_spread_over_the_models_file():
    # as the disk tier reads experts across a checkpoint; adjacent spans at the file's
    # start measured this VM's disk 17% slower than the runs then read it
    from moespeq_cli.runtime.planning import calibrate as cal
    from moespeq_cli.runtime.tiers.disk import BLOCK

    size = 1_582_498_592  # the disk-tier benchmark's checkpoint
    spans = cal.spans_of(("model.safetensors", size))
    offsets = [s.span.offset for s in spans]
    assert len(spans) == cal.DISK_FILE_BYTES // cal.DISK_EXTENT
    assert all(o % BLOCK == 0 and o + cal.DISK_EXTENT <= size for o in offsets)
    assert offsets[0] == 0 and offsets[-1] > size - 2 * cal.DISK_EXTENT  # the whole file, not its first 256 MiB
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    assert min(gaps) > cal.DISK_EXTENT and max(gaps) - min(gaps) <= BLOCK  # even, and no two adjacent
    small = cal.spans_of(("f", 2 * cal.DISK_EXTENT))  # the smallest file calibration accepts
    assert [s.span.offset for s in small] == [0, cal.DISK_EXTENT]


def test_the_disk_is_timed_by_its_reads_own_intervals(monkeypatch):
    # as a run's "disk during run" is (bench.queue_curve): a pass's wall time also held the
    # hand-over to the I/O threads and the last reads' tail with fewer in flight, which
    # put 4 reads in flight at 0.84x their rate on this VM
    from moespeq_cli.runtime.planning import calibrate as cal
    from moespeq_cli.runtime.tiers import disk

    took = 0.01  # each read's own time, on a clock of the fake's; the wall clock hardly moves

    class Reader:
        direct = True

        def __init__(self, threads):
            self.threads, self.free = threads, [0.0] * threads

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, placement, dest, done=None):
            i = min(range(self.threads), key=lambda t: self.free[t])  # the thread free first
            start, self.free[i] = self.free[i], self.free[i] + took
            if done is not None:
                done(start, self.free[i])
            return type("Read", (), {"wait": lambda self: None})()

        def read_into(self, extents, dest):
            pass

    monkeypatch.setattr(disk, "DiskReader", Reader)
    monkeypatch.setattr(cal, "landing", lambda n: [None] * n)
    figures = cal.disk_figures(("f", 1 << 30), 4, lambda s: None, rounds=2)
    rate = cal.DISK_EXTENT / took
    assert figures["disk_queue_bandwidth"] == pytest.approx([rate, 2 * rate, 3 * rate, 4 * rate])
    assert figures["disk_bandwidth"] == pytest.approx(4 * rate)


def test_a_kernel_timing_above_a_larger_batchs_is_timed_again():
    """A slow moment of the machine at one batch size (seen: 70 ms for a 0.2 ms kernel)
    would be pooled into every larger batch; such points are found and re-timed."""
    from moespeq_cli.runtime.planning.calibrate import spikes

    assert spikes([1.0, 1.1, 1.2, 2.0]) == []
    assert spikes([1.0, 1.2, 70.0, 1.3, 1.5]) == [2]
    assert spikes([3.0, 1.0, 1.1]) == [0]


def test_the_disk_a_run_saw_comes_from_its_reads():
    """What the disk served with 1, 2, .. reads in flight, from a run's read intervals."""
    from moespeq_cli.runtime.bench import queue_curve
    from moespeq_cli.runtime.timeline import Interval

    def read(start, end, nbytes):
        return Interval("disk", "read", "r", start, end, 0, 0, nbytes, "target")

    # alone 0-1 s at 100 B/s; then two at once for 1 s at 60 B/s each
    reads = [read(0.0, 1.0, 100), read(2.0, 3.0, 60), read(2.0, 3.0, 60)]
    assert queue_curve(reads, 4) == pytest.approx([100, 120, 120, 120])  # depths never reached: the nearest
    assert queue_curve([read(0.0, 1.0, 100), read(0.0, 2.0, 100)], 2) == pytest.approx([50, 150])
    dip = [read(0.0, 1.0, 100), read(2.0, 4.0, 60), read(2.0, 4.0, 60)]  # alone 100 B/s, two 60 B/s together
    assert queue_curve(dip, 2) == pytest.approx([80, 80])  # pooled: a dip is drift
    assert queue_curve([], 4) is None


def test_a_cpu_profile_prices_dense_layers_as_the_cpu_backend_runs_them(tiny):
    """With a cpu profile the mock simulates --backend cpu, whose dense layers compute
    through the CPU kernels on the checkpoint's bf16 weights: the LM head is priced by
    that kernel's curve (``linear:bfloat16:float32``), not by float32 weights'."""
    from moespeq_cli import kernels

    if not kernels.available():
        pytest.skip(f"no CPU kernels here: {kernels.why_unavailable()}")
    path, _ = tiny("mixtral", "wide", dtype=torch.bfloat16)
    slow = KernelCurve((1, 16), (1.0, 1e12), ((1.0, 1.0), (1.0, 1.0)), ops=1)  # one second a call
    cpu = replace(HW, name="a-cpu", kind="cpu", disk_bandwidth=1e9, disk_latency=1e-4)
    for kernel, expect_slow in (("linear:bfloat16:float32", True), ("linear:float32", False)):
        eng = Engine(path, EngineOptions(backend="mock", hardware=replace(cpu, kernels={kernel: slow})))
        eng.load(16)
        list(eng.generate(prompt_for(5, 4), 2, SamplingParams()))
        heads = [iv.duration for iv in eng.backend.timeline.intervals if iv.name == "lm_head"]
        eng.close()
        assert heads and all((d >= 1.0) == expect_slow for d in heads), kernel


def test_each_expert_layout_is_priced_by_its_own_kernels_curve(tiny, tmp_path):
    """gpt-oss's experts, as bf16 and as published (MXFP4), and block-FP8 experts run kernels
    of their own: a cpu profile prices them by those kernels' curves, not the SwiGLU one's."""
    from tiny_models import fp8_copies, mxfp4_copy

    from moespeq_cli.models.expert_format import HF_EXPERTS, fp8_experts
    from moespeq_cli.runtime.planning.calibrate import other_formats
    from moespeq_cli.runtime.planning.costs import expert_kernel

    oss, _ = tiny("gpt_oss", "mx")
    fp8, _ = fp8_copies(tiny("qwen3_moe", "base")[0], tmp_path / "fp8")
    paths = [oss, mxfp4_copy(oss, tmp_path / "mx"), fp8]
    names = [expert_kernel(f, torch.bfloat16, torch.float32) for f in other_formats()]
    assert names == [
        "expert:gpt_oss:bfloat16:float32",
        "expert:gpt_oss-mxfp4:bfloat16:float32",
        "expert:fp8:bfloat16:float32",
    ]
    assert expert_kernel(fp8_experts(HF_EXPERTS, (128, 128)), torch.bfloat16, torch.float32) == names[2]
    slow = KernelCurve((1, 16), (1.0, 1e12), ((1.0, 1.0), (1.0, 1.0)), ops=1)  # one second a call
    cpu = replace(HW, name="a-cpu", kind="cpu", disk_bandwidth=1e9, disk_latency=1e-4)
    for path, name in zip(paths, names, strict=True):
        c = Checkpoint(path).config  # the tiny checkpoints are float32: the curve of float32 weights
        mine = expert_kernel(c.expert_format, c.dtype, torch.float32)
        assert mine.rsplit(":", 2)[0] == name.rsplit(":", 2)[0]
        for kernel, expect_slow in ((mine, True), ("expert:float32:float32", False)):
            hw = replace(cpu, kernels={kernel: slow})
            eng = Engine(path, EngineOptions(backend="mock", policy="lru", hardware=hw))
            eng.load(16)
            assert eng.target_exec.kernel == mine
            list(eng.generate(prompt_for(5, 4), 2, SamplingParams()))
            experts = [iv.duration for iv in eng.backend.timeline.intervals if iv.name.startswith("expert L")]
            eng.close()
            assert experts and all((d >= 1.0) == expect_slow for d in experts), (path.name, kernel)


def test_profiles_refuse_malformed_curves(tmp_path):
    from moespeq_cli.errors import UsageError

    base = load_profile("rtx3060-12gb").source and open(load_profile("rtx3060-12gb").source).read()
    cases = {
        "kind: tpu": "kind",
        "kernels: [1, 2]": "kernels",
        "kernels: {linear:float32: {tokens: [2, 1], sizes: [1, 2], seconds: [[1, 1], [1, 1]]}}": "ascending",
        "kernels: {linear:float32: {tokens: [1], sizes: [1, 2], seconds: [[1], [1, 2]]}}": "seconds",
        "kernels: {linear:float32: {tokens: [1], sizes: [2, 1], seconds: [[1], [1]]}}": "sizes",
        "kernels: {linear:float32: {tokens: [1], sizes: [1, 2], seconds: [[-1], [1]]}}": "seconds",
        # a misspelt curve was never looked up: the roofline priced that kernel without a word
        "kernels: {expert:bfloat16:float32x: {tokens: [1], sizes: [1, 2], seconds: [[1], [1]]}}": "not a kernel",
        "host_kernels: {x: {tokens: [1], sizes: [1, 2], seconds: [[1], [1]]}}": "not a kernel",
        # YAML keeps the last of a repeated key: a second link_bandwidth changed every figure silently
        "link_bandwidth: 1.0e+9": "given twice",
        "disk_queue_bandwidth: [1e9, nan]": "disk_queue_bandwidth",
        "region_overhead: [1, 2]": "region_overhead",
        "region_overhead: {attention: -2}": "region_overhead",
        "disk_read_cpu: 1": "disk_read_cpu",
        "grouped_gemm: true": "grouped_gemm",
        "grouped_gemm: [int8]": "grouped_gemm",
    }
    for extra, word in cases.items():
        p = tmp_path / "p.yaml"
        p.write_text(base + "\n" + extra + "\n")
        with pytest.raises(UsageError, match=word):
            load_profile(str(p))
    good = "kernels: {expert:gpt_oss-mxfp4:bfloat16:float32@busy: {tokens: [1], sizes: [1, 2], seconds: [[1], [1]]}}"
    p.write_text(base + "\n" + good + "\n")
    assert load_profile(str(p)).kernels
    # a size YAML leaves as text (1.2e10: no dot before the exponent's sign) is a number of bytes
    p.write_text(re.sub(r"(?m)^device_memory:.*$", "device_memory: 1.2e10", base))
    assert load_profile(str(p)).device_memory == 12 * 10**9
    p.write_text(re.sub(r"(?m)^device_memory:.*$", "device_memory: -12GiB", base))
    with pytest.raises(UsageError, match="p.yaml: cannot read device_memory '-12GiB' as a size; write it like 12GB"):
        load_profile(str(p))
    p.write_text(re.sub(r"(?m)^device_memory:.*$", "device_memory: 12G", base))
    with pytest.raises(UsageError, match=r"write 12GB \(powers of 10\) or 12GiB"):
        load_profile(str(p))
    # messages name an edited copy's file, not only the name it was copied with
    assert load_profile("rtx3060-12gb").called == "rtx3060-12gb"
    p.write_text(base)
    assert load_profile(str(p)).called == f"rtx3060-12gb ({p})"


def test_calibrate_writes_a_profile_the_mock_simulates_the_cpu_with(tiny, cli, tmp_path):
    """`moespeq calibrate` measures this machine (under a minute), and the profile it
    writes loads with --hardware: the mock then plans RAM as the compute tier and reads
    from disk, giving the cpu reference's tokens."""
    out = tmp_path / "mine.yaml"
    r = cli("calibrate", "--out", str(out), "--disk-dir", str(tmp_path), "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["profile"] == str(out) and summary["kind"] in ("cpu", "gpu")
    text = out.read_text()
    assert "measured 20" in text and "expert:bfloat16:float32" in text
    assert not list(tmp_path.glob(".moespeq-calibrate-*"))  # its scratch file is gone
    hw = load_profile(str(out))
    assert hw.kernels["linear:float32"].ops >= 1 and len(hw.disk_queue_bandwidth) == 4
    # the host time the op count misses, measured without --model on the bundled demo
    assert "decoding the bundled demo model" in text and {"attention", "layer"} <= set(hw.region_overhead)
    q = hw.disk_queue_bandwidth
    assert all(a <= b for a, b in zip(q, q[1:], strict=False))  # made non-decreasing: dips are drift
    blocked, lost = zip(*hw.read_wake_curve, strict=True)  # what waiting on a read costs, by how long
    assert len(blocked) >= 3 and all(a < b for a, b in zip(blocked, blocked[1:], strict=False))
    assert all(a <= b for a, b in zip(lost, lost[1:], strict=False)) and lost[-1] < 0.1
    # a read's CPU time, a line over sizes: per read and per byte, neither negative
    assert hw.read_cpu_overhead is not None and hw.read_cpu_overhead >= 0 and hw.disk_read_cpu >= 0
    assert 0 < hw.read_cpu(2**20) < 0.1
    if hw.kind != "cpu":
        pytest.skip("a GPU machine: its profile is a gpu one")
    path, _ = tiny("mixtral", "wide")
    prompt = prompt_for(24, 8)
    expected, _ = run_engine(path, prompt, 12, backend="cpu")
    from test_disk_offload import disk_run, ram_for

    got, eng = disk_run(path, prompt, 12, "lru", ram_for(path, 6), backend="mock", hardware=str(out))
    assert got == expected
    assert eng.plan.compute_tier == "host" and eng.plan.disk_tier and eng.last_stats.clock == "virtual"
    bad = cli("run", str(path), "-n", "2", "--backend", "mock", "--hardware", str(out), "--vram", "1GB")
    assert bad.exit_code == 2 and "kind: cpu" in bad.stderr
    # bench with it: the budget is --ram (no --vram handed on), and no hybrid by default
    r = cli("bench", str(path), "-n", "2", "--hardware", str(out), "--ram", str(ram_for(path, 6)), "--json")
    assert r.exit_code == 0, r.stderr
    assert [row["policy"] for row in json.loads(r.stdout)["results"]] == [
        "moespeq",
        "gate-prefetch",
        "lru",
        "ondemand",
    ]


def test_cuda_runs_price_this_gpu_from_a_cached_calibration(monkeypatch):
    """With CUDA and no --hardware a run prices the GPU it runs on: calibrated once, then
    read from moespeq's cache (a different GPU gets its own)."""
    import types

    from moespeq_cli.runtime.planning import calibrate as cal

    gpu = {"name": "NVIDIA H200"}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(name=gpu["name"]))
    calls = []

    def measure(disk_dir, cuda=True, say=None):
        calls.append(gpu["name"])
        hw = load_profile("h100-pcie")
        figures = {k: getattr(hw, k) for k in cal.METHODS if k != "disk_queue_bandwidth"}
        return figures | {
            "name": "calibrated-gpu",
            "description": f"{gpu['name']} (calibrated)",
            "kind": "gpu",
            "disk_queue_bandwidth": [1e9, 2e9],
            "kernels": {},
            "blas_workspace": 33 * 2**20,
        }

    first = cal.cached_gpu_profile(measure=measure)
    again = cal.cached_gpu_profile(measure=measure)
    assert calls == ["NVIDIA H200"] and first == again and first.description == "NVIDIA H200 (calibrated)"
    assert first.grouped_gemm == ("bfloat16",)  # which path the GPU takes survives the cache
    assert first.blas_workspace == 33 * 2**20  # and what cuBLAS holds, which the plan counts
    gpu["name"] = "NVIDIA GeForce RTX 4090"
    assert cal.cached_gpu_profile(measure=measure).description.startswith("NVIDIA GeForce RTX 4090")
    assert len(calls) == 2
    # measured while other processes took the CPU: used for this run, not cached for every later one
    gpu["name"] = "NVIDIA L40S"
    busy = lambda *a, **k: measure(*a, **k) | {"_other_load": 0.5}  # noqa: E731
    assert cal.cached_gpu_profile(measure=busy).description.startswith("NVIDIA L40S")
    assert cal.cached_gpu_profile(measure=measure).description.startswith("NVIDIA L40S")
    assert calls[2:] == ["NVIDIA L40S", "NVIDIA L40S"]  # calibrated again: the busy one was not kept


class _NoReader:
    threads = 1

    def read(self, what, dst) -> None:
        pass


def test_a_read_takes_its_cpu_time_from_the_compute_it_overlaps():
    """On a cpu profile a read costs ``disk_read_cpu`` seconds a byte of CPU when it
    starts: compute running then is delayed by as much; a read that starts while the
    compute stream waits costs nothing."""
    from moespeq_cli.runtime.backends.mock import MockBackend

    cpu = replace(HW, kind="cpu", disk_bandwidth=1e6, disk_latency=0.0, disk_read_cpu=1e-7)  # 0.1 s a MB
    ten_ms = Cost(cpu.peak_flops * 0.01, 0.0, 0)
    b = MockBackend(cpu, 1 << 30, reader=_NoReader())
    b.read(None, None, 10**6, "read", 0, 0)  # starts now, lands after 1 s
    b.end(b.begin(), ten_ms, "expert L0.E0", 0, 0)
    assert b.t_compute == pytest.approx(0.11)  # the region ran while the read started: its CPU time added
    b.end(b.begin(), ten_ms, "expert L0.E1", 0, 1)
    assert b.t_compute == pytest.approx(0.12)  # charged once
    ev = b.read(None, None, 10**6, "read", 0, 2)  # queued behind the first: starts at 1 s
    b.wait(ev)  # the stream waits until 2 s: the read's start fell in the wait
    b.end(b.begin(), ten_ms, "expert L0.E2", 0, 2)
    assert b.t_compute == pytest.approx(ev.time + 0.01)
    b.read(None, None, 10**6, "read", 0, 3)  # starts at 2 s, while the host code between kernels runs:
    t = b.t_compute
    b.t_compute = b._until(t, 0.01, kernels=False)  # a core is free for it
    assert b.t_compute == pytest.approx(t + 0.01)
    b.end(b.begin(), ten_ms, "expert L0.E3", 0, 3)
    assert b.t_compute == pytest.approx(t + 0.02)  # and it is not charged to the next kernel either
    none = MockBackend(replace(cpu, disk_read_cpu=0.0), 1 << 30, reader=_NoReader())
    none.read(None, None, 10**6, "read", 0, 0)
    none.end(none.begin(), ten_ms, "expert L0.E0", 0, 0)
    assert none.t_compute == pytest.approx(0.01)
    # a kernel priced by a curve measured with reads running beside it (calibrate's
    # NAME@busy) holds their CPU time already: charged once, by the curve
    from moespeq_cli.runtime.planning.hardware import KernelCurve

    def flat(s):
        return KernelCurve((1,), (1.0, 2.0), ((s,), (s,)))

    curves = replace(cpu, kernels={"k": flat(0.01), "k@busy": flat(0.02)})
    kernel = Cost(0.0, 0.0, 0, kernel="k", weight_bytes=1.0)
    busy = MockBackend(curves, 1 << 30, reader=_NoReader())
    busy.read(None, None, 10**6, "read", 0, 0)
    busy.end(busy.begin(), kernel, "expert L0.E0", 0, 0)
    assert busy.t_compute == pytest.approx(0.02)  # the busy curve, no read CPU on top (a profile from before)
    idle = MockBackend(curves, 1 << 30, reader=_NoReader())
    idle.end(idle.begin(), kernel, "expert L0.E0", 0, 0)
    assert idle.t_compute == pytest.approx(0.01)  # no read in flight: the quiet curve
    # a profile that measured the reads' CPU per read leaves it out of its busy curves:
    # a read starting beside a busy-priced kernel adds its own, per read and per byte
    now = replace(curves, read_cpu_overhead=0.005)
    busy = MockBackend(now, 1 << 30, reader=_NoReader())
    busy.read(None, None, 10**6, "read", 0, 0)
    busy.read(None, None, 10**6, "read", 0, 1)  # queued behind the first: starts at 1 s
    busy.end(busy.begin(), kernel, "expert L0.E0", 0, 0)
    assert busy.t_compute == pytest.approx(0.02 + 0.005 + 0.1)  # the first read's; the second starts later
    assert now.read_cpu(10**6) == pytest.approx(0.105) and replace(cpu, read_cpu_overhead=None).read_cpu(10) == 1e-6


def test_the_compute_thread_pays_to_submit_a_read_and_to_wake_after_waiting_for_one():
    from moespeq_cli.runtime.backends.mock import MockBackend

    cpu = replace(
        HW, kind="cpu", disk_bandwidth=1e6, disk_latency=0.0, read_submit_overhead=0.01, read_wake_overhead=0.02
    )
    b = MockBackend(cpu, 1 << 30, reader=_NoReader())
    ev = b.read(None, None, 10**6, "read", 0, 0)
    assert b.t_compute == pytest.approx(0.01) and ev.time == pytest.approx(1.01)  # handed over in 10 ms, then read
    b.wait(ev)
    assert b.t_compute == pytest.approx(1.03)  # awake again 20 ms after it landed
    ev = b.read(None, None, 10, "read", 0, 1)
    b.t_compute = ev.time + 1.0
    before = b.t_compute
    b.wait(ev)  # landed long ago: no wait, nothing to wake from
    assert b.t_compute == before
    names = [iv.name for iv in b.timeline.intervals]
    assert names.count("submit read") == 2 and names.count("wake") == 1


def test_waking_costs_more_the_longer_the_thread_was_blocked():
    """A calibrated ``read_wake_curve`` prices the wake by how long the compute thread
    waited (a CPU idle longer comes back colder): interpolated between its points, held
    at its ends, and it replaces the single figure. The disk-tier checkpoint's 22 MB reads
    block about 10 ms, a Qwen3-shaped one's 2.4 MB about 1 ms: one figure measured after
    the first priced the second's ``ondemand`` 1.3 s over 64 tokens too slow."""
    from moespeq_cli.runtime.backends.mock import MockBackend

    curve = ((1e-3, 1e-4), (1e-2, 1e-3))
    cpu = replace(HW, kind="cpu", disk_bandwidth=1e8, disk_latency=0.0, read_wake_overhead=0.5, read_wake_curve=curve)
    assert cpu.read_wake(1e-4) == 1e-4 and cpu.read_wake(1.0) == 1e-3  # held at the ends
    assert cpu.read_wake(5.5e-3) == pytest.approx(5.5e-4)

    def woken_after(nbytes: int, busy: float = 0.0) -> float:
        b = MockBackend(cpu, 1 << 30, reader=_NoReader())
        ev = b.read(None, None, nbytes, "read", 0, 0)
        b.t_compute += busy  # the thread computed this long before it waited
        b.wait(ev)
        return b.t_compute - ev.time

    assert woken_after(10**5) == pytest.approx(1e-4)  # blocked 1 ms
    assert woken_after(5 * 10**5) == pytest.approx(5e-4)  # blocked 5 ms
    assert woken_after(10**6, busy=5e-3) == pytest.approx(5e-4)  # a 10 ms read, 5 ms of it waited for
    assert woken_after(10**7) == pytest.approx(1e-3)  # blocked 100 ms
    assert replace(cpu, read_wake_curve=()).read_wake(1e-3) == 0.5  # no curve: the single figure


@pytest.mark.parametrize(
    "curve, says",
    [
        ("{blocked: [0.001, 0.01], seconds: [0.0001, 0.001]}", None),
        ("{blocked: [0.01, 0.001], seconds: [0.0001, 0.001]}", "ascending"),
        ("{blocked: [0.001, 0.01], seconds: [0.0001]}", "as many"),
        ("{blocked: [0.001], seconds: [5.0]}", "from 0 to 1"),
        ("{blocked: [0.001]}", "blocked and seconds"),
        ("[0.001, 0.0001]", "blocked and seconds"),
    ],
)
def test_a_profiles_wake_curve_is_checked(tmp_path, curve, says):
    from moespeq_cli.errors import UsageError
    from moespeq_cli.runtime.planning.hardware import parse_profile

    src = (Path(__file__).resolve().parents[1] / "moespeq_cli" / "profiles" / "rtx3060-12gb.yaml").read_text()
    p = tmp_path / "p.yaml"
    p.write_text(src + f"\nread_wake_curve: {curve}\n")
    if says is None:
        assert parse_profile(p).read_wake_curve == ((0.001, 0.0001), (0.01, 0.001))
        return
    with pytest.raises(UsageError, match=says):
        parse_profile(p)


def test_measured_region_overheads_are_charged_per_call(tiny):
    """A profile's ``region_overhead`` (host time a region costs beyond its priced work,
    measured by calibrate) is added to every call of that region kind, ``layer`` to every
    forward pass's glue once for each layer the pass ran, and ``pass`` (profiles written
    before) once a pass."""
    path, _ = tiny("mixtral", "wide")
    layers = Checkpoint(path).config.num_layers
    assert layers > 1
    cpu = replace(HW, name="a-cpu", kind="cpu", disk_bandwidth=1e9, disk_latency=1e-4)
    runs = {}
    for extra in ({}, {"attention": 0.5, "layer": 0.25, "pass": 2.0}):
        eng = Engine(path, EngineOptions(backend="mock", hardware=replace(cpu, region_overhead=extra)))
        eng.load(16)
        list(eng.generate(prompt_for(5, 4), 3, SamplingParams()))
        runs[bool(extra)] = {
            kind: [iv.duration for iv in eng.backend.timeline.intervals if iv.name.startswith(kind)]
            for kind in ("attention", "framework", "router")
        }
        eng.close()
    plain, charged = runs[False], runs[True]
    assert all(b - a == pytest.approx(0.5) for a, b in zip(plain["attention"], charged["attention"], strict=True))
    # below the op count's price (the real backend dispatched fewer ops): taken back out,
    # never below the region's work without ops
    eng = Engine(path, EngineOptions(backend="mock", hardware=replace(cpu, region_overhead={"attention": -1.0})))
    eng.load(16)
    list(eng.generate(prompt_for(5, 4), 3, SamplingParams()))
    below = [iv for iv in eng.backend.timeline.intervals if iv.name.startswith("attention")]
    module, _, _, cost, _ = charges(eng.model, 4)[0]
    assert module is eng.model.model.layers[0].attn
    least = cost(1, 1).seconds(cpu, ops=0)  # the smallest work an attention call does here
    assert all(least * (1 - 1e-9) <= iv.duration < a for iv, a in zip(below, plain["attention"], strict=True))
    eng.close()
    glue = 2.0 + 0.25 * layers
    assert all(b - a == pytest.approx(glue) for a, b in zip(plain["framework"], charged["framework"], strict=True))
    assert plain["router"] == pytest.approx(charged["router"])  # no figure: nothing added


def test_calibrate_measures_the_host_time_the_op_count_misses(tiny, monkeypatch, tmp_path):
    """``region_overheads`` decodes the checkpoint for real and on the mock: time the real
    attention spends that the mock cannot see (a 5 ms sleep: no op at all, no virtual
    time) shows as that region's overhead, and the figures round-trip through a profile."""
    import dataclasses

    from moespeq_cli.runtime.planning.calibrate import profile_yaml
    from moespeq_cli.runtime.planning.hardware import parse_profile
    from moespeq_cli.runtime.planning.overheads import region_overheads

    path, _ = tiny("mixtral", "wide")
    cpu = replace(HW, name="a-cpu", kind="cpu", disk_bandwidth=1e9, disk_latency=1e-4, disk_queue_bandwidth=(1e9,))
    figures = {k: v for k, v in dataclasses.asdict(cpu).items() if k not in ("kernels", "host_kernels", "source")}
    base = region_overheads(path, figures, say=lambda s: None, tokens=4)
    assert {"attention", "expert", "layer"} <= set(base) and all(abs(v) < 0.1 for v in base.values())

    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(8)
    attn_cls = type(eng.model.model.layers[0].attn)
    eng.close()
    slow_down(monkeypatch, attn_cls, 0.005)
    slow_down(monkeypatch, modules, 0.005, "_attention_block_forward")  # the CPU kernels' one-call forward
    slowed = region_overheads(path, figures, say=lambda s: None, tokens=4)
    assert slowed["attention"] >= base["attention"] + 0.004
    out = tmp_path / "p.yaml"
    out.write_text(profile_yaml({**figures, "region_overhead": slowed}))
    assert parse_profile(out).region_overhead == pytest.approx(slowed, rel=1e-5)


def test_the_code_between_regions_is_priced_per_layer(tiny, monkeypatch):
    """Python that runs once a decoder layer outside every region (a 4 ms sleep in each
    layer's forward, around its attention and MoE block) is measured as 4 ms a layer, not
    4 ms a pass: a profile measured on a shallow model then prices a deep one."""
    import dataclasses

    from moespeq_cli.runtime.planning.overheads import region_overheads

    path, _ = tiny("mixtral", "wide")
    cpu = replace(HW, name="a-cpu", kind="cpu", disk_bandwidth=1e9, disk_latency=1e-4, disk_queue_bandwidth=(1e9,))
    figures = {k: v for k, v in dataclasses.asdict(cpu).items() if k not in ("kernels", "host_kernels", "source")}
    base = region_overheads(path, figures, say=lambda s: None, tokens=4)
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(8)
    layer_cls = type(eng.model.model.layers[0])
    eng.close()
    slow_down(monkeypatch, layer_cls, 0.004)
    slowed = region_overheads(path, figures, say=lambda s: None, tokens=4)
    assert 0.0035 <= slowed["layer"] - base["layer"] < 0.008
    assert slowed["attention"] < base["attention"] + 0.002  # outside the attention's region


def test_calibrate_measures_the_drafts_regions_when_a_draft_is_saved(tiny, cli, monkeypatch, tmp_path):
    """With a saved draft (``moespeq quantize``) ``region_overheads`` also decodes
    speculatively both ways: time the draft's 4-bit experts spend that the mock does not
    price shows as the "draft expert" overhead. Without one nothing of the draft is
    measured (quantizing it would take longer than calibrating)."""
    import dataclasses
    import shutil

    from moespeq_cli.quant.draft import QuantizedExperts
    from moespeq_cli.runtime.planning.overheads import region_overheads

    path, _ = tiny("mixtral", "wide")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(path, ckpt)
    cpu = replace(HW, name="a-cpu", kind="cpu", disk_bandwidth=1e9, disk_latency=1e-4, disk_queue_bandwidth=(1e9,))
    figures = {k: v for k, v in dataclasses.asdict(cpu).items() if k not in ("kernels", "host_kernels", "source")}
    assert not any(k.startswith("draft") for k in region_overheads(ckpt, figures, say=lambda s: None, tokens=4))
    assert cli("quantize", str(ckpt)).exit_code == 0
    slow_down(monkeypatch, QuantizedExperts, 0.003)
    got = region_overheads(ckpt, figures, say=lambda s: None, tokens=4)
    assert got["draft expert"] >= 0.0025


def test_the_drafts_first_touches_are_not_priced_on_every_call(tiny, cli, monkeypatch, tmp_path):
    """A cost the draft pays once (the first call of each expert: its weights paged in,
    the kernels' packing) is not host time of every call: the draft's regions are the
    median of three decodes on one loaded engine, as the other regions' are. One cold
    decode priced a draft expert at 3.8 ms a call where the decode loop takes 1.4."""
    import dataclasses
    import shutil
    import time

    from moespeq_cli.quant.draft import QuantizedExperts
    from moespeq_cli.runtime.planning.overheads import region_overheads

    path, _ = tiny("mixtral", "wide")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(path, ckpt)
    assert cli("quantize", str(ckpt)).exit_code == 0
    cpu = replace(HW, name="a-cpu", kind="cpu", disk_bandwidth=1e9, disk_latency=1e-4, disk_queue_bandwidth=(1e9,))
    figures = {k: v for k, v in dataclasses.asdict(cpu).items() if k not in ("kernels", "host_kernels", "source")}
    forward, touched = QuantizedExperts.forward, set()

    def first_touch(self, layer, expert, x):
        if (id(self), layer, expert) not in touched:
            touched.add((id(self), layer, expert))
            time.sleep(0.02)
        return forward(self, layer, expert, x)

    monkeypatch.setattr(QuantizedExperts, "forward", first_touch)
    got = region_overheads(ckpt, figures, say=lambda s: None, tokens=4)
    assert touched  # the draft ran and paid its first touches
    assert got["draft expert"] < 0.005  # a first decode alone prices every call at 20 ms / calls an expert


def test_a_busy_kernel_is_timed_by_its_mean_over_reads():
    """While reads run, a kernel's extra cost falls on the few calls that meet a read's
    submission or landing: the busy figure is the mean over a span of calls, which counts
    them, where a median of a few calls misses them."""
    import time

    from moespeq_cli.runtime.planning.calibrate import mean_over, timed

    calls = iter(range(10**9))

    def bursty():  # every fourth call 4 ms, the rest nothing
        if next(calls) % 4 == 0:
            time.sleep(0.004)

    assert mean_over(bursty, 0.05) >= 0.0009  # at least a quarter of 4 ms a call
    assert timed(bursty, reps=9, warmup=1) < 0.0009  # the median sees the quiet calls


def test_a_busy_kernels_figure_leaves_the_reads_own_cpu_time_out(monkeypatch):
    """The mock charges a read's own CPU time to the kernel it starts beside, so the busy
    curve leaves it out: the mean over a span of calls, less what the reads' threads took
    meanwhile (on a fake clock: calls of 1 ms, reads taking 0.4 ms of CPU a call)."""
    import types

    from moespeq_cli.runtime.planning import calibrate as cal

    clock = [0.0]
    monkeypatch.setattr(cal, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def call():
        clock[0] += 1e-3

    assert cal.mean_over(call, 0.05) == pytest.approx(1e-3)
    assert cal.mean_over(call, 0.05, taken=lambda: clock[0] * 0.4) == pytest.approx(0.6e-3)
    assert cal.mean_over(call, 0.05, taken=lambda: clock[0] * 5) == pytest.approx(0.0)  # never below nothing


@pytest.mark.parametrize(
    "points, line",
    [
        ({n: 5e-5 + 2e-11 * n for n in (2**19, 2**21, 2**23, 2**26)}, (5e-5, 2e-11)),  # a line: found
        ({10**6: 1e-4, 2 * 10**6: 2e-4}, (0.0, 1e-10)),  # through the origin
        ({10**6: 3e-4, 2 * 10**6: 1e-4}, (1.2e-4, 0.0)),  # falling: noise, the (weighted) mean a read
        ({10**6: 1e-4, 2 * 10**6: 3e-4}, (0.0, 1.5e-10 / 1.3)),  # a negative intercept: through the origin
    ],
)
def test_a_reads_cpu_time_is_a_line_per_read_and_per_byte(points, line):
    from moespeq_cli.runtime.planning.calibrate import cpu_line

    a, b = cpu_line(points)
    assert a >= 0 and b >= 0
    assert a == pytest.approx(line[0], abs=1e-12) and b == pytest.approx(line[1])
    # each point weighed by its own size: a large read's swing leaves the part a read alone
    small = {2**19: 6e-5, 2**21: 1e-4}
    assert cpu_line({**small, 2**26: 2.7e-3})[0] == pytest.approx(cpu_line({**small, 2**26: 1.8e-3})[0], abs=1e-5)


def test_busy_kernels_are_timed_once_the_reads_are_under_way(monkeypatch):
    """``reading`` starts its block only once the first reads have landed (timed from the
    reader's start, a 2.4 MB expert's calls came out at 1.6x their quiet mean over 50 ms,
    1.2x over 200 ms), and gives it the reads' CPU seconds so far; a read that fails
    fails the block."""
    import threading
    import time

    from moespeq_cli.runtime.planning import calibrate as cal
    from moespeq_cli.runtime.tiers import disk

    landed = []

    class SlowReader:
        def __init__(self, threads):
            self.lock, self.cpu_s = threading.Lock(), 0.0

        def cpu_seconds(self):
            with self.lock:
                return self.cpu_s

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def submit(self, span, dest):
            reader = self

            class Read:
                def wait(self):
                    time.sleep(0.02)
                    with reader.lock:
                        reader.cpu_s += 0.001
                    landed.append(span)

            return Read()

    monkeypatch.setattr(disk, "DiskReader", SlowReader)
    monkeypatch.setattr(cal, "landing", lambda n: [None] * n)
    monkeypatch.setattr(cal, "spans_of", lambda source: list(range(8)))
    with cal.reading(("f", 1 << 30), in_flight=2) as taken:
        assert len(landed) >= 2  # a round of reads landed before the block began
        assert taken() >= 0.002
    with cal.reading(None) as taken:
        assert taken() == 0.0

    class FailingReader(SlowReader):  # a read that fails: no busy figure timed without reads
        def submit(self, span, dest):
            class Read:
                def wait(self):
                    raise OSError(5, "Input/output error")

            return Read()

    monkeypatch.setattr(disk, "DiskReader", FailingReader)
    with pytest.raises(RuntimeError, match="reads beside the kernel timings failed.*Input/output error"):
        with cal.reading(("f", 1 << 30), in_flight=2):
            pass


def test_calibrate_refuses_a_checkpoint_without_a_tokenizer_before_measuring(tiny, cli, monkeypatch, tmp_path):
    """``calibrate --model`` decodes the checkpoint at the end: one it cannot decode is
    refused in one line at once, not after a minute of measuring."""
    import shutil

    from moespeq_cli.runtime.planning import calibrate as cal

    path, _ = tiny("mixtral", "wide")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(path, ckpt)
    (ckpt / "tokenizer.json").unlink()
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: pytest.fail("measured before checking the checkpoint"))
    r = cli("calibrate", "--model", str(ckpt), "--out", str(tmp_path / "p.yaml"))
    assert r.exit_code in (1, 2) and "tokenizer.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.yaml").exists()


def slow_down(monkeypatch, owner, seconds: float, name: str = "forward") -> None:
    """``owner.<name>`` (a class's forward, or a module's function that an engine binds as
    one when it loads) sleeps ``seconds`` first: host time no op shows and no clock prices."""
    import time

    forward = getattr(owner, name)

    def slow(*args, **kw):
        time.sleep(seconds)
        return forward(*args, **kw)

    monkeypatch.setattr(owner, name, slow)


@pytest.fixture
def quick_calibration(monkeypatch):
    """``calibrate`` with its measurements replaced by fixed figures (no disk, no curves),
    and the demo's decode failing as on a GPU the draft cannot run on."""
    import contextlib

    from moespeq_cli.runtime.planning import calibrate as cal
    from moespeq_cli.runtime.planning import overheads

    monkeypatch.setattr(
        cal,
        "host_figures",
        lambda say: dict(host_mem_bandwidth=3e10, host_flops=1e11, host_op_overhead=2e-6, sync_overhead=1e-6),
    )
    monkeypatch.setattr(
        cal,
        "disk_figures",
        lambda source, threads, say: dict(
            disk_bandwidth=1e9, disk_latency=1e-4, disk_queue_bandwidth=[1e9], direct=True
        ),
    )
    monkeypatch.setattr(
        cal,
        "read_host_figures",
        lambda source, threads, say: dict(
            read_submit_overhead=1e-5,
            read_wake_curve=[(1e-3, 1e-5), (1e-2, 4e-5)],
            read_cpu_overhead=5e-5,
            disk_read_cpu=2e-11,
        ),
    )
    monkeypatch.setattr(cal, "kernel_curves", lambda *a, **k: {})
    from moespeq_cli import kernels

    monkeypatch.setattr(kernels, "claim_threads", lambda: None)  # (process-wide: not from a test)
    monkeypatch.setattr(
        cal, "disk_source", contextlib.contextmanager(lambda directory, model_file, say: iter([("f", 0)]))
    )

    def broken(*a, **k):
        raise RuntimeError("no kernel image\nfor this device")

    monkeypatch.setattr(overheads, "region_overheads", broken)
    return cal


def test_a_profile_refused_at_the_write_keeps_the_measurement(quick_calibration, cli, tmp_path, monkeypatch):
    """--out checked at the start and refused after a minute of measuring (the disk filled
    meanwhile): the measurement was lost. It is kept in a file of the temporary directory,
    named in the one line, that --hardware reads."""
    from pathlib import Path

    from moespeq_cli import fs
    from moespeq_cli.errors import MoespeqError
    from moespeq_cli.runtime.planning.hardware import parse_profile

    def full(path, text, own=None):
        raise MoespeqError(f"cannot write {path} (No space left on device); free some space")

    monkeypatch.setattr(fs, "atomic_write_text", full)
    out = tmp_path / "p.yaml"
    r = cli("calibrate", "--out", str(out), "--disk-dir", str(tmp_path))
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "No space left on device" in r.stderr and "the measurement is kept in " in r.stderr
    kept = Path(r.stderr.split("the measurement is kept in ")[1].split(" ")[0])
    try:
        assert not out.exists() and parse_profile(kept).host_mem_bandwidth == 3e10
    finally:
        kept.unlink()


def test_a_failed_demo_decode_leaves_a_profile_without_host_time(quick_calibration, tmp_path):
    """Calibrating decodes the bundled demo for the host time per region; if that fails
    (a GPU the draft cannot run on, say) the profile is still written, without
    ``region_overhead`` and saying why, since every cuda run without --hardware needs it.
    A checkpoint the user named must decode: its failure is the calibration's."""
    from moespeq_cli.runtime.planning.hardware import parse_profile

    cal = quick_calibration
    figures = cal.calibrate(tmp_path, cuda=False, say=lambda s: None)
    assert "region_overhead" not in figures
    out = tmp_path / "p.yaml"
    out.write_text(cal.profile_yaml(figures))
    text = out.read_text()
    assert "not measured: decoding the demo model failed (RuntimeError: no kernel image for this device)" in text
    assert parse_profile(out).region_overhead == {}
    assert parse_profile(out).read_wake_curve == ((1e-3, 1e-5), (1e-2, 4e-5))  # written as it reads back
    assert (parse_profile(out).read_cpu_overhead, parse_profile(out).disk_read_cpu) == (5e-5, 2e-11)
    with pytest.raises(RuntimeError):
        cal.calibrate(tmp_path, cuda=False, say=lambda s: None, checkpoint=tmp_path)


def test_kernels_are_timed_as_the_cpu_backend_runs_them(quick_calibration, monkeypatch, tmp_path):
    """On a CPU the decode's kernels run in their own pool, torch stepping down to one
    thread (``kernels.claim_threads``): calibrated with torch's pool beside it (two pools
    spinning on two cores), a 4.7 MB expert's timing came out 0.24-0.48 ms against
    0.25-0.32. On a ``cpu`` profile the read costs (the wake curve times kernels) and the
    curves are timed with the threads claimed; the disk before, as it always was (in fresh
    processes it read 1.77-2.03 GB/s four in flight that way, 1.69-1.79 after: the drive's
    drift or not, the figure is left as it was). A GPU's calibration claims nothing: the
    cuda backend does not."""
    from moespeq_cli import kernels

    cal = quick_calibration
    seen = []

    def seeing(name):
        fake = getattr(cal, name)  # (the fixture's)
        monkeypatch.setattr(cal, name, lambda *a, **k: seen.append((name, torch.get_num_threads())) or fake(*a, **k))

    for name in ("disk_figures", "read_host_figures", "kernel_curves"):
        seeing(name)
    monkeypatch.setattr(kernels, "claim_threads", lambda: torch.set_num_threads(1))  # what it does, undone below
    monkeypatch.setattr(cal, "cuda_figures", lambda say: {})
    before = torch.get_num_threads()
    try:
        for cuda in (False, True):
            torch.set_num_threads(2)
            cal.calibrate(tmp_path, cuda=cuda, say=lambda s: None, overheads=False)
    finally:
        torch.set_num_threads(before)
    cpu, gpu = seen[:3], seen[3:]
    assert cpu == [("disk_figures", 2), ("read_host_figures", 1), ("kernel_curves", 1)]
    assert gpu == [("disk_figures", 2), ("read_host_figures", 2), ("kernel_curves", 2)]


def test_each_kernel_timing_starts_from_the_kernels_steady_state(monkeypatch):
    """The first calls after other work (copying the weights, waiting for reads) run
    1.5-4x slower for 10-14 calls: each shape's timings, quiet and beside reads, follow
    ``WARM_S`` of its calls."""
    import contextlib
    import time

    import moespeq_cli.runtime.planning.calibrate as cal

    monkeypatch.setattr(cal, "SHAPES", ((64, 128), (128, 256)))
    monkeypatch.setattr(cal, "COLD_BYTES", 1)
    monkeypatch.setattr(cal, "TOKENS", (1, 2))
    events = []
    monkeypatch.setattr(cal, "warm", lambda fn, seconds=None: events.append(("warm", fn, seconds)))
    monkeypatch.setattr(cal, "timed", lambda fn, *a, **k: events.append(("timed", fn, None)) or 1e-3)
    monkeypatch.setattr(cal, "mean_over", lambda fn, *a, **k: events.append(("busy", fn, None)) or 1e-3)
    monkeypatch.setattr(cal, "reading", contextlib.contextmanager(lambda source: iter([lambda: 0.0])))
    curves = cal.kernel_curves(torch.device("cpu"), lambda s: None, busy_file=("f", 1))
    quiet = [name for name in curves if not name.endswith("@busy")]
    assert quiet and len(curves) == 2 * len(quiet)
    warms = [i for i, e in enumerate(events) if e[0] == "warm"]
    assert len(warms) == 2 * len(curves)  # each curve's two shapes, both variants
    for i in warms:
        assert events[i][2] is None  # for WARM_S, the default
        assert events[i + 1][0] in ("timed", "busy") and events[i + 1][1] is events[i][1]  # the batch timed next
    assert {events[i + 1][0] for i in warms} == {"timed", "busy"}
    monkeypatch.undo()
    calls = []
    t0 = time.perf_counter()
    cal.warm(lambda: calls.append(1), 0.01)
    assert time.perf_counter() - t0 >= 0.01 and len(calls) > 1  # called until the time is up
    calls.clear()
    cal.warm(lambda: calls.append(1), 0.0)
    assert calls == [1]  # once at least
    assert cal.warm.__defaults__ == (cal.WARM_S,)


@pytest.mark.parametrize("busy_s, expect_s", [(1e-3, 2e-3), (3e-3, 3e-3)])
def test_a_busy_figure_is_never_below_the_quiet_one(monkeypatch, busy_s, expect_s):
    """Reads beside a kernel never make it faster: a busy mean that comes out below the
    same shape's quiet median (the reads' CPU time taken off it, noise) is floored at it;
    one above it is kept."""
    import contextlib

    import moespeq_cli.runtime.planning.calibrate as cal

    monkeypatch.setattr(cal, "SHAPES", ((64, 128), (128, 256)))
    monkeypatch.setattr(cal, "COLD_BYTES", 1)
    monkeypatch.setattr(cal, "TOKENS", (1, 2))
    monkeypatch.setattr(cal, "warm", lambda fn, seconds=None: None)
    monkeypatch.setattr(cal, "timed", lambda fn, *a, **k: 2e-3)
    monkeypatch.setattr(cal, "mean_over", lambda fn, *a, **k: busy_s)
    monkeypatch.setattr(cal, "reading", contextlib.contextmanager(lambda source: iter([lambda: 0.0])))
    curves = cal.kernel_curves(torch.device("cpu"), lambda s: None, busy_file=("f", 1))
    busy = [name for name in curves if name.endswith("@busy")]
    assert busy
    for name in busy:
        assert {s for row in curves[name]["seconds"] for s in row} == {expect_s}
        assert {s for row in curves[name.removesuffix("@busy")]["seconds"] for s in row} == {2e-3}


def test_validate_mock_refuses_a_checkpoint_that_is_not_one(tmp_path):
    """A directory without config.json is a usage error (exit 2, said on stderr), found
    before anything is built, calibrated or run."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "validate_mock.py"
    r = subprocess.run(
        [sys.executable, str(script), "--checkpoint", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stderr
    assert f"--checkpoint {tmp_path} has no config.json; give a checkpoint directory" in r.stderr
    assert not list(tmp_path.iterdir())  # nothing written into it


def test_calibrate_says_when_the_host_time_was_not_measured(quick_calibration, cli, tmp_path):
    out = tmp_path / "mine.yaml"
    r = cli("calibrate", "--out", str(out), "--disk-dir", str(tmp_path), "--json")
    assert r.exit_code == 0, r.stderr
    assert "no kernel image" in json.loads(r.stdout)["region_overhead_error"]
    r = cli("calibrate", "--out", str(out), "--disk-dir", str(tmp_path))
    assert r.exit_code == 0 and "host time per region was not measured" in r.stderr
    assert load_profile(str(out)).region_overhead == {}


def test_a_calibration_on_a_busy_machine_says_its_figures_are_likely_low(quick_calibration, cli, tmp_path, monkeypatch):
    """Calibrated beside another user's pytest, memory bandwidth came out 7 GB/s (22.5 idle)
    without a word: other processes' share of the CPU meanwhile is now measured, and above
    a tenth said on stderr (with --json too), in the profile and in the summary."""
    cal = quick_calibration
    out = tmp_path / "mine.yaml"
    for share, said in ((0.45, True), (0.05, False)):
        monkeypatch.setattr(cal.OtherLoad, "share", lambda self, s=share: s)
        for extra in ((), ("--json",)):
            there = out.exists()
            r = cli("calibrate", "--out", str(out), "--disk-dir", str(tmp_path), *extra)
            assert r.exit_code == 0, r.stderr
            assert ("other processes took 45% of the CPU" in r.stderr) == said, r.stderr
            if not extra:  # an earlier profile is said to be replaced
                assert (f"replaced the earlier profile {out}" in " ".join(r.stderr.split())) == there, r.stderr
        assert json.loads(r.stdout)["other_load"] == share and json.loads(r.stdout)["replaced"] is True
        assert ("Other processes took 45% of the CPU meanwhile" in out.read_text()) == said
    r = cli("calibrate", "--out", str(tmp_path))
    assert r.exit_code == 2 and "is a directory; give a file name ending in .yaml" in r.stderr, r.stderr
    # a CPU profile says each figure's CPU method alone, and that its margin is set, not measured
    text = out.read_text()
    assert "(GPU)" not in text and "cudaMemGetInfo" not in text
    assert re.search(r"reserved_memory: \d+  # set \S+: a tenth of the memory", text), text
    assert re.search(r"link_bandwidth: \S+  # measured \S+: the disk's O_DIRECT bandwidth", text), text


def test_other_processes_load_is_measured():
    """A process spinning on one core beside: at least a third of one core's share shows
    (others running on the machine only add to it)."""
    import subprocess
    import sys
    import time

    from moespeq_cli.runtime.planning.calibrate import OtherLoad

    load = OtherLoad()
    if load.start is None:
        pytest.skip("no /proc/stat here")
    spin = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.5: pass"
    p = subprocess.Popen(
        [sys.executable, "-c", spin]
    )  # not waited for yet: not yet one of this process's children's times
    time.sleep(1.7)
    share = load.share()
    p.wait()
    assert share is not None and share >= 0.33 / (os.cpu_count() or 1), share


def test_a_fused_attention_is_priced_as_one_product(tiny):
    """q, k and v run as one product on the mock whatever the tier (as the CPU kernels and
    the device compute them), and the attention is priced as that one product: the same
    weights and work as three, one curve lookup (a measured curve charges every call a small
    product's fixed time) and one kernel fewer to launch twice."""
    from moespeq_cli.runtime.planning.costs import module_cost

    path, _ = tiny("mixtral", "wide")
    cpu = replace(HW, name="a-cpu", kind="cpu", disk_bandwidth=1e9, disk_latency=1e-4)
    eng = Engine(path, EngineOptions(backend="mock", hardware=cpu, ram=2**30))  # a cpu profile: the host tier
    eng.load(8)
    assert eng.plan.compute_tier == "host"
    attn = eng.model.model.layers[0].attn
    assert hasattr(attn, "fused_qkv")
    fused = module_cost(attn, 1, 4)
    del attn.fused_qkv
    three = module_cost(attn, 1, 4)
    hidden = attn.q_proj.in_features  # the one product reads its input once, not three times
    assert three.bytes - fused.bytes == pytest.approx(2 * hidden * 4) and fused.flops == pytest.approx(three.flops)
    assert (fused.ops, len(fused._parts()), len(three._parts())) == (three.ops - 2, 3, 5)  # and the extra kernels
    eng.close()


def test_a_negative_attention_overhead_is_taken_only_from_one_call_attention(tiny):
    """A negative ``attention`` figure is measured on an attention the cpu backend runs as
    one kernel call (the demo's); the mock takes it only from layers whose attention runs
    so (``one_call_attention``), not from a family that runs its ops (OLMoE's q/k norms over
    the whole projection), and ``plan``'s step does the same."""
    from moespeq_cli.kernels.modules import one_call_attention

    cpu = replace(HW, name="a-cpu", kind="cpu", disk_bandwidth=1e9, disk_latency=1e-4)
    for family, variant, one_call in (("mixtral", "wide", True), ("olmoe", "base", False)):
        path, _ = tiny(family, variant)
        times = []
        for extra in ({}, {"attention": -1.0}):
            eng = Engine(path, EngineOptions(backend="mock", hardware=replace(cpu, region_overhead=extra)))
            eng.load(16)
            layers = eng.model.model.layers
            assert all(one_call_attention(lay.attn) == one_call for lay in layers)
            assert eng.backend.one_call_attention == (set(range(len(layers))) if one_call else set())
            list(eng.generate(prompt_for(5, 4), 3, SamplingParams()))
            times.append([iv.duration for iv in eng.backend.timeline.intervals if iv.name.startswith("attention")])
            eng.close()
        plain, charged = times
        if one_call:
            assert all(b < a for a, b in zip(plain, charged, strict=True))
        else:
            assert charged == pytest.approx(plain)


def test_a_calibration_in_the_cache_is_a_profile_name(quick_calibration, cli, tmp_path, monkeypatch):
    """`moespeq calibrate` without --out writes calibrated-cpu.yaml in moespeq's cache; it
    says the name to give, and --hardware and --list-hardware know that name."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    r = cli("plan", "--hardware", "calibrated-cpu", "-n", "8")
    assert r.exit_code == 2 and "`moespeq calibrate` measures it" in r.stderr  # not calibrated yet
    r = cli("calibrate", "--disk-dir", str(tmp_path))
    assert r.exit_code == 0, r.stderr
    assert "--hardware calibrated-cpu" in r.stderr
    assert r.stdout.strip() == str(tmp_path / "cache" / "moespeq" / "profiles" / "calibrated-cpu.yaml")
    names = [row["name"] for row in json.loads(cli("plan", "--list-hardware", "--json").stdout)["profiles"]]
    assert names[-1] == "calibrated-cpu" and "rtx3060-12gb" in names
    assert load_profile("calibrated-cpu").kind == "cpu"
    r = cli("plan", "--hardware", "calibrated-cpu", "-n", "8", "--json")
    assert r.exit_code == 0, r.stderr
    # a calibration that no longer reads (an older version's) is skipped, not fatal
    (tmp_path / "cache" / "moespeq" / "profiles" / "old.yaml").write_text("name: old\n")
    r = cli("plan", "--list-hardware")
    assert r.exit_code == 0 and "calibrated-cpu" in r.stdout and "skipped: old (" in r.stderr


def test_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    """As the XDG spec says: a relative path would put the cache wherever a command runs."""
    from moespeq_cli.fs import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "relcache")
    assert cache_dir() == tmp_path / ".cache" / "moespeq"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "abs"))
    assert cache_dir() == tmp_path / "abs" / "moespeq"


def test_a_profile_timed_without_o_direct_says_so_at_every_disk_figure(quick_calibration, tmp_path):
    """A disk directory on tmpfs refuses O_DIRECT: the reader falls back to buffered reads,
    and the profile said "O_DIRECT reads of ..." for every disk figure (memory's speed,
    presented as a disk's)."""
    from moespeq_cli.runtime.planning.hardware import parse_profile

    cal = quick_calibration
    figures = cal.calibrate(tmp_path, cuda=False, say=lambda s: None)
    out = tmp_path / "p.yaml"
    out.write_text(cal.profile_yaml({**figures, "_direct": False}))
    text = out.read_text()
    assert "O_DIRECT reads" not in text and "refused O_DIRECT" in text
    assert text.count("buffered (no O_DIRECT there)") >= 4  # bandwidth, latency, CPU, queue
    assert parse_profile(out).disk_bandwidth == pytest.approx(figures["disk_bandwidth"], rel=1e-5)


def test_plan_on_a_cpu_profile_plans_ram_as_run_does(tiny, cli, tmp_path):
    """A profile of ``kind: cpu`` (what `calibrate` writes without a GPU) makes this CPU the
    device: `plan` plans RAM as the tier the CPU computes from, the disk as the link, as
    `run --backend mock` does with it (it planned a GPU's --vram and priced no disk)."""
    from moespeq_cli.runtime.planning.hardware import profiles_dir

    text = (profiles_dir() / "rtx3060-12gb.yaml").read_text().replace("name: rtx3060-12gb", "name: a-cpu")
    profile = tmp_path / "a-cpu.yaml"
    profile.write_text(text + "kind: cpu\n")
    path, _ = tiny("mixtral", "wide")
    from test_disk_offload import ram_for

    ram = str(ram_for(path, 6))
    args = [str(path), "-n", "4", "-p", "hello", "--hardware", str(profile), "--ram", ram]
    r = cli("plan", *args, "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["compute_tier"] == "host" and report["vram_bytes"] is None and report["ram_bytes"] == int(ram)
    rows = {row["policy"]: row for row in report["policies"]}
    assert "hybrid" not in rows and not any("no cpu" in p for p in rows)  # every expert runs on the CPU
    for policy in ("moespeq", "gate-prefetch", "lru", "ondemand"):
        planned = rows[policy]["plan"]
        ran = json.loads(cli("run", *args, "--backend", "mock", "--policy", policy, "--json").stdout)["plan"]
        assert planned["compute_tier"] == ran["compute_tier"] == "host"
        assert (planned["slots"], planned["has_draft"]) == (ran["slots"], ran["has_draft"]), policy
        assert planned["disk_tier"] and rows[policy]["estimate"]["tokens_per_s"] > 0
    text_out = cli("plan", *args)
    assert text_out.exit_code == 0 and "this CPU" in text_out.stdout and "--vram" not in text_out.stdout
    bad = cli("plan", str(path), "--hardware", str(profile), "--vram", "1GB")
    assert bad.exit_code == 2 and "kind: cpu" in bad.stderr
    # resident: every expert in RAM, the tier this CPU computes from (it said "on the device")
    assert not rows["resident"]["fits"] and "every expert in RAM" in rows["resident"]["reason"]
    # without --ram both take what is available beside the same weights (plan counted the
    # demo's in its bf16, run on the mock in float32)
    free = ["-n", "4", "-p", "hello", "--hardware", str(profile)]
    planned = json.loads(cli("plan", *free, "--json").stdout)["ram_source"]
    ran = json.loads(cli("run", *free, "--backend", "mock", "--json").stdout)["plan"]["ram_source"]
    weights = re.compile(r"and (.*) of weights")
    assert weights.search(planned).group(1) == weights.search(ran).group(1)
    # a --ram every expert fits in: `run --backend cpu` decodes from memory, which the rows do not say
    assert report["cpu_note"] is None
    big = json.loads(cli("plan", *free, "--ram", "1GB", "--json").stdout)
    assert "`run --backend cpu` decodes from memory" in big["cpu_note"]
    ran = json.loads(
        cli("run", str(path), "-n", "4", "-p", "hello", "--backend", "cpu", "--ram", "1GB", "--json").stdout
    )
    assert ran["plan"] is None


def test_plan_prices_a_disk_reads_cpu_cost_on_a_cpu_profile(tiny):
    """On a profile of this CPU every miss is a disk read, and the mock charges the compute
    thread for handing each one over (``read_submit_overhead``), for its CPU time
    (``read_cpu_overhead`` and ``disk_read_cpu``) and, where it waited, for waking (``read_wake_curve`` or the older
    single ``read_wake_overhead``): plan's
    estimate prices them too (on the demo at --ram 12MB its ondemand row said 83 tok/s
    where the mock gives 49; now 50)."""
    from moespeq_cli.models import build_model
    from moespeq_cli.runtime.planning.estimate import StepModel

    path, _ = tiny("mixtral", "wide")
    ck = Checkpoint(path)
    base = replace(HW, name="a-cpu", kind="cpu", disk_bandwidth=1e9, disk_latency=1e-4)
    costly = replace(
        base, read_submit_overhead=3e-4, read_wake_overhead=7e-4, disk_read_cpu=1e-11, read_cpu_overhead=2e-5
    )

    def step(hw):
        return StepModel(build_model(ck.arch, ck.raw_config, 64), ck.config, hw, ck.config.dtype, 64)

    cheap, dear = step(base), step(costly)
    L, K = dear.layers, ck.config.top_k
    per_read = 3e-4 + 2e-5 + 1e-11 * dear.expert_bytes
    assert dear.per_token("ondemand", 0.0) - cheap.per_token("ondemand", 0.0) == pytest.approx(
        L * K * (per_read + 7e-4)
    )
    assert dear.per_token("lru", 0.5) - cheap.per_token("lru", 0.5) == pytest.approx(L * K * 0.5 * (per_read + 7e-4))
    assert dear.per_token("gate-prefetch", 0.5) > cheap.per_token("gate-prefetch", 0.5)
    gpu = replace(HW, read_submit_overhead=3e-4, read_wake_overhead=7e-4, disk_read_cpu=1e-11)
    assert step(gpu).per_token("ondemand", 0.0) == step(HW).per_token("ondemand", 0.0)  # a GPU's reads: I/O threads
    # a wake curve: the wait is about a read's time, and the wake priced for it
    curved = step(replace(costly, read_wake_curve=((1e-9, 0.0), (10.0, 1e-2))))
    wake = 1e-2 * (curved.t_copy - 1e-9) / (10.0 - 1e-9)
    assert curved.per_token("ondemand", 0.0) - cheap.per_token("ondemand", 0.0) == pytest.approx(
        L * K * (per_read + wake)
    )
