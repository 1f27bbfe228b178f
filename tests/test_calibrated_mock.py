"""A simulator priced from the code that runs: the mock charges every op the code
dispatched (counted, not hand-kept), the draft's cost follows its kernel's path, measured
kernel curves price what they measured, gate-prefetch's router is charged once,
prefetch precision stays a fraction, and `moespeq calibrate` writes a profile with which
the mock simulates `--backend cpu`."""

import json
from dataclasses import replace

import pytest
import torch
from offload_helpers import prompt_for, run_engine, vram_for_slots

from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.engine import Engine, EngineOptions
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


def test_gate_prefetch_charges_the_router_once(tiny):
    path, _ = tiny("mixtral", "top3")
    prompt = prompt_for(22, 8)
    _, eng = run_engine(path, prompt, 8, policy="gate-prefetch", slots=6)
    ivs = eng.backend.timeline.intervals
    passes = sum(iv.name == "framework" for iv in ivs)
    layers = len(eng.model.moe_blocks)
    assert sum(iv.name.startswith("router L") for iv in ivs) == passes * layers  # the layer's own, once
    prefetched = [iv for iv in ivs if iv.name.startswith("gate-prefetch L")]
    assert prefetched and all(iv.ops >= 1 for iv in prefetched)


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
        "kernels: {x: {tokens: [2, 1], sizes: [1, 2], seconds: [[1, 1], [1, 1]]}}": "ascending",
        "kernels: {x: {tokens: [1], sizes: [1, 2], seconds: [[1], [1, 2]]}}": "seconds",
        "kernels: {x: {tokens: [1], sizes: [2, 1], seconds: [[1], [1]]}}": "sizes",
        "kernels: {x: {tokens: [1], sizes: [1, 2], seconds: [[-1], [1]]}}": "seconds",
        "disk_queue_bandwidth: [1e9, nan]": "disk_queue_bandwidth",
    }
    for extra, word in cases.items():
        p = tmp_path / "p.yaml"
        p.write_text(base + "\n" + extra + "\n")
        with pytest.raises(UsageError, match=word):
            load_profile(str(p))


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
    q = hw.disk_queue_bandwidth
    assert all(a <= b for a, b in zip(q, q[1:], strict=False))  # made non-decreasing: dips are drift
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
        }

    first = cal.cached_gpu_profile(measure=measure)
    again = cal.cached_gpu_profile(measure=measure)
    assert calls == ["NVIDIA H200"] and first == again and first.description == "NVIDIA H200 (calibrated)"
    gpu["name"] = "NVIDIA GeForce RTX 4090"
    assert cal.cached_gpu_profile(measure=measure).description.startswith("NVIDIA GeForce RTX 4090")
    assert len(calls) == 2
