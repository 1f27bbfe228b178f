"""gpt-oss's published checkpoints store the experts in MXFP4 (``_blocks`` / ``_scales``).
moespeq keeps them compact in every tier and dequantizes each expert when it computes; the
oracle is transformers' model of the same checkpoint, dequantized at load."""

import pytest
import torch
from offload_helpers import GROUPED_GPU, prompt_for, run_engine
from test_disk_offload import disk_run, ram_for
from tiny_models import edited_copy, mxfp4_copy, mxfp4_reference

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.expert_format import mxfp4_dequantize
from moespeq_cli.models.loader import load_model
from moespeq_cli.runtime.executors.experts import InMemoryExperts
from moespeq_cli.runtime.tiers.disk import DiskExperts
from moespeq_cli.runtime.tiers.store import ExpertStore


@pytest.fixture(scope="module")
def mx(tiny, tmp_path_factory):
    src, _ = tiny("gpt_oss", "mx")
    path = mxfp4_copy(src, tmp_path_factory.mktemp("mxfp4") / "ckpt")
    return path, mxfp4_reference(path)


def test_dequantize_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, (3, 5, 2), dtype=torch.uint8, generator=g)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    got = torch.stack([mxfp4_dequantize(blocks[e], scales[e], torch.float32) for e in range(3)])
    assert torch.equal(got.transpose(1, 2), want)


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["torch", "kernels"])
def test_logits_and_greedy_tokens_match_transformers(mx, cpu_kernels):
    path, ref = mx
    ck = Checkpoint(path)
    model = load_model(ck, torch.float32, cpu_kernels=cpu_kernels)
    model.set_experts(InMemoryExperts(ck, torch.float32, fast=cpu_kernels))
    ids = torch.tensor(prompt_for(3, 24))
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    got = model(ids, model.new_cache())
    assert float((got - want).norm() / want.norm()) < 1e-4
    prompt = prompt_for(4, 8)
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt) :].tolist()
    tokens, _ = run_engine(path, prompt, 32, backend="cpu")
    assert tokens == expected


def test_every_tier_holds_the_stored_bytes(mx):
    path, _ = mx
    ck = Checkpoint(path)
    c = ck.config
    stored = c.expert_bytes(4)
    # blocks (half a byte a weight) and scales (a byte per 32), biases as stored (float32 here)
    h, i = c.hidden_size, c.expert_intermediate
    assert stored == 3 * h * i // 2 + 3 * h * i // 32 + (2 * i + h) * 4
    assert ExpertStore(ck, torch.float32).nbytes == stored == DiskExperts(ck).nbytes
    parts = ck.expert(1, 2)
    assert [p.dtype for p in parts] == [torch.uint8, torch.uint8, torch.float32] * 2
    prompt = prompt_for(6, 10)
    expected, _ = run_engine(path, prompt, 16, backend="cpu")
    total = c.num_experts * len(c.moe_layers)
    # the disk tier: half the experts in RAM, every read the stored bytes
    for policy in ("lru", "moespeq"):
        got, eng = disk_run(path, prompt, 16, policy, ram_for(path, total // 2))
        assert got == expected and eng.plan.disk_tier and eng.tiers.disk.nbytes == stored
        assert eng.last_stats.bytes_read % stored == 0 and eng.last_stats.bytes_read > 0
    # a GPU on the mock clock: copies move the stored bytes
    for policy in ("lru", "gate-prefetch", "moespeq"):
        got, eng = run_engine(path, prompt, 16, backend="mock", policy=policy, slots=c.top_k + 1)
        assert got == expected, policy
        stats = eng.last_stats
        assert stats.bytes_h2d % stored == 0 and stats.bytes_h2d > 0
    assert eng.plan.draft_bytes == 0 and "4-bit already" in eng.plan.note  # no draft of 4-bit experts


def test_quantize_refuses_experts_that_are_4_bit_already(mx, cli):
    path, _ = mx
    r = cli("quantize", str(path))
    assert r.exit_code == 2 and "4-bit already" in r.stderr and "Traceback" not in r.stderr


def retyped(t: dict, name: str, dtype) -> None:
    t[name] = t[name].to(dtype)


def test_codes_stored_as_floats_are_refused(mx, tmp_path):
    path, _ = mx
    name = "model.layers.0.mlp.experts.down_proj_scales"
    bad = edited_copy(path, tmp_path / "bad", tensors=lambda t: retyped(t, name, torch.float32))
    with pytest.raises(CheckpointError, match="down_proj_scales .* store it as U8"):
        DiskExperts(Checkpoint(bad))


def test_other_quantization_methods_are_still_refused(tiny, tmp_path):
    src, _ = tiny("gpt_oss", "mx")
    fp8 = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    path = edited_copy(src, tmp_path / "fp8", config=lambda c: c.update(quantization_config=fp8))
    from moespeq_cli.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="fp8"):
        Checkpoint(path)


def test_options_that_need_a_draft_are_refused_for_4_bit_experts(mx, cli):
    path, _ = mx
    for opts in (["--spec-depth", "2"], ["--draft", str(path)]):
        r = cli("run", str(path), "-p", "hi", "-n", "2", "--backend", "mock", *opts)
        assert r.exit_code == 2 and "4-bit already" in r.stderr and "Traceback" not in r.stderr


def test_biases_in_another_dtype_than_the_config_are_refused(mx, tmp_path):
    path, _ = mx
    name = "model.layers.1.mlp.experts.gate_up_proj_bias"  # the config says float32
    bad = edited_copy(path, tmp_path / "bad", tensors=lambda t: retyped(t, name, torch.bfloat16))
    with pytest.raises(CheckpointError, match="gate_up_proj_bias .* store it as F32"):
        ExpertStore(Checkpoint(bad), torch.float32)


@pytest.mark.parametrize("policy", ["lru", "gate-prefetch", "moespeq"])
def test_a_layer_s_mxfp4_slots_dequantized_together_match(mx, tiny, policy):
    """On a GPU's slots (the mock) gpt-oss's MXFP4 experts are gathered and dequantized
    together, then computed as one grouped product with each row's biases: the CPU's
    tokens, and about the layer's ops of the bf16 checkpoint (53 a layer here) plus the
    dequantization's, its casts of codes and scales to indices counted (they are the GPU's
    work too): 75 in all, 82.5 expert by expert."""
    from test_grouped import target_ops_per_layer

    from moespeq_cli.runtime.executors.grouped import Mxfp4Slot

    path, _ = mx
    c = Checkpoint(path).config
    prompt = prompt_for(3, 9)
    expected, _ = run_engine(path, prompt, 20, backend="cpu")
    got, eng = run_engine(path, prompt, 20, "mock", policy, c.top_k + 2, GROUPED_GPU)
    assert got == expected
    assert isinstance(eng.target_exec.grouped.compact, Mxfp4Slot)
    if policy == "lru":
        plain = target_ops_per_layer(tiny("gpt_oss", "mx")[0], "lru")
        assert target_ops_per_layer(path, "lru") <= plain + 24 < 82
