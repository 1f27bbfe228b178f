"""CUDA backend tests: skipped without a GPU; scripts/gpu_check.sh runs them on one."""

import pytest
import torch
from offload_helpers import run_engine, vram_for_slots

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

POLICIES = ["resident", "ondemand", "lru", "gate-prefetch"]


@pytest.mark.parametrize("family,variant", [("mixtral", "top3"), ("qwen2_moe", "shared"), ("deepseek_v2", "lite")])
def test_cuda_policies_give_cpu_tokens(tiny, family, variant):
    path, _ = tiny(family, variant)
    prompt = torch.randint(3, 200, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    expected, _ = run_engine(path, prompt, 24, backend="cpu")
    results = {}
    for policy in POLICIES:
        from moespeq_cli.models.checkpoint import Checkpoint

        cfg = Checkpoint(path).config
        slots = cfg.num_experts * len(cfg.moe_layers) if policy == "resident" else cfg.top_k + 1
        results[policy], eng = run_engine(path, prompt, 24, backend="cuda", policy=policy, slots=slots)
        assert eng.last_stats.clock == "wall"
    # All policies run the same kernels in the same order: identical to each other...
    assert all(r == results["resident"] for r in results.values())
    # ...and (fp32, tiny model) to the CPU reference.
    assert results["resident"] == expected


NEW_FAMILIES = [
    ("deepseek_v3", "v3"),
    ("glm4_moe", "base"),
    ("glm4_moe_lite", "flash"),
    ("qwen3_next", "hybrid"),
    ("qwen3_5_moe", "text"),
    ("gpt_oss", "alternating"),
    ("gemma4", "alternating"),
]


@pytest.mark.parametrize("family,variant", NEW_FAMILIES)
def test_cuda_2026_families_give_cpu_tokens(tiny, family, variant):
    """The 2026 families through the offloading runtime on a GPU (a few slots: experts
    move), and speculative decoding (moespeq; Gated DeltaNet's state rolled back on the
    device for qwen3_next and qwen3_5_moe) lossless: the cpu backend's greedy tokens."""
    from moespeq_cli.models.checkpoint import Checkpoint

    path, _ = tiny(family, variant)
    prompt = torch.randint(3, 200, (12,), generator=torch.Generator().manual_seed(7)).tolist()
    expected, _ = run_engine(path, prompt, 16, backend="cpu")
    slots = Checkpoint(path).config.top_k + 1
    for policy in ("lru", "moespeq"):
        got, eng = run_engine(path, prompt, 16, backend="cuda", policy=policy, slots=slots)
        assert got == expected, policy
        assert eng.last_stats.bytes_h2d > 0, policy


def test_cuda_copies_overlap_compute(tiny):
    path, _ = tiny("mixtral", "top3")
    prompt = list(range(3, 40))
    _, eng = run_engine(path, prompt, 32, backend="cuda", policy="gate-prefetch", slots=6)  # of 16: experts move
    tl = eng.backend.timeline
    assert any(iv.kind == "copy" for iv in tl.intervals)
    assert eng.last_stats.bytes_h2d > 0
    assert tl.overlap_s() > 0.0  # some copy ran while a kernel did


@pytest.mark.parametrize("policy", ["lru", "gate-prefetch", "hybrid", "moespeq"])
def test_cuda_slowed_copies_change_no_token(tiny, monkeypatch, policy):
    """Every copy held back on the copy stream by ~1 ms of GPU spinning: a compute that
    did not wait for its copy would read a stale slot; the tokens must not change."""
    path, _ = tiny("mixtral", "top3")
    prompt = list(range(3, 24))
    expected, _ = run_engine(path, prompt, 16, backend="cpu")
    monkeypatch.setenv("MOESPEQ_DEBUG_COPY_DELAY", str(2_000_000))
    got, eng = run_engine(path, prompt, 16, backend="cuda", policy=policy, slots=4, hardware="desktop-3060-ddr4")
    assert eng.backend.copy_delay
    # hybrid computes a miss on the host instead of copying it: its delayed copies are the
    # warm start's and the activations' side streams; the others copy while decoding
    assert eng.last_stats.cpu_expert_share > 0 if policy == "hybrid" else eng.last_stats.bytes_h2d > 0
    assert got == expected


@pytest.mark.parametrize("policy", ["lru", "gate-prefetch"])
def test_cuda_host_syncs_per_token(tiny, policy):
    """torch's sync debug mode warns at every synchronising call: at most one per MoE
    layer per pass and one per token in plain decoding (the prompt's pass included),
    counted over a decode only (loading copies the weights up with blocking copies)."""
    import traceback
    import warnings
    from collections import Counter
    from pathlib import Path

    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.runtime.sampling import SamplingParams

    path, _ = tiny("mixtral", "top3")
    moe_layers = len(Checkpoint(path).config.moe_layers)
    n = 12
    _, eng = run_engine(path, [5, 6, 7], n, backend="cuda", policy=policy, slots=4)  # load and warm up
    sites = Counter()  # where each sync was called from (moespeq's innermost frames)

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message).lower():
            frames = [f for f in traceback.extract_stack()[:-1] if "moespeq_cli" in f.filename]
            sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-3:]))] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            got = [ev.token for ev in eng.generate([9, 10, 11], n, SamplingParams())]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum(sites.values())
    print(f"{policy}: {syncs} host syncs for {n} tokens + the prompt's pass, {moe_layers} MoE layers: {sites}")
    assert len(got) == n and syncs <= (moe_layers + 1) * (n + 1), sites.most_common()


