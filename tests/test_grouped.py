"""A layer's experts on the device in a constant number of ops (executors/grouped.py):
the same outputs as computing them one by one, the same bits wherever the experts sit in
the slots and however the computation is split, and an op count that does not grow with
top-k (issue: the GPU path, item 4)."""

import random
import re
from pathlib import Path

import pytest
import torch
from live_bytes import LiveBytes
from offload_helpers import GROUPED_GPU, prompt_for, vram_for_slots

from moespeq_cli.models.expert_format import SWIGLU, ExpertFormat
from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.executors.experts import expert_mlp, grouped, token_groups
from moespeq_cli.runtime.executors.grouped import BatchedParts, combine, plan_layout, run_phase, views_of
from moespeq_cli.runtime.executors.opcount import OpCounter
from moespeq_cli.runtime.sampling import SamplingParams

# I a multiple of 32: torch's CPU elementwise loop runs a contiguous tensor's last n % 32
# floats through a scalar expf, an ulp away from its vectorized one on some CPUs (measured
# on a Sapphire Rapids VM: F.silu of one value differed with its position), so an expert's
# rows landing in that tail would change bits that this file's layouts do not control
H, I = 32, 32  # noqa: E741
FMT = ExpertFormat(("w1", "w3", "w2"), "layers.{layer}.experts.{expert}.", SWIGLU)


def arrangement(fused: bool) -> BatchedParts:
    """gate, up, down end to end (fused), or down between them."""
    return BatchedParts(0, I * H, 2 * I * H, I, H) if fused else BatchedParts(0, 2 * I * H, I * H, I, H)


