"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi-K2, GLM-4.7-Flash) caches the latent,
not per-head keys and values, and attends absorbed over it (models/deepseek_v2.py). Its
logits against transformers are test_parity's; here: what the cache holds, what the plan
counts for it, and the CPU backend's absorbed products in the kernels."""

import pytest
import torch

from moespeq_cli import kernels
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.deepseek_v2 import MLAttention
from moespeq_cli.models.loader import load_model
from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.executors.experts import InMemoryExperts
from moespeq_cli.runtime.planning.planner import kv_cache_bytes

MLA = [("deepseek_v2", "lite"), ("deepseek_v3", "v3"), ("glm4_moe_lite", "flash")]


def loaded(path):
    ck = Checkpoint(path)
    model = load_model(ck, None)
    model.set_experts(InMemoryExperts(ck, ck.config.dtype))
    return model


@pytest.mark.parametrize("family,variant", MLA)
def test_the_cache_holds_one_latent_row_a_position_and_the_plan_counts_it(tiny, family, variant):
    path, _ = tiny(family, variant)
    model = loaded(path)
    attns = [layer.attn for layer in model.model.layers]
    assert attns and all(isinstance(a, MLAttention) for a in attns)
    cache = model.new_cache()
    model(torch.arange(3, 14), cache)
    model(torch.tensor([20]), cache)
    for i, a in enumerate(attns):
        row = a.kv_lora + a.rope_dim
        assert cache.k[i].shape[0] == 1 and cache.k[i].shape[2] == row and cache.k[i].shape[1] >= 12
        assert cache.v[i].shape[2] == 0  # the values are a view of the row
        expanded = a.heads * (a.nope + a.rope_dim + a.v_dim)
        assert expanded > row  # what per-head keys and values would take a position
    assert kv_cache_bytes(model, 2, 100) == 100 * sum(2 * (a.kv_lora + a.rope_dim) for a in attns)
    # a rollback is the cache's truncation: the same logits as if the rejected token never came
    cache.truncate(11)
    again = model(torch.tensor([21]), cache)
    fresh = model.new_cache()
    model(torch.arange(3, 14), fresh)
    assert torch.equal(again, model(torch.tensor([21]), fresh))


def test_the_cpu_backend_absorbs_in_the_kernels_over_bf16_weights_batch_invariant(tiny, monkeypatch):
    """On the CPU backend (bf16 weights as stored, fp32 activations) a prefill expands the
    latents, a verification block attends absorbed with both products of every MLA layer
    one kernel call each, a pass's logits are the float32 model's, and the block's rows
    equal single steps' bit for bit (speculative decoding stays lossless)."""
    path, _ = tiny("glm4_moe_lite", "flash", torch.bfloat16)
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(32)
    model = eng.model
    assert model.model.layers[0].attn.kv_b_proj.weight.dtype == torch.bfloat16
    calls = []
    real = kernels.per_head
    monkeypatch.setattr(kernels, "per_head", lambda *a, **kw: calls.append(real(*a, **kw)) or calls[-1])
    ids = torch.randint(3, 200, (12,), generator=torch.Generator().manual_seed(4))
    attn = model.model.layers[0].attn
    assert not attn.absorbs(8, 8) and attn.absorbs(4, 12) and attn.absorbs(1, 12)
    cache = model.new_cache()
    prefill = model(ids[:8], cache)
    assert calls == []
    block = torch.cat([prefill, model(ids[8:12], cache)])
    assert calls == [True] * 2 * len(model.model.layers)
    steps = model.new_cache()
    single = torch.cat([model(ids[:8], steps)] + [model(ids[i : i + 1], steps) for i in range(8, 12)])
    assert torch.equal(block, single)
    # the float32 model over the same (widened) weights, through torch
    ck = Checkpoint(path)
    ref = load_model(ck, torch.float32)
    ref.set_experts(InMemoryExperts(ck, torch.float32))
    want = ref(ids, ref.new_cache())
    assert float((block - want).norm() / want.norm()) < 1e-5


def test_a_verification_block_equals_single_steps_at_a_short_context_too(tiny):
    """A block right after a short prefix absorbs as single steps do (a pass of up to
    ROLLBACK tokens continuing a cache always absorbs): it expanded there by the
    multiply-add count, and its rows differed from single steps' in the last bits."""
    path, _ = tiny("glm4_moe_lite", "flash", torch.bfloat16)
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(32)
    model = eng.model
    ids = torch.randint(3, 200, (8,), generator=torch.Generator().manual_seed(9))
    for prefix in (1, 2, 3):
        cache = model.new_cache()
        block = torch.cat([model(ids[:prefix], cache), model(ids[prefix:], cache)])
        cache = model.new_cache()
        steps = torch.cat([model(ids[:prefix], cache)] + [model(ids[i : i + 1], cache) for i in range(prefix, 8)])
        assert torch.equal(block, steps), prefix