def test_cuda_memory_stays_within_the_plan(tiny):
    """The caching allocator's peak reservation, beyond what was reserved before the run,
    fits the plan's budget (plus the allocator's 2 MiB block rounding per buffer)."""
    path, _ = tiny("mixtral", "top3")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_reserved()
    _, eng = run_engine(path, list(range(3, 30)), 16, backend="cuda", policy="lru", slots=4)
    buffers = len(eng.cache.blocks) + 4 * len(eng.model.model.layers) + 64
    assert torch.cuda.max_memory_reserved() - base <= eng.plan.budget_bytes + buffers * 2 * 2**20


def test_cuda_blas_workspace_is_measured_and_planned(tiny):
    """cuBLAS's and cuBLASLt's workspaces for the compute stream (allocated at the first
    matmul and kept) are measured, remembered, and held in the plan's workspace: a cuda
    plan's workspace is the bare plan's plus exactly that."""
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.runtime.backends.cuda import blas_workspace_bytes
    from moespeq_cli.runtime.planning.planner import checkpoint_plan

    dev = torch.device("cuda", torch.cuda.current_device())
    ws = blas_workspace_bytes(dev)
    print(f"cuBLAS + cuBLASLt workspaces on {torch.cuda.get_device_name(dev)}: {ws / 2**20:.2f} MiB")
    assert ws > 0 and blas_workspace_bytes(dev) == ws
    path, _ = tiny("mixtral", "top3")
    prompt = list(range(3, 30))
    bare = checkpoint_plan(Checkpoint(path), len(prompt) + 16)
    _, eng = run_engine(path, prompt, 16, backend="cuda", policy="lru", slots=4)
    assert eng.plan.workspace_bytes == bare.workspace_bytes + ws and eng.plan.slots == 4


def test_pinned_host_tier_and_slot_buffers(tiny):
    path, _ = tiny("olmoe", "base")
    _, eng = run_engine(path, [5, 6, 7, 8], 4, backend="cuda", policy="lru", slots=4)
    host = eng.tiers.host
    assert all(block.is_pinned() for block in host.blocks)  # registered, exactly its size
    assert eng.cache.blocks[0].is_cuda and eng.cache.blocks[0].shape[0] == 4


