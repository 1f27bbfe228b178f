"""The draft's layer in one grouped call (runtime/executors/draft.py): the same expert
outputs as one by one, lossless decoding, a constant number of ops whatever top-k, the
scratch memory reserved, and the cost model's choice at real models' shapes."""

import pytest
import torch
from offload_helpers import GROUPED_GPU, prompt_for, run_engine

from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.expert_format import HF_EXPERTS
from moespeq_cli.quant.dequant import dequantize_4bit
from moespeq_cli.quant.draft import QuantizedExperts
from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.executors.draft import GPU_EXPERT_OPS, DraftExperts, draft_groups, draft_layer_ops
from moespeq_cli.runtime.executors.experts import grouped, token_groups
from moespeq_cli.runtime.executors.opcount import OpCounter
from moespeq_cli.runtime.planning.hardware import load_profile
from moespeq_cli.runtime.sampling import SamplingParams


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantizing_experts_together_is_bitsandbytes_values_in_one_op(method, dtype):
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(96, 64, generator=g) for _ in range(3)]
    quantized = [F.quantize_4bit(m, blocksize=64, quant_type=method) for m in mats]
    codes = torch.stack([p.flatten() for p, _ in quantized])  # three "experts", a row each
    absmax = torch.stack([s.absmax for _, s in quantized])
    table = quantized[0][1].code
    with OpCounter() as counter:
        out = dequantize_4bit(codes, absmax, table, 64, method, dtype)
    assert counter.ops == 1  # one kernel on a GPU: one op here too
    assert out.shape == (3, 96 * 64) and out.dtype == dtype
    for row, (p, s) in enumerate(quantized):
        assert torch.equal(out[row], F.dequantize_4bit(p, s).flatten().to(dtype))
    with pytest.raises(ValueError, match="whole blocks"):  # a GPU reads the rows as one flat tensor
        dequantize_4bit(codes[:, :-16], absmax, table, 64, method, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("rows", "width", "blocksize"),
    # the last: 2 MiB of bf16 out, over the 256 KiB from which the kernel's pool shares the work
    [(3, 4096, 64), (1, 4096 + 32, 128), (4, 192, 64), (1, 2, 64), (2, 8192, 4096), (1, 100, 64), (4, 262144, 64)],
)
def test_the_cpu_kernels_dequantize_as_torch_does(rows, width, blocksize, dtype):
    """cpu_matvec.c ``ms_dequant_4bit`` (32 weights a step, a scalar tail, a partial last
    block) gives torch's values bit for bit, and both give ``table[code] * absmax`` rounded
    once (computed here on its own); a dtype the kernels do not take goes to torch."""
    from moespeq_cli import kernels
    from moespeq_cli.quant import dequant

    g = torch.Generator().manual_seed(width)
    codes = torch.randint(0, 256, (rows, width // 2), dtype=torch.uint8, generator=g)
    absmax = torch.rand(rows, -(-width // blocksize), generator=g) * 3
    table = torch.randn(16, generator=g)
    table[:2] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8])  # halfway between two bf16s: to the even one
    absmax[:, 0] = 1.0
    out = dequantize_4bit(codes, absmax, table, blocksize, "nf4", dtype)
    assert torch.equal(out, dequant._torch_values(codes, absmax, table, blocksize, dtype))
    nibbles = torch.stack((codes >> 4, codes & 15), -1).view(rows, width).long()
    scale = absmax.repeat_interleave(blocksize, dim=1)[:, :width]
    assert torch.equal(out, (table[nibbles] * scale).to(dtype))
    if dtype != torch.float16 and kernels.available():
        assert kernels.takes_dequantize_4bit(codes, absmax, table, blocksize, dtype)
        assert not kernels.takes_dequantize_4bit(codes, absmax[:, 1:], table, blocksize, dtype)  # too few scales
        two_partial = torch.zeros(2, 3, dtype=torch.uint8), torch.ones(2, 1)  # rows ending in partial blocks
        assert not kernels.takes_dequantize_4bit(*two_partial, table, 8, dtype)  # the rows' scales would shift
    if dtype == torch.bfloat16:  # the ties went to even, as torch rounds them
        ties = out.flatten()[: blocksize // 2][(nibbles.flatten()[: blocksize // 2] < 2)]
        assert set(ties.float().tolist()) <= {1.0, 1 + 2**-6}


def dequantized(quant: QuantizedExperts, layer: int, e: int) -> list[torch.Tensor]:
    """An expert's canonical matrices, each weight table[code] * absmax computed here (the
    high nibble first), independently of quant/dequant.py."""
    out = []
    for p, s in quant.q[(layer, e)]:
        flat = p.flatten()
        codes = torch.stack((flat >> 4, flat & 15), -1).flatten().long()
        scale = s.absmax.repeat_interleave(quant.blocksize)[: s.shape.numel()]
        out.append((s.code[codes][: s.shape.numel()] * scale).view(s.shape))
    return out


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_a_grouped_layer_equals_its_experts_one_by_one(tiny, method, tokens):
    """At one token and at five (more experts than one call dequantizes: two calls)."""
    path, _ = tiny("qwen3_moe", "base")
    quant = QuantizedExperts.quantize(Checkpoint(path), method, 64, torch.float32)
    c = Checkpoint(path).config
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, c.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(c.num_experts, generator=g)[: c.top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, c.top_k, generator=g)
    groups = token_groups(ids)
    assert tokens == 1 or len(groups) > c.top_k  # several calls of at most top-k experts
    layer = c.moe_layers[-1]

    def oracle(e, xe):
        return quant.format.forward_canonical(xe, *dequantized(quant, layer, e), None)

    expected = grouped(x, ids, weights, oracle, groups=groups)
    reference = grouped(x, ids, weights, lambda e, xe: quant.forward_reference(layer, e, xe), groups=groups)
    assert torch.equal(reference, expected)
    blocks = quant.stack([layer], torch.device("cpu"))
    assert quant.stackable()
    after = grouped(x, ids, weights, lambda e, xe: quant.forward_reference(layer, e, xe), groups=groups)
    assert torch.equal(after, expected)  # the experts' own tensors are views of the blocks now
    storage = blocks[layer][0].untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == storage for p, _ in quant.q[(layer, 0)])
    together = DraftExperts(quant, None, blocks=blocks, top_k=c.top_k)(layer, x, ids, weights, ids.tolist())
    torch.testing.assert_close(together, expected, rtol=1e-5, atol=1e-6)


def test_a_grouped_layer_takes_the_same_ops_at_any_top_k():
    counts = {k: draft_layer_ops(HF_EXPERTS, k, torch.bfloat16) for k in (1, 2, 8)}
    assert counts[1] == counts[2] == counts[8] <= 15, counts
    assert counts[8] < 8 * GPU_EXPERT_OPS  # where one by one grows with top-k


def draft_ops_per_layer(eng) -> float:
    draft = [iv for iv in eng.backend.timeline.intervals if iv.phase == "draft"]
    passes = sum(iv.name == "framework" for iv in draft)
    return sum(iv.ops for iv in draft) / passes / len(eng.ckpt.config.moe_layers)


@pytest.mark.parametrize(("family", "variant"), [("qwen3_moe", "base"), ("mixtral", "gqa")])
def test_on_a_grouped_gpu_the_draft_is_lossless_in_few_ops(tiny, family, variant):
    path, _ = tiny(family, variant)
    prompt = prompt_for(3, 6)
    expected, _ = run_engine(path, prompt, 16, backend="cpu")
    per_layer = {}
    for hardware in (GROUPED_GPU, "rtx3060-12gb"):
        opts = EngineOptions(backend="mock", hardware=hardware, policy="moespeq", spec_depth="3", draft_verdict=False)
        eng = Engine(path, opts)
        eng.load(len(prompt) + 24)
        try:
            got = [ev.token for ev in eng.generate(prompt, 16, SamplingParams())]
            assert got == expected, hardware
            assert bool(eng.draft_exec.blocks) is (hardware == GROUPED_GPU)  # the RTX card has no grouped kernel
            assert bool(eng.plan.draft_scratch_bytes) is (hardware == GROUPED_GPU)
            per_layer[hardware] = draft_ops_per_layer(eng)
        finally:
            eng.close()
    assert per_layer[GROUPED_GPU] <= 40 < per_layer["rtx3060-12gb"] or family == "mixtral", per_layer
    assert per_layer[GROUPED_GPU] < per_layer["rtx3060-12gb"], per_layer


def test_releasing_a_grouped_draft_gives_back_its_blocks_and_scratch(tiny):
    path, _ = tiny("qwen3_moe", "base")
    opts = EngineOptions(backend="mock", hardware=GROUPED_GPU, policy="moespeq", draft_verdict=False)
    eng = Engine(path, opts)
    eng.load(48)
    try:
        spec = eng.spec
        assert spec.draft.blocks and eng.plan.draft_scratch_bytes
        quant = spec.draft.quant
        assert spec.draft_bytes == quant.bytes_per_expert * len(quant.q) + eng.plan.draft_scratch_bytes
        used, held, extra = eng.backend.used, spec.draft_bytes, spec.spare_slots()
        eng.release_draft()
        assert spec.draft.blocks == {} and not quant.q
        assert eng.backend.used == used - held + extra * eng.cache.slot_bytes
    finally:
        eng.close()


def test_the_plan_reserves_the_scratch_only_where_the_draft_fits_beside_it(tiny):
    from moespeq_cli.runtime.planning.planner import checkpoint_plan

    path, _ = tiny("qwen3_moe", "base")
    ck = Checkpoint(path)
    loose = checkpoint_plan(ck, 48, 64 << 20, "moespeq", draft_scratch=1 << 20)
    assert loose.draft_scratch_bytes == 1 << 20 and loose.fixed_bytes >= loose.draft_bytes + (1 << 20)
    assert loose.rows()[-2][0].startswith("4-bit draft's dequantizing scratch")
    tight_budget = loose.fixed_bytes - (1 << 20) + ck.config.top_k * loose.expert_bytes + 1024
    tight = checkpoint_plan(ck, 48, tight_budget, "moespeq", draft_scratch=1 << 20)
    assert tight.has_draft and tight.draft_scratch_bytes == 0  # the draft fits, its scratch does not: one by one


@pytest.mark.parametrize(
    ("shape", "hardware", "groups"),
    [
        ((2048, 768, 8), "h100-pcie", True),  # Qwen3-30B-A3B: many small experts
        ((4096, 14336, 2), "h100-pcie", False),  # Mixtral-8x7B: few big ones
        ((2048, 768, 8), "rtx3060-12gb", False),  # no grouped GEMM kernel
    ],
)
def test_the_cost_model_groups_many_small_experts_not_few_big_ones(shape, hardware, groups):
    hidden, inter, k = shape
    assert draft_groups(load_profile(hardware), HF_EXPERTS, hidden, inter, k, 64, torch.bfloat16) is groups


def test_plan_prices_a_grouped_draft_layer_as_the_mock_charges_it(tiny):
    """``plan`` prices the grouped draft layer before any draft exists (work at
    ``grouped:<dtype>``, the ops counted on a tiny layer a launch each): the mock's charge
    for a decoding step's layer, its two regions together."""
    from moespeq_cli.runtime.planning.estimate import StepModel

    path, _ = tiny("qwen3_moe", "base")
    ck = Checkpoint(path)
    cfg = ck.config
    eng = Engine(path, EngineOptions(backend="mock", hardware=GROUPED_GPU, policy="moespeq", spec_depth="2"))
    prompt = prompt_for(4, 6)
    eng.load(len(prompt) + 12)
    try:
        assert eng.draft_exec.blocks
        for _ in eng.generate(prompt, 6, SamplingParams()):
            pass
        draft = [iv for iv in eng.backend.timeline.intervals if iv.phase == "draft" and "draft experts" in iv.name]
        layer = [iv for iv in draft if iv.layer == draft[-1].layer][-2:]  # a decoding step's call and its sum
        assert [iv.name.split(" L")[0] for iv in layer] == ["draft experts", "draft experts sum"]
        charged = sum(iv.duration for iv in layer)
        with torch.device("meta"):
            model = ck.arch.Model(ck.raw_config)
        step = StepModel(model, cfg, eng.backend.hw, cfg.dtype, 30)
        assert cfg.top_k * step.t_draft_expert(1.0, grouped=True) == pytest.approx(charged, rel=1e-6)
        assert step.t_draft_expert(1.0, grouped=True) != step.t_draft_expert(1.0)
    finally:
        eng.close()


def test_the_scratch_is_reserved_only_where_the_cost_model_finds_it_pays():
    """On the demo and the H100 profile the grouped draft is cheaper, but at a tight
    budget the 2 MB of scratch would take three of seven expert slots: the plan keeps the
    slots and the draft goes expert by expert. With room to spare the scratch is kept."""
    from moespeq_cli.model_ref import DEMO_DIR

    plans = {}
    for vram in (int(20.8 * 2**20), 64 << 20):
        eng = Engine(
            DEMO_DIR, EngineOptions(backend="mock", hardware="h100-pcie", policy="moespeq", spec_depth="4", vram=vram)
        )
        plans[vram] = eng.make_plan(160)
        assert eng.draft_scratch() > 0  # the draft could be grouped on this card
    tight, roomy = plans.values()
    assert tight.draft_scratch_bytes == 0 and tight.has_draft
    assert roomy.draft_scratch_bytes > 0


def test_plan_prices_a_grouped_draft_pass_as_the_mock_charges_it():
    """The whole one-token draft pass on the demo (H100 profile, the draft grouped): the
    model's pass without the per-expert executor's ops plus its grouped layers, against the
    mock's charge for the pass (its most common total: a pass over one token)."""
    from collections import Counter

    from moespeq_cli.model_ref import DEMO_DIR

    opts = EngineOptions(backend="mock", hardware="h100-pcie", policy="moespeq", spec_depth="4", vram="64MiB")
    eng = Engine(DEMO_DIR, opts)
    prompt = prompt_for(6, 10)
    context = len(prompt) + 24
    eng.load(context)
    try:
        assert eng.plan.draft_scratch_bytes and eng.draft_exec.blocks
        for _ in eng.generate(prompt, 24, SamplingParams()):
            pass
        passes, current = [], 0.0
        for iv in eng.backend.timeline.intervals:
            if iv.phase == "draft" and iv.stream == "compute":
                current += iv.duration
                if iv.name == "framework":  # a pass's glue closes it
                    passes.append(round(current * 1e9))
                    current = 0.0
        charged = Counter(passes).most_common(1)[0][0] / 1e9
        _, step = eng.step_model(context)
        plan, cfg = eng.plan, eng.ckpt.config
        on_device = plan.draft_device_experts / plan.total_experts
        modelled = step.draft_pass(True) + step.layers * cfg.top_k * step.t_draft_expert(on_device, grouped=True)
        assert modelled == pytest.approx(charged, rel=1e-3)
    finally:
        eng.close()


def test_the_draft_groups_only_16_byte_aligned_experts():
    """The draft's grouped call reads its dequantized block as CUDA's grouped GEMM does,
    whose rows must be 16-byte aligned: an intermediate size of 772 (1,544-byte rows in
    bf16) is computed expert by expert, as the target's experts are (it was grouped)."""
    hw = load_profile(GROUPED_GPU)
    assert draft_groups(hw, HF_EXPERTS, 2048, 768, 8, 64, torch.bfloat16)
    assert not draft_groups(hw, HF_EXPERTS, 2048, 772, 8, 64, torch.bfloat16)
