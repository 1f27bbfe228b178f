"""Block-FP8 checkpoints (DeepSeek-V3/R1, Kimi-K2 and the FP8 releases of GLM and Qwen):
e4m3 weights with a float32 ``weight_scale_inv`` per block. The experts stay FP8 in every
tier and are dequantized when computed; the dense layers are dequantized at load. The
oracle is transformers on the same weights dequantized (tiny_models.fp8_copies)."""

import json

import pytest
import torch
from offload_helpers import GROUPED_GPU, prompt_for, run_engine, vram_for_slots
from test_disk_offload import disk_run, ram_for
from tiny_models import CLASSES, edited_copy, fp8_copies

from moespeq_cli.errors import CheckpointError, UnsupportedModelError
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.loader import load_model
from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.executors.experts import InMemoryExperts
from moespeq_cli.runtime.planning.planner import draft_bytes_estimate
from moespeq_cli.runtime.sampling import SamplingParams
from moespeq_cli.runtime.tiers.disk import DiskExperts
from moespeq_cli.runtime.tiers.store import ExpertStore

# DeepSeek-V3's shape (MLA, first dense layer, shared experts), Mixtral's (sizes that leave
# partial blocks at the edges), Qwen3's (q/k norms)
CASES = [("deepseek_v3", "v3"), ("mixtral", "gqa"), ("qwen3_moe", "base")]


@pytest.fixture(scope="module")
def fp8_ckpts(tiny, tmp_path_factory):
    import transformers

    made = {}

    def get(family, variant):
        if (family, variant) not in made:
            src, _ = tiny(family, variant)
            q, plain = fp8_copies(src, tmp_path_factory.mktemp(f"fp8-{family}"))
            ref = getattr(transformers, CLASSES[family][1]).from_pretrained(plain, dtype=torch.float32).eval()
            made[(family, variant)] = q, ref
        return made[(family, variant)]

    return get


@pytest.mark.parametrize("family,variant", CASES)
@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["torch", "kernels"])
def test_logits_and_greedy_tokens_match_the_dequantized_reference(fp8_ckpts, family, variant, cpu_kernels):
    path, ref = fp8_ckpts(family, variant)
    ck = Checkpoint(path)
    assert ck.config.expert_format.quant == "fp8" and ck.config.expert_format.block == (16, 16)
    model = load_model(ck, torch.float32, cpu_kernels=cpu_kernels)
    model.set_experts(InMemoryExperts(ck, torch.float32, fast=cpu_kernels))
    ids = torch.tensor(prompt_for(2, 24))
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    assert float((model(ids, model.new_cache()) - want).norm() / want.norm()) < 1e-4
    prompt = prompt_for(3, 8)
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt) :].tolist()
    tokens, _ = run_engine(path, prompt, 32, backend="cpu")
    assert tokens == expected


