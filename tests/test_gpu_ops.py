"""The GPU path's ops: fewer launches a layer for the same bits, counted as a bf16 GPU
launches them (each op here is a kernel launch there)."""

import pytest
import torch

from moespeq_cli.models.base import RMSNorm, fuse_attention_projections, softmax_topk
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.loader import load_model
from moespeq_cli.runtime.executors.experts import InMemoryExperts
from moespeq_cli.runtime.executors.opcount import OpCounter

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_transformers_bits_in_two_ops(dtype):
    """Normalized in float32 and rounded to x's dtype, then times the weight: transformers'
    RMSNorm bit for bit, in two ops whatever the dtype (the widening and narrowing a bf16
    input took before were two more launches on a GPU)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    g = torch.Generator().manual_seed(1)
    ours, theirs = RMSNorm(96, 1e-6), Qwen3MoeRMSNorm(96, 1e-6)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(96, generator=g) + 0.5)
        ours.weight.copy_(theirs.weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = (torch.randn(7, 3, 96, generator=g) * 4).to(dtype)
    with torch.inference_mode(), OpCounter() as c:
        got = ours(x)
    with torch.inference_mode():
        assert torch.equal(bits(got), bits(theirs(x)))
    assert c.ops == 2, c.ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("keep_fp32", [False, True])
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_routing_chooses_as_transformers_in_fewer_ops(dtype, normalize, keep_fp32, seed):
    """Softmax then top-k (renormalised): the same experts as transformers' formula, the
    weights within a rounding (two units in the last place of the dtype they are kept in);
    renormalised, in two ops (top-k, a softmax over k) where the formula takes five and a
    cast. Paired with the next layer's logits (gate-prefetch), the same choices and the
    same weights in the same ops."""
    route = softmax_topk(4, normalize, keep_fp32)
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(64, 16, generator=g) * 3).to(dtype)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    want_w, want_ids = torch.topk(probs, 4, dim=-1)
    if normalize:
        want_w = want_w / want_w.sum(dim=-1, keepdim=True)
    kept = torch.float32 if keep_fp32 else dtype
    want_w = want_w.to(kept)
    with torch.inference_mode(), OpCounter() as c:
        ids, w = route(logits)
    assert torch.equal(ids, want_ids)
    assert w.dtype == kept
    ulp = torch.finfo(kept).eps
    torch.testing.assert_close(w, want_w, rtol=2 * ulp, atol=ulp / 2)
    assert c.ops == (2 if normalize else 2 + (kept != torch.float32)), c.ops
    assert torch.equal(route.select(logits), want_ids)
    nxt = (torch.randn(64, 16, generator=g) * 3).to(dtype)
    pair = torch.stack((logits, nxt), dim=1)  # [T, 2, E]
    with torch.inference_mode(), OpCounter() as paired:
        both, pw = route.paired(pair)
    assert torch.equal(both[:, 0], ids) and torch.equal(both[:, 1], route.select(nxt))
    assert torch.equal(bits(pw), bits(w))
    assert paired.ops == c.ops


def logits_of(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The prompt's logits, then a decoded token's and the ops its pass dispatched."""
    cache = model.new_cache()
    with torch.inference_mode():
        prompt = model(ids[:-1], cache)
        with OpCounter() as c:
            step = model(ids[-1:], cache)
    return prompt, step, c.ops


@pytest.mark.parametrize(("family", "variant", "fewer"), [("qwen3_moe", "base", 3), ("mixtral", "gqa", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_queries_and_keys_are_normalized_and_rotated_as_one_view(tiny, family, variant, fewer, dtype):
    """With q, k and v from one product (the device tier), queries and keys are normalized
    (Qwen3's per-head norms: one norm and one product by the weights side by side) and
    rotated as one view of its output: the same logits bit for bit as each on its own,
    ``fewer`` ops a layer in decoding (no copy joining them; Qwen3: one norm and one product
    fewer; a pass over several tokens also reads attention's output without a copy)."""
    path, _ = tiny(family, variant)
    ck = Checkpoint(path)
    models = []
    for joint in (True, False):
        model = load_model(ck, dtype)
        model.set_experts(InMemoryExperts(ck, dtype))
        fuse_attention_projections(model)
        for layer in model.model.layers:
            assert hasattr(layer.attn, "qk_weight")
            if not joint:
                del layer.attn.qk_weight  # each on its own, as before
        models.append(model)
    ids = torch.tensor([[5, 9, 200, 13, 77]]).flatten()
    (joint, joint_step, joint_ops), (apart, apart_step, apart_ops) = (logits_of(m, ids) for m in models)
    assert torch.equal(bits(joint), bits(apart)) and torch.equal(bits(joint_step), bits(apart_step))
    assert apart_ops - joint_ops == fewer * len(models[0].model.layers)


def test_the_mock_counts_casts_where_it_computes_in_the_gpus_dtype(tiny):
    """The mock computing a bf16 checkpoint in float32 (its default) leaves the casts of
    its float32 numerics out of its count (no GPU runs them); computing in bf16 (``--dtype
    bfloat16``, as ``scripts/count_ops.py`` counts) every cast it dispatches is a GPU's."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    path, _ = tiny("mixtral", "gqa", torch.bfloat16)
    for dtype, skipped in ((None, True), ("bfloat16", False)):
        eng = Engine(path, EngineOptions(backend="mock", policy="lru", dtype=dtype))
        eng.load(32)
        try:
            assert eng.backend.counter.skip_casts is skipped, dtype
        finally:
            eng.close()


@pytest.mark.parametrize(
    ("family", "variant"), [("qwen3_moe", "base"), ("qwen2_moe", "sparse_step"), ("mixtral", "top3")]
)
def test_gate_prefetch_guesses_in_the_routers_own_ops(tiny, family, variant):
    """On a GPU's slots every MoE router's weight is a view of one buffer in layer order,
    so a layer's and the next MoE layer's are one matrix: gate-prefetch's guess comes from
    the layer's own product and top-k, its ops those of lru (a router of its own added a
    product, a top-k and a join a layer), with the same tokens; nothing is held twice."""
    from offload_helpers import prompt_for, run_engine
    from test_grouped import target_ops_per_layer

    path, _ = tiny(family, variant)
    prompt = prompt_for(5, 7)
    tokens, eng = run_engine(path, prompt, 12, policy="lru", slots=5)
    assert eng.target_exec.cache.stats.prefetches == 0  # lru's router guesses too, and nothing is fetched
    blocks = [eng.model.moe_blocks[i] for i in sorted(eng.model.moe_blocks)]
    E = blocks[0].gate.out_features
    base = blocks[0].gate.weight
    for i, b in enumerate(blocks):
        assert b.gate.weight.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        if i + 1 < len(blocks):
            assert torch.equal(b.pair[:E], b.gate.weight) and torch.equal(b.pair[E:], blocks[i + 1].gate.weight)
    assert blocks[-1].pair is None
    prefetching, eng = run_engine(path, prompt, 12, policy="gate-prefetch", slots=5)
    assert prefetching == tokens and eng.target_exec.cache.stats.prefetches > 0
    assert target_ops_per_layer(path, "gate-prefetch") == target_ops_per_layer(path, "lru")