@pytest.mark.parametrize("policy", ["hybrid", "moespeq"])
def test_cuda_host_experts(tiny, policy):
    """Experts computed on the host CPU (worker thread, activations over the link) give
    the CPU reference's tokens, and the timeline has a host lane."""
    path, _ = tiny("mixtral", "top3")
    prompt = list(range(3, 20))
    expected, _ = run_engine(path, prompt, 16, backend="cpu")
    got, eng = run_engine(path, prompt, 16, backend="cuda", policy=policy, slots=4, hardware="desktop-3060-ddr4")
    assert got == expected
    if policy == "hybrid":
        assert eng.last_stats.cpu_expert_share > 0
        assert any(iv.stream == "host" for iv in eng.backend.timeline.intervals)


@pytest.mark.parametrize("policy", ["lru", "gate-prefetch", "hybrid", "moespeq"])
def test_cuda_three_tiers(tiny, policy):
    """disk -> RAM -> device on a real GPU: a few RAM slots, fewer device slots; reads on
    I/O threads, copies chained after them; the CPU reference's tokens, and the host tier
    registered with CUDA at its exact size."""
    from test_disk_offload import disk_run, ram_for

    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.runtime.planning.planner import draft_bytes_estimate

    path, _ = tiny("mixtral", "top3")
    prompt = list(range(3, 20))
    expected, _ = run_engine(path, prompt, 16, backend="cpu")
    draft = draft_bytes_estimate(Checkpoint(path).config) if policy == "moespeq" else 0  # as the mock's test
    vram = vram_for_slots(path, 3, len(prompt) + 16, backend="cuda") + draft
    got, eng = disk_run(path, prompt, 16, policy, ram_for(path, 5), backend="cuda", vram=vram, hardware="h100-pcie")
    assert got == expected
    assert eng.plan.disk_tier and eng.last_stats.bytes_read > 0
    assert any(iv.kind == "read" for iv in eng.backend.timeline.intervals)


@pytest.mark.parametrize("policy", ["lru", "gate-prefetch", "moespeq"])
def test_cuda_layers_experts_in_one_grouped_call(tiny, policy):
    """On a GPU with a grouped GEMM kernel (bf16, Hopper or Blackwell) a layer's experts run
    as one torch._grouped_mm per projection over the slot block; its products match
    per-expert ones. Elsewhere (torch's fallback syncs) experts go one by one."""
    import torch.nn.functional as F

    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("no grouped GEMM kernel on this GPU: experts are computed one by one")
    x = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 128, 64, device="cuda", dtype=torch.bfloat16)  # [slots, out, in]
    offs = torch.tensor([1, 1, 3, 3], dtype=torch.int32, device="cuda")  # slot 1 and 3: no rows
    y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    torch.testing.assert_close(y, torch.cat([F.linear(x[:1], w[0]), F.linear(x[1:], w[2])]), rtol=2e-2, atol=2e-2)
    path, _ = tiny("mixtral", "wide", dtype=torch.bfloat16)
    got, eng = run_engine(path, list(range(3, 24)), 16, backend="cuda", policy=policy, slots=6)
    assert eng.target_exec.grouped is not None and len(got) == 16