def test_experts_stay_fp8_in_every_tier(fp8_ckpts):
    path, _ = fp8_ckpts("deepseek_v3", "v3")
    ck = Checkpoint(path)
    c = ck.config
    h, i = c.hidden_size, c.expert_intermediate
    scales = sum(-(-r // 16) * -(-k // 16) * 4 for r, k in ((i, h), (i, h), (h, i)))
    stored = c.expert_bytes(4)
    assert stored == 3 * h * i + scales  # a byte a weight and the block scales
    assert ExpertStore(ck, torch.float32).nbytes == stored == DiskExperts(ck).nbytes
    assert [p.dtype for p in ck.expert(c.moe_layers[0], 1)] == [torch.float8_e4m3fn, torch.float32] * 3
    prompt = prompt_for(8, 10)
    expected, _ = run_engine(path, prompt, 16, backend="cpu")
    total = c.num_experts * len(c.moe_layers)
    for policy in ("lru", "moespeq"):  # the disk tier, reading the stored bytes
        got, eng = disk_run(path, prompt, 16, policy, ram_for(path, total // 2))
        assert got == expected and eng.last_stats.bytes_read % stored == 0 and eng.last_stats.bytes_read > 0
    for policy in ("gate-prefetch", "moespeq", "hybrid"):  # a GPU on the mock clock: copies move FP8
        got, eng = run_engine(path, prompt, 16, "mock", policy, c.top_k + 2, GROUPED_GPU)
        assert got == expected, policy
        assert eng.last_stats.bytes_h2d % stored == 0
        assert eng.target_exec.grouped.compact is not None  # a layer's slots dequantized together
    # a 4-bit draft of 8-bit experts is about half their size: it is planned, and runs
    vram = vram_for_slots(path, c.top_k + 2, 26) + draft_bytes_estimate(c)
    eng = Engine(path, EngineOptions(backend="mock", policy="moespeq", vram=vram, draft_verdict=False))
    eng.load(26)
    assert eng.plan.has_draft and draft_bytes_estimate(c) < 0.6 * stored * c.num_experts * len(c.moe_layers)
    assert [ev.token for ev in eng.generate(prompt, 16, SamplingParams())] == expected


def test_the_draft_quantizes_the_dequantized_experts(fp8_ckpts, cli, tmp_path):
    import shutil

    src, _ = fp8_ckpts("mixtral", "gqa")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    r = cli("quantize", str(path), "--json")
    assert r.exit_code == 0, r.stderr
    from moespeq_cli.models.expert_format import fp8_dequantize
    from moespeq_cli.quant.draft import QuantizedExperts

    ck = Checkpoint(path)
    out = json.loads(r.stdout)
    # measured against the experts as stored (FP8 and its scales), not the compute dtype's bytes
    stored = sum(t.numel() * t.element_size() for t in ck.expert(1, 3)) * out["experts"]
    assert out["full_precision_bytes"] == stored and out["ratio"] == round(out["draft_bytes"] / stored, 4)
    q = QuantizedExperts.load(out["draft"], ck)
    w, s = ck.expert(1, 3)[:2]
    gate = fp8_dequantize(w, s, (16, 16), torch.float32)
    assert float((q.weights(1, 3)[0] - gate).norm() / gate.norm()) < 0.25  # nf4 of the dequantized gate


def test_malformed_fp8_checkpoints_are_refused(fp8_ckpts, tiny, tmp_path):
    src, _ = fp8_ckpts("qwen3_moe", "base")
    path = edited_copy(src, tmp_path / "ckpt", config=lambda c: c["quantization_config"].pop("weight_block_size"))
    with pytest.raises(CheckpointError, match="weight_block_size"):
        Checkpoint(path)
    # fused experts (gpt-oss) in FP8: not a layout moespeq reads
    oss, _ = tiny("gpt_oss", "mx")
    fp8 = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    bad = edited_copy(oss, tmp_path / "oss", config=lambda c: c.update(quantization_config=fp8))
    with pytest.raises(UnsupportedModelError, match="block FP8"):
        Checkpoint(bad)


@pytest.mark.parametrize(
    "change,words",
    [
        # a dense weight's scale grid of the wrong shape
        (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight_scale_inv", torch.ones(1, 1)), "_scale_inv"),
        # an expert's scales in bf16: every tier holds compact experts as the format lays them out
        (
            lambda t: t.__setitem__(
                "model.layers.0.mlp.experts.1.up_proj.weight_scale_inv",
                t["model.layers.0.mlp.experts.1.up_proj.weight_scale_inv"].bfloat16(),
            ),
            "store it as F32",
        ),
    ],
)
def test_fp8_scales_that_disagree_are_refused_in_one_line(fp8_ckpts, cli, tmp_path, change, words):
    src, _ = fp8_ckpts("qwen3_moe", "base")
    path = edited_copy(src, tmp_path / "ckpt", tensors=change)
    r = cli("run", str(path), "-p", "hi", "-n", "2", "--backend", "cpu")
    assert r.exit_code == 1 and words in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1


def test_sizes_that_would_misalign_compact_parts_are_refused(tiny, tmp_path):
    """Mixtral-shaped experts of 30 x 21: FP8 matrices of 630 bytes would put the next
    part's float32 scales at an odd offset."""
    import transformers
    from tiny_models import COMMON, byte_tokenizer_json

    cfg = transformers.MixtralConfig(
        **{
            **COMMON,
            **dict(
                hidden_size=30,
                intermediate_size=21,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                num_local_experts=3,
                num_experts_per_tok=2,
            ),
        }
    )
    src = tmp_path / "src"
    transformers.MixtralForCausalLM(cfg).save_pretrained(src)
    (src / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
    path, _ = fp8_copies(src, tmp_path / "fp8")
    with pytest.raises(CheckpointError, match="misalign"):
        DiskExperts(Checkpoint(path))
    with pytest.raises(CheckpointError, match="misalign"):
        ExpertStore(Checkpoint(path), torch.float32)


def expanded(w, s, block):
    """Block FP8 dequantized the plain way: every scale repeated over its block."""
    bm, bn = block
    rows, cols = w.shape[-2:]
    full = s.repeat_interleave(bm, dim=-2)[..., :rows, :].repeat_interleave(bn, dim=-1)[..., :cols]
    return w.float() * full


@pytest.mark.parametrize("shape,block", [((64, 96), (16, 32)), ((40, 56), (16, 16)), ((128, 256), (128, 128))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_dequantization_is_bit_exact(shape, block, dtype):
    """Broadcast over whole blocks (or expanded where they do not tile), for a batch of
    experts at once and into a given block: the same bits as the plain way."""
    from moespeq_cli.models.expert_format import fp8_dequantize

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(3, *shape, generator=g) * 40).to(torch.float8_e4m3fn)
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    s = torch.rand(3, *grid, generator=g) / 7
    want = expanded(w, s, block).to(dtype)
    assert torch.equal(fp8_dequantize(w, s, block, dtype), want)
    assert torch.equal(fp8_dequantize(w[1], s[1], block, dtype), want[1])
    out = torch.empty(3, 2 * shape[0] * shape[1], dtype=dtype)[:, 5 : 5 + shape[0] * shape[1]]
    assert torch.equal(fp8_dequantize(w, s, block, dtype, out=out).view(3, *shape), want)


@pytest.mark.parametrize("family,variant", [("deepseek_v3", "v3"), ("mixtral", "gqa")])
def test_a_layer_s_fp8_slots_dequantized_together_match(fp8_ckpts, tiny, family, variant):
    """On a GPU's slots (the mock) block-FP8 experts are gathered and dequantized together,
    then computed as one grouped product: the same tokens as the CPU, expert by expert, and
    a layer's ops those of the unquantized checkpoint and the dequantization's few (the
    used slots gathered, the output allocated, then a widening and a product a matrix;
    Mixtral's sizes leave partial blocks, whose scales are expanded first: two more), not a
    dequantization per expert (deepseek_v3: 122.5 ops a layer that way, 83.5 unquantized)."""
    from test_grouped import target_ops_per_layer

    from moespeq_cli.runtime.executors.grouped import Fp8Slot

    path, _ = fp8_ckpts(family, variant)
    c = Checkpoint(path).config
    prompt = prompt_for(4, 9)
    expected, _ = run_engine(path, prompt, 24, backend="cpu")
    got, eng = run_engine(path, prompt, 24, "mock", "lru", c.top_k + 3, GROUPED_GPU)
    slot = eng.target_exec.grouped.compact
    assert isinstance(slot, Fp8Slot) and slot.tiles == (family == "deepseek_v3")
    assert got == expected
    plain = target_ops_per_layer(tiny(family, variant)[0], "lru")
    assert target_ops_per_layer(path, "lru") <= plain + 2 + 3 * (2 if slot.tiles else 4)


def test_dequantizing_on_the_device_is_priced_by_the_bytes_it_moves():
    """The mock and the plan charge a block-FP8 expert computed on the device for what its
    code moves (counted): the slots gathered (read, written: a byte a weight each), each
    matrix widened to float32 (1 read, 4 written) and scaled into bf16 (4 read, 2 written),
    then the product's read of the bf16 weights, not the byte a weight of a fused kernel."""
    from moespeq_cli.models.expert_format import HF_EXPERTS, fp8_experts
    from moespeq_cli.runtime.executors.grouped import dequant_traffic

    fmt = fp8_experts(HF_EXPERTS, (128, 128))
    assert dequant_traffic(fmt, torch.bfloat16) == pytest.approx(2 + 5 + 6, abs=0.1)
    assert (
        dequant_traffic(fmt, torch.bfloat16, tiles=False) > dequant_traffic(fmt, torch.bfloat16) + 4
    )  # scales expanded
    assert dequant_traffic(HF_EXPERTS, torch.bfloat16) == 0


def test_the_mock_charges_fp8_experts_their_dequantization(fp8_ckpts):
    path, _ = fp8_ckpts("deepseek_v3", "v3")
    c = Checkpoint(path).config
    _, eng = run_engine(path, prompt_for(5, 6), 4, "mock", "lru", c.top_k + 2, GROUPED_GPU)
    ex = eng.target_exec
    assert c.dtype == torch.float32  # so: gathered 2, widened 5, scaled 8, read by the product 4
    assert ex.grouped_elem == pytest.approx(19, abs=0.5) and ex.expert_elem < 1.1
    assert ex.grouped_cost(1).bytes > 18 * 3 * c.hidden_size * c.expert_intermediate


def test_many_experts_are_dequantized_a_few_at_a_time(fp8_ckpts, monkeypatch):
    """A prefill uses every expert of a layer: the slots are dequantized at most
    ``dequant_chunk`` at a time (the scratch the plan reserves), with the same tokens."""
    from moespeq_cli.runtime.executors import grouped as g

    path, _ = fp8_ckpts("deepseek_v3", "v3")
    c = Checkpoint(path).config
    prompt = prompt_for(6, 24)
    expected, _ = run_engine(path, prompt, 6, backend="cpu")
    seen = []
    real = g.Fp8Slot.dequantize

    def watched(self, slots, dtype):
        seen.append(slots.shape[0])
        return real(self, slots, dtype)

    monkeypatch.setattr(g.Fp8Slot, "dequantize", watched)
    got, eng = run_engine(path, prompt, 6, "mock", "lru", c.num_experts, GROUPED_GPU)
    assert got == expected
    assert max(seen) == g.dequant_chunk(c.top_k) < c.num_experts  # the prefill's calls were cut
    assert eng.plan.workspace_bytes >= g.dequant_scratch_bytes(
        c.expert_format, c.hidden_size, c.expert_intermediate, c.top_k, 4
    )