def case(tokens: int, k: int, experts: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    mats = {
        e: (torch.randn(I, H, generator=g), torch.randn(I, H, generator=g), torch.randn(H, I, generator=g))
        for e in range(experts)
    }
    return x, ids, weights, mats


def blocks_for(mats, at: BatchedParts, placement: dict[int, tuple[int, int]], sizes: list[int]) -> list[torch.Tensor]:
    """Slot blocks holding each expert where ``placement`` says, random bytes elsewhere."""
    blocks = [torch.randn(n, 3 * I * H) for n in sizes]
    for e, (b, row) in placement.items():
        parts = views_of(blocks[b][row : row + 1], at)
        if len(parts) == 2:
            parts[0][0, :I].copy_(mats[e][0])
            parts[0][0, I:].copy_(mats[e][1])
        else:
            parts[0][0].copy_(mats[e][0])
            parts[1][0].copy_(mats[e][1])
        parts[-1][0].copy_(mats[e][2])
    return blocks


def run_grouped(x, ids, weights, mats, at, placement, sizes, phases, host=()):
    groups = token_groups(ids)
    blocks = blocks_for(mats, at, {e: placement[e] for e in groups if e not in host}, sizes)
    layout = plan_layout(groups, phases, placement, sorted(host), x.shape[0], ids.shape[1], gather=False)
    meta = torch.tensor(layout.values, dtype=torch.int32)
    outs = []
    for phase in range(len(phases)):
        outs += run_phase(FMT, at, blocks, layout, meta, x, phase, gather=None)
    host_out = [expert_mlp(x[groups[e][0]], *mats[e]) for e in sorted(host)]
    return combine(layout, meta, outs + host_out, weights, x.dtype)


def placed(used: list[int], sizes: list[int], seed: int) -> dict[int, tuple[int, int]]:
    cells = [(b, r) for b, n in enumerate(sizes) for r in range(n)]
    random.Random(seed).shuffle(cells)
    return dict(zip(used, cells, strict=False))


@pytest.mark.parametrize("tokens,k", [(1, 2), (1, 8), (5, 2), (6, 4)])
@pytest.mark.parametrize("fused", [True, False])
def test_grouped_experts_equal_the_per_expert_sum(tokens, k, fused):
    """Every token's experts, computed together from wherever they sit, equal the
    per-expert computation (the offloading runtime's reference), and the bits do not
    depend on which slots hold them, how the blocks are split, which experts go in the
    first call or which come from the CPU: every policy gives the same result."""
    x, ids, weights, mats = case(tokens, k)
    groups = token_groups(ids)
    used = list(groups)
    reference = grouped(x, ids, weights, lambda e, xe: expert_mlp(xe, *mats[e]), groups=groups)
    at = arrangement(fused)
    results = []
    for seed, sizes in enumerate(([12], [7, 5], [4, 4, 6])):
        placement = placed(used, sizes, seed)
        half = used[: len(used) // 2]
        host = used[-1:] if seed == 2 and len(used) > 1 else []
        device = [e for e in used if e not in host]
        for phases in ([device], [[e for e in half if e in device], [e for e in device if e not in half]]):
            results.append(run_grouped(x, ids, weights, mats, at, placement, sizes, phases, host))
    torch.testing.assert_close(results[0], reference, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_the_layout_lists_each_slot_s_rows_in_order():
    """Token rows slot by slot, each slot's end offset (slots no token chose: empty
    groups), and for each token its outputs in ascending expert order."""
    groups = {3: ([0, 1], [1, 0]), 5: ([0], [0]), 9: ([1], [1])}
    where = {3: (0, 2), 5: (0, 0), 9: (0, 3)}
    lay = plan_layout(groups, [[3, 5, 9]], where, [], tokens=2, k=2, gather=False)
    (_, _, rows_at, rows_n, offs_at, _, cols_n, first) = lay.calls[0]
    assert first == 0
    assert lay.values[rows_at : rows_at + rows_n] == [0, 0, 1, 1]  # slot 0: expert 5; slot 2: expert 3; slot 3: 9
    assert lay.values[offs_at : offs_at + cols_n] == [1, 1, 3, 4]
    s_at, n = lay.src
    w_at, _ = lay.wsrc
    assert lay.values[s_at : s_at + n] == [1, 0, 2, 3]  # token 0: experts 3, 5; token 1: experts 3, 9
    assert lay.values[w_at : w_at + n] == [1, 0, 2, 3]  # their top-k positions
    # only the slots from the first used to the last are columns: work per layer does not
    # grow with the size of the cache
    far = plan_layout(groups, [[3, 5, 9]], {3: (0, 907), 5: (0, 905), 9: (0, 908)}, [], 2, 2, False)
    (_, _, _, _, offs_at, _, cols_n, first) = far.calls[0]
    assert first == 905 and far.values[offs_at : offs_at + cols_n] == [1, 1, 3, 4]


def test_ops_do_not_grow_with_top_k():
    """The grouped computation dispatches the same ops for top-1 and top-8."""
    counts = []
    for k in (1, 8):
        x, ids, weights, mats = case(1, k, experts=12)
        groups = token_groups(ids)
        placement = placed(list(groups), [12], 0)
        blocks = blocks_for(mats, arrangement(True), placement, [12])
        layout = plan_layout(groups, [list(groups)], placement, [], 1, k, gather=False)
        meta = torch.tensor(layout.values, dtype=torch.int32)
        with torch.inference_mode(), OpCounter() as c:
            outs = run_phase(FMT, arrangement(True), blocks, layout, meta, x, 0, None)
            combine(layout, meta, outs, weights, x.dtype)
        counts.append(c.ops)
    assert counts[0] == counts[1] <= 10, counts


def target_ops_per_layer(path, policy: str, depth="auto", tokens: int = 6, hardware=GROUPED_GPU) -> float:
    """Ops the target's passes dispatched per MoE layer per pass on the mock (the draft's
    passes apart), from the mock's charges: every op is charged once."""
    eng = Engine(path, EngineOptions(backend="mock", hardware=hardware, policy=policy, spec_depth=depth))
    prompt = prompt_for(11, 6)
    eng.load(len(prompt) + tokens + 8)
    try:
        stream = eng.generate(prompt, tokens + 1, SamplingParams())
        next(stream)  # the prompt
        first = len(eng.backend.timeline.intervals)
        for _ in stream:
            pass
        target = [iv for iv in eng.backend.timeline.intervals[first:] if iv.phase == "target"]
    finally:
        eng.close()
    passes = sum(iv.name == "framework" for iv in target)
    return sum(iv.ops for iv in target) / passes / len(eng.ckpt.config.moe_layers)


@pytest.mark.parametrize("policy,depth", [("lru", "auto"), ("gate-prefetch", "auto"), ("moespeq", "3")])
def test_at_most_40_ops_per_moe_layer_whatever_top_k(tiny, policy, depth):
    """Plain decoding and verification: at most 40 ops per MoE layer per pass (attention
    included), about the same at top-1 as at top-4."""
    per_layer = {}
    for family, variant in (("mixtral", "top1"), ("mixtral", "top3"), ("qwen3_moe", "base")):
        path, _ = tiny(family, variant)
        per_layer[(family, variant)] = target_ops_per_layer(path, policy, depth)
    assert max(per_layer.values()) <= 40, per_layer
    mixtral = [per_layer[("mixtral", v)] for v in ("top1", "top3")]
    assert abs(mixtral[0] - mixtral[1]) <= 3, per_layer  # top-3 costs no more launches than top-1


@pytest.mark.parametrize("variant", ["alternating", "mx"])
def test_gpt_oss_experts_grouped_with_their_biases(tiny, variant):
    """gpt-oss's experts (stored [in, out], gate and up interleaved, biased, a clamped
    SwiGLU) computed a layer at a time on the mock: each row gets its slot's biases (found
    on the device), and the tokens are the CPU's."""
    from offload_helpers import run_engine

    from moespeq_cli.models.checkpoint import Checkpoint

    path, _ = tiny("gpt_oss", variant)
    c = Checkpoint(path).config
    prompt = prompt_for(3, 9)
    expected, _ = run_engine(path, prompt, 20, backend="cpu")
    for policy in ("lru", "gate-prefetch"):
        got, eng = run_engine(path, prompt, 20, "mock", policy, c.top_k + 2, GROUPED_GPU)
        at = eng.target_exec.grouped
        assert at is not None and at.biases is not None and at.in_out
        assert got == expected, policy


@pytest.mark.parametrize(
    "hardware,dtype,groups",
    [
        ("rtx3060-12gb", "bfloat16", False),  # Ada: torch's grouped GEMM falls back to a product per group
        ("h100-pcie", None, False),  # the checkpoint is float32: Hopper's kernel is bf16 only
        ("h100-pcie", "bfloat16", True),
        ("laptop-8gb", "bfloat16", False),
    ],
)
def test_the_mock_groups_a_layer_s_experts_only_where_the_gpu_would(tiny, hardware, dtype, groups):
    """The cuda backend computes a layer's experts in one grouped call only where torch has
    a real kernel for it (``supported``: bf16 on Hopper and Blackwell); a profile records
    that (``grouped_gemm``), and the mock and the plan's step model follow it: the same
    path, the same launches priced, as the GPU the profile describes."""
    from moespeq_cli.models import build_model
    from moespeq_cli.runtime.planning.estimate import StepModel

    path, _ = tiny("mixtral", "gqa")
    eng = Engine(path, EngineOptions(backend="mock", hardware=hardware, policy="lru", dtype=dtype))
    prompt = prompt_for(5, 6)
    eng.load(len(prompt) + 4)
    try:
        tokens = [ev.token for ev in eng.generate(prompt, 4, SamplingParams())]
        assert len(tokens) == 4
        assert (eng.target_exec.grouped is not None) == groups
        names = {iv.name for iv in eng.backend.timeline.intervals if iv.stream == "compute"}
        assert any(n.startswith("experts L") for n in names) == groups, sorted(names)[:20]
        assert any(n.startswith("expert L") for n in names) != groups
        ck = eng.ckpt
        step = StepModel(build_model(ck.arch, ck.raw_config, 16), ck.config, eng.hw, eng.storage_dtype, 16)
        assert (step.grouped_ops is not None) == groups
    finally:
        eng.close()


def test_the_mock_s_own_work_is_invisible_to_any_op_counter(tiny):
    """A bf16 GPU's grouped layer on the mock: the mock gathers and widens the weights into
    the float32 it computes in, work no GPU runs (``uncounted``). Neither the mock's counter
    nor one a caller holds around it (a script's, a test's) sees it: a caller's saw the
    gather, and scripts/count_ops.py subtracted the cast it had not seen."""
    path, _ = tiny("mixtral", "gqa")
    eng = Engine(path, EngineOptions(backend="mock", hardware="h100-pcie", policy="lru"))
    eng.load(16)
    try:
        b = eng.backend
        charged = b.counter.ops
        x = torch.ones(4, 8, dtype=torch.bfloat16)
        with torch.inference_mode(), OpCounter() as seen:
            with b.uncounted():
                x.index_select(0, torch.tensor([0, 2])).float()
            x.sum()
        assert seen.ops == 1 and b.counter.ops == charged  # the sum alone, outside
    finally:
        eng.close()


def test_a_call_never_spans_more_slots_than_cuda_groups():
    """CUDA's grouped GEMM refuses 1024 groups or more a call; a call's columns are every
    slot from the lowest the layer uses to the highest, so experts scattered over a block
    of thousands of slots (about 10 GB of Qwen3-30B-A3B's) are split into calls, with the
    same result."""
    from moespeq_cli.runtime.executors import grouped as g

    x, ids, weights, mats = case(5, 4, experts=10, seed=3)
    at = arrangement(True)
    used = sorted(token_groups(ids))
    far = {e: (0, [0, 1, 600, 1100, 1101, 2100, 2101, 2500, 3000, 3071][i]) for i, e in enumerate(used)}
    layout = plan_layout(token_groups(ids), [used], far, [], 5, 4, gather=False)
    assert all(call[6] <= g.MAX_GROUPS for call in layout.calls)
    assert len(layout.calls) > 1
    # the same bits as one call, on a block small enough for one (the CPU kernel has no limit)
    near = {e: (0, i) for i, e in enumerate(used)}
    want = run_grouped(x, ids, weights, mats, at, near, [len(used)], [used])
    got = run_grouped(x, ids, weights, mats, at, far, [3072], [used])
    assert torch.equal(got, want)


def test_misaligned_expert_matrices_are_not_grouped_for_a_gpu():
    """CUDA's grouped GEMM wants each matrix's start and row stride at multiples of 16
    bytes (torch's CPU kernel does not check, so only a GPU would fail): a shape that
    misaligns them is computed expert by expert there, and on the mock standing in for it."""
    from moespeq_cli.runtime.executors.grouped import aligned

    assert aligned(BatchedParts(0, 32 * 64, 2 * 32 * 64, 32, 64), 3 * 32 * 64, 2)
    assert not aligned(BatchedParts(0, 36 * 64, 2 * 36 * 64, 36, 64), 3 * 36 * 64, 2)  # 72-byte rows of down
    assert not aligned(BatchedParts(4, 4 + 32 * 64, 4 + 2 * 32 * 64, 32, 64), 4 + 3 * 32 * 64, 2)  # a start off by 8


def test_the_mock_and_the_plan_compute_a_misaligned_shape_expert_by_expert(tiny):
    """Mixtral's top3 config has an intermediate size of 36: 72-byte rows in bf16, which
    CUDA's grouped GEMM refuses. The mock standing in for an H100 computes its experts one
    by one, as the cuda backend now does, and the plan prices them so."""
    from moespeq_cli.models import build_model
    from moespeq_cli.runtime.planning.estimate import StepModel

    path, _ = tiny("mixtral", "top3")
    eng = Engine(path, EngineOptions(backend="mock", hardware="h100-pcie", policy="lru", dtype="bfloat16"))
    prompt = prompt_for(5, 6)
    eng.load(len(prompt) + 4)
    try:
        assert len([ev.token for ev in eng.generate(prompt, 4, SamplingParams())]) == 4
        assert eng.target_exec.grouped is None
        ck = eng.ckpt
        step = StepModel(build_model(ck.arch, ck.raw_config, 16), ck.config, eng.hw, eng.storage_dtype, 16)
        assert step.grouped_ops is None
    finally:
        eng.close()


def slow_link_grouped_gpu(tmp_path) -> str:
    """GROUPED_GPU with a 100 MB/s link: most misses are computed on the CPU."""
    text = re.sub(r"(?m)^link_bandwidth:.*$", "link_bandwidth: 1e8", Path(GROUPED_GPU).read_text())
    out = tmp_path / "slow-link-grouped-gpu.yaml"
    out.write_text(text)
    return str(out)


@pytest.mark.parametrize("policy", ["lru", "hybrid"])
@pytest.mark.parametrize("pairs", [None, 64])  # as shipped (the prompt's 960 pairs in one part), 8 tokens a part
def test_a_prompt_s_grouped_experts_stay_within_the_planned_workspace(tiny, monkeypatch, tmp_path, pairs, policy):
    """A prompt's grouped calls at top-8 held every (token, expert) pair's rows, gate|up and
    outputs at once: 1.23x the planned workspace on this checkpoint of Qwen3-30B-A3B's
    proportions. The plan reserves what one part holds, and a long prompt's parts keep
    within it: the same logits as one part, and every expert whose copy the pass issued
    waited for before a call reads it (where its tokens first use it, whichever part).
    With CPU experts (``hybrid`` over a slow link) too: a layer with CPU experts took its
    prompt in one part, past the reserve; each part now takes its rows of the CPU's
    outputs."""
    from moespeq_cli.runtime.executors import grouped as g

    path, _ = tiny("qwen3_moe", "top8")
    prompt = prompt_for(9, 120)
    hardware = GROUPED_GPU if policy == "lru" else slow_link_grouped_gpu(tmp_path)

    def prefill():  # 40 slots for 2 x 32 experts: the second layer's are copied during the pass
        vram = vram_for_slots(path, 40, len(prompt) + 2, hardware=hardware, policy=policy)
        opts = EngineOptions(backend="mock", hardware=hardware, policy=policy, vram=vram, draft_verdict=False)
        eng = Engine(path, opts)
        eng.load(len(prompt) + 2)
        b, cache = eng.backend, eng.target_exec.cache
        waited, loaded, on_cpu = set(), set(), []
        wait, load, host_result = b.wait, cache.load, b.host_result
        b.wait = lambda ev, layer=None, e=None, *a, **kw: waited.add((layer, e)) or wait(ev, layer, e, *a, **kw)
        cache.load = lambda key, *a, **kw: loaded.add(key) or load(key, *a, **kw)
        b.host_result = lambda job: on_cpu.append(job) or host_result(job)
        try:
            assert eng.target_exec.grouped is not None
            with torch.inference_mode(), LiveBytes() as seen:
                logits = eng.model(torch.tensor(prompt), eng.model.new_cache(), last_only=True)
            calls = [iv for iv in b.timeline.intervals if iv.name.startswith("experts L")]
            assert seen.peak <= eng.plan.workspace_bytes + eng.plan.kv_cache_bytes, (seen.peak, eng.plan)
            assert loaded <= waited, sorted(loaded - waited)
            # lru copies the misses, hybrid computes them on the CPU
            assert (bool(loaded), bool(on_cpu)) == ((True, False) if policy == "lru" else (False, True))
        finally:
            eng.close()
        return logits, len(calls)

    whole, one = prefill()
    if pairs is not None:
        monkeypatch.setattr(g, "GROUPED_PAIRS", pairs)
        monkeypatch.setattr(g, "ROWS_PER_EXPERT", 1)
        got, many = prefill()
        assert many >= 15 * 2 > one  # 15 parts a layer
        # (a slot's rows in parts feed torch's CPU kernel in other blocks: the last bits may move)
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
        assert int(got.argmax()) == int(whole.argmax())


def test_a_grouped_layer_records_one_release_for_its_experts(tiny):
    """Each ``record_release`` is a CUDA event created and recorded (microseconds of the
    host's time): a grouped layer's experts share the one point their calls end at, where
    it recorded one an expert (eight a layer at top-8)."""
    path, _ = tiny("qwen3_moe", "top8")
    eng = Engine(path, EngineOptions(backend="mock", hardware=GROUPED_GPU, policy="lru", draft_verdict=False))
    prompt = prompt_for(4, 6)
    eng.load(len(prompt) + 4)
    try:
        stream = eng.generate(prompt, 4, SamplingParams())
        next(stream)
        b = eng.backend
        calls, real = [], b.record_release
        b.record_release = lambda: calls.append(1) or real()
        passes = [0]
        hook = eng.model.register_forward_pre_hook(lambda *a: passes.__setitem__(0, passes[0] + 1))
        list(stream)
        hook.remove()
    finally:
        eng.close()
    assert eng.target_exec.grouped is not None and passes[0] == 3
    assert len(calls) == passes[0] * len(eng.ckpt.config.moe_layers), len(calls)