def test_cuda_fp8_slots_dequantized_together(tiny, tmp_path):
    """Block-FP8 slots gathered and dequantized together on the GPU (executors/grouped.py):
    the same bits as matrix by matrix, and with a grouped GEMM kernel a run of a bf16
    checkpoint's FP8 copy takes that path and decodes."""
    from tiny_models import fp8_copies

    from moespeq_cli.models.expert_format import HF_EXPERTS, fp8_dequantize, fp8_experts
    from moespeq_cli.runtime.executors.grouped import tiny_slot

    for tiles in (True, False):
        at, block = tiny_slot(fp8_experts(HF_EXPERTS, (128, 128)), 64, tiles, 16)
        slot, nbytes = at.compact, block.shape[1]
        slots = torch.randint(0, 120, (5, nbytes), dtype=torch.uint8, device="cuda")  # finite e4m3 codes
        for j in (1, 3, 5):  # scales: positive floats
            n = 4 * (-(-64 // slot.block[0])) ** 2
            slots[:, slot.starts[j] : slot.starts[j] + n] = (
                torch.rand(5, n // 4, device="cuda").view(torch.uint8).view(5, n)
            )
        got = slot.dequantize(slots, torch.bfloat16)
        for j, pos in zip((0, 2, 4), (0, 4096, 8192), strict=True):
            want = fp8_dequantize(
                slot.part(slots, j, torch.float8_e4m3fn),
                slot.part(slots, j + 1, torch.float32),
                slot.block,
                torch.bfloat16,
            )
            assert torch.equal(got[:, pos : pos + 4096].view(5, 64, 64), want)
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("no grouped GEMM kernel on this GPU: FP8 experts are computed one by one")
    src, _ = tiny("deepseek_v3", "v3", dtype=torch.bfloat16)
    path, _ = fp8_copies(src, tmp_path)
    got, eng = run_engine(path, list(range(3, 24)), 16, backend="cuda", policy="lru", slots=6)
    assert eng.target_exec.grouped.compact is not None and len(got) == 16


def test_cuda_gpt_oss_experts_grouped(tiny, tmp_path):
    """gpt-oss's experts, bf16 and MXFP4, computed a layer at a time on a GPU with a
    grouped GEMM kernel (each row's biases from its slot, found on the device)."""
    from tiny_models import mxfp4_copy

    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("no grouped GEMM kernel on this GPU: gpt-oss's experts are computed one by one")
    src, _ = tiny("gpt_oss", "mx", dtype=torch.bfloat16)
    for path in (src, mxfp4_copy(src, tmp_path / "mx")):
        got, eng = run_engine(path, list(range(3, 24)), 16, backend="cuda", policy="lru", slots=4)
        at = eng.target_exec.grouped
        assert at is not None and at.biases is not None and len(got) == 16


def test_cuda_draft_layer_dequantized_together(tiny):
    """bitsandbytes' CUDA dequantize gives the values the op computes on the CPU, and a
    draft layer in one grouped call (bf16 on Hopper/Blackwell) equals its experts one by
    one (executors/draft.py)."""
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.quant.dequant import dequantize_4bit
    from moespeq_cli.quant.draft import QuantizedExperts
    from moespeq_cli.runtime.executors.draft import DraftExperts
    from moespeq_cli.runtime.executors.experts import grouped, token_groups
    from moespeq_cli.runtime.executors.grouped import supported

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    if not supported(cuda, bf16):
        pytest.skip("this GPU has no grouped GEMM kernel: the draft goes expert by expert")
    path, _ = tiny("qwen3_moe", "base")
    c = Checkpoint(path).config
    quant = QuantizedExperts.quantize(Checkpoint(path), "nf4", 64, bf16).to(cuda)
    layer = c.moe_layers[-1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, c.hidden_size, generator=g).to(cuda, bf16)
    ids = torch.stack([torch.randperm(c.num_experts, generator=g)[: c.top_k] for _ in range(3)]).to(cuda)
    weights = torch.rand(3, c.top_k, generator=g).to(cuda, bf16)
    groups = token_groups(ids)
    before = grouped(x, ids, weights, lambda e, xe: quant.forward_reference(layer, e, xe), groups=groups)
    blocks = quant.stack([layer], cuda)
    codes, absmax = blocks[layer]
    table = quant.q[(layer, 0)][0][1].code
    on_gpu = dequantize_4bit(codes, absmax, table, 64, "nf4", bf16)
    assert torch.equal(on_gpu.cpu(), dequantize_4bit(codes.cpu(), absmax.cpu(), table.cpu(), 64, "nf4", bf16))
    together = DraftExperts(quant, None, blocks=blocks, top_k=c.top_k)(layer, x, ids, weights, ids.tolist())
    torch.testing.assert_close(together.float(), before.float(), rtol=2e-2, atol=2e-2)  # bf16 sums in another order


@pytest.mark.parametrize(
    "family,variant", [("deepseek_v3", "flat"), ("glm4_moe_lite", "sparse_all"), ("gpt_oss", "alternating")]
)
def test_cuda_bf16_models_run_close_to_float32(tiny, family, variant):
    """bf16 on the GPU (the tests above run float32): an MLA model with the half-split
    rotary layout (its rotated parts were float32 where the latent is bf16: SDPA refuses
    mixed dtypes), and gpt-oss's tiled attention with sinks; a prefill, a verification
    block and single steps against the same weights in float32."""
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.models.loader import load_model
    from moespeq_cli.runtime.executors.experts import InMemoryExperts

    path, _ = tiny(family, variant, torch.bfloat16)
    ids = torch.randint(3, 200, (24,), generator=torch.Generator().manual_seed(4)).cuda()

    def model(dtype):
        ck = Checkpoint(path)
        m = load_model(ck, dtype).cuda()
        m.set_experts(InMemoryExperts(ck, dtype))
        return m

    with torch.no_grad():
        full = model(torch.float32)
        want = full(ids, full.new_cache())
        m = model(torch.bfloat16)
        cache = m.new_cache()
        got = torch.cat([m(ids[:16], cache), m(ids[16:21], cache)] + [m(ids[i : i + 1], cache) for i in range(21, 24)])
    assert got.dtype == torch.bfloat16
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 0.15


def test_cuda_absorbed_mla_attention_takes_a_fused_kernel():
    """Absorbed MLA attention (one latent head, 576-wide keys, 512-wide values that are a
    view of them) as `MLAttention.core` calls SDPA, under the memory-efficient backend
    alone: a fused kernel takes it (the math backend widens the cache to float32)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, T, L, r, rope = 16, 5, 1024, 512, 64
    q = torch.randn(1, 1, H * T, r + rope, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, L, r + rope, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(T, L, dtype=torch.bool, device="cuda").tril(L - T).repeat(H, 1)  # rows (head, query)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, k[..., :r], attn_mask=mask, scale=0.1)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), k[..., :r].float(), attn_mask=mask, scale=0.1)
    assert float((out.float() - ref).abs().max()) < 5e-2


def test_cuda_grouped_call_over_more_than_1023_slots():
    """CUDA's _grouped_mm refuses 1,024 groups a call (torch's CPU kernel has no limit): a
    layer whose experts sit in slots 0 and 1,500 of a block is split into calls of at most
    1,023 columns, and gives the per-expert products."""
    import torch.nn.functional as F

    from moespeq_cli.models.expert_format import SWIGLU, ExpertFormat
    from moespeq_cli.runtime.executors.experts import token_groups
    from moespeq_cli.runtime.executors.grouped import (
        MAX_GROUPS,
        BatchedParts,
        combine,
        plan_layout,
        run_phase,
        views_of,
    )

    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("no grouped GEMM kernel on this GPU: experts are computed one by one")
    H, I, n = 64, 32, 1600  # noqa: E741
    fmt = ExpertFormat(("w1", "w3", "w2"), "layers.{layer}.experts.{expert}.", SWIGLU)
    at = BatchedParts(0, I * H, 2 * I * H, I, H)
    block = torch.randn(n, 3 * I * H, device="cuda", dtype=torch.bfloat16) * 0.1
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    where = {0: (0, 0), 1: (0, 1500)}
    layout = plan_layout(token_groups(ids), [[0, 1]], where, [], 3, 2, gather=False)
    assert len(layout.calls) == 2 and all(c[6] <= MAX_GROUPS for c in layout.calls)
    meta = torch.tensor(layout.values, dtype=torch.int32, device="cuda")
    x = torch.randn(3, H, device="cuda", dtype=torch.bfloat16)
    w = torch.full((3, 2), 0.5, device="cuda", dtype=torch.bfloat16)
    got = combine(layout, meta, run_phase(fmt, at, [block], layout, meta, x, 0, None), w, x.dtype)

    def expert(slot, xs):
        gate_up, down = views_of(block[slot : slot + 1], at)  # gate|up [1, 2I, H], down [1, H, I]
        gu = F.linear(xs, gate_up[0])
        return F.linear(F.silu(gu[:, :I]) * gu[:, I:], down[0])

    want = 0.5 * (expert(0, x) + expert(1500, x))
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
