"""moespeq's CPU kernels (moespeq_cli/kernels): every fast path equals the reference
product within fp32-accumulation tolerance on odd shapes, a row's result does not depend
on the batch (what keeps speculative decoding exact with bf16 weights), and where the
kernels cannot be built moespeq falls back to torch with the same tokens."""

import functools

import pytest
import torch
import torch.nn.functional as F

from moespeq_cli import kernels
from moespeq_cli.kernels import build
from moespeq_cli.models.base import RMSNorm, attend
from moespeq_cli.models.rope import apply_rope
from moespeq_cli.runtime.executors.experts import expert_mlp

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"CPU kernels unavailable: {build.why_not}")

WDTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (tokens, out, in): below, at and above a 16-wide chunk and a 64-wide step, ragged tails
SHAPES = [(1, 1, 1), (1, 7, 13), (3, 33, 100), (4, 64, 64), (5, 129, 1000), (9, 17, 2049), (1, 300, 4096 + 17)]
FP32_TOL = 2e-6  # relative to the output's scale: fp32 accumulation in another order


def reference(x, w, b=None):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def scaled_err(got, want):
    return float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
@pytest.mark.parametrize("T,N,K", SHAPES)
def test_linear_matches_reference(T, N, K, wdtype):
    g = torch.Generator().manual_seed(T * 1000 + N + K)
    x = torch.randn(T, K, generator=g)
    w = torch.randn(N, K, generator=g).to(wdtype)
    b = torch.randn(N, generator=g)
    assert kernels.takes(x, w)
    assert scaled_err(kernels.linear(x, w), reference(x, w)) < FP32_TOL
    assert scaled_err(kernels.linear(x, w, b), reference(x, w, b)) < FP32_TOL
    hb = b.bfloat16()  # a bias in another dtype: widened for the call, and kept alive through it
    assert scaled_err(kernels.linear(x, w, hb), reference(x, w, hb.float())) < FP32_TOL


@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
def test_rows_do_not_depend_on_the_batch(wdtype):
    """A verification pass over T tokens and T single-token passes give the same bits."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(300, 1000, generator=g).to(wdtype)  # large enough to split over the pool
    x = torch.randn(kernels.MAX_ROWS, 1000, generator=g)
    together = kernels.linear(x, w)
    for T in (1, 2, 3, 5, 8, 13):
        assert torch.equal(kernels.linear(x[:T], w), together[:T])
    assert torch.equal(torch.cat([kernels.linear(x[i : i + 1], w) for i in range(9)]), together[:9])
    # one or two tokens read two rows at once (two streams), more read one at a time: a
    # chunk of an odd number of rows (37 rows: a short last chunk of 5) leaves one row alone
    odd = torch.randn(37, 1000, generator=g).to(wdtype)
    many = kernels.linear(x, odd)
    for T in (1, 2):
        assert torch.equal(kernels.linear(x[:T], odd), many[:T])
    assert kernels.linear(x[:0], odd).shape == (0, 37)
    guard = torch.full((4, 37), 7.0)  # no token: nothing written
    kernels._lib().ms_linear(x.data_ptr(), odd.data_ptr(), kernels.WTYPES[wdtype], None, guard.data_ptr(), 0, 37, 1000)
    assert bool((guard == 7.0).all())
    gate, up = torch.randn(2, 96, 80, generator=g).to(wdtype)
    down = torch.randn(80, 96, generator=g).to(wdtype)
    xs = torch.randn(6, 80, generator=g)
    batch = kernels.expert(xs, gate, up, down)
    assert torch.equal(torch.cat([kernels.expert(xs[i : i + 1], gate, up, down) for i in range(6)]), batch)


@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
@pytest.mark.parametrize("T,H,inter", [(1, 8, 5), (3, 100, 37), (7, 256, 1000)])
def test_expert_matches_reference(T, H, inter, wdtype):
    g = torch.Generator().manual_seed(H + inter)
    x = torch.randn(T, H, generator=g)
    gate, up = (torch.randn(inter, H, generator=g).to(wdtype) * H**-0.5 for _ in range(2))
    down = torch.randn(H, inter, generator=g).to(wdtype) * inter**-0.5
    want = F.linear(F.silu(F.linear(x.double(), gate.double())) * F.linear(x.double(), up.double()), down.double())
    assert scaled_err(kernels.expert(x, gate, up, down), want) < 1e-5
    assert scaled_err(expert_mlp(x, gate, up, down, fast=True), want) < 1e-5


@pytest.mark.parametrize("act", ["gelu_tanh", "gelu"])
def test_expert_with_a_gelu_gate_matches_reference(act):
    """Gemma 4's experts: the same kernel with a GELU gate."""
    g = torch.Generator().manual_seed(17)
    x = torch.randn(3, 100, generator=g)
    gate, up = (torch.randn(37, 100, generator=g).bfloat16() * 0.1 for _ in range(2))
    down = torch.randn(100, 37, generator=g).bfloat16() * 0.2
    fn = {"gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}[act]
    want = F.linear(fn(F.linear(x.double(), gate.double())) * F.linear(x.double(), up.double()), down.double())
    assert scaled_err(kernels.expert(x, gate, up, down, act), want) < 1e-5
    assert scaled_err(expert_mlp(x, gate, up, down, fast=True, act=act), want) < 1e-5
    silu = F.linear(F.silu(F.linear(x.double(), gate.double())) * F.linear(x.double(), up.double()), down.double())
    assert scaled_err(kernels.expert(x, gate, up, down, act), silu) > 1e-3  # the activation is the one asked for


def gpt_oss_parts(H, inter, wdtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        (torch.randn(H, 2 * inter, generator=g) * H**-0.5).to(wdtype),
        (torch.randn(2 * inter, generator=g) * 0.1).to(wdtype),
        (torch.randn(inter, H, generator=g) * inter**-0.5).to(wdtype),
        (torch.randn(H, generator=g) * 0.1).to(wdtype),
    )


@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
@pytest.mark.parametrize("T,H,inter", [(1, 8, 5), (3, 100, 37), (5, 17, 300), (2, 1000, 200)])
def test_transposed_expert_matches_the_gpt_oss_reference(T, H, inter, wdtype):
    """gpt-oss's expert from its parts as stored: x @ gate_up (interleaved columns) + bias,
    the clamped SwiGLU with a limit that binds, @ down + bias."""
    from moespeq_cli.models.expert_format import gpt_oss_experts

    fmt = gpt_oss_experts(1.702, 0.8)
    parts = gpt_oss_parts(H, inter, wdtype, T * H + inter)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1)) * 2
    want = fmt.forward(x.double(), [p.double() for p in parts])
    assert scaled_err(kernels.expert_transposed(x, *parts, 1.702, 0.8), want) < 1e-5
    from moespeq_cli.runtime.executors.experts import expert_forward

    assert scaled_err(expert_forward(fmt, x, parts, fast=True), want) < 1e-5
    unclamped = gpt_oss_experts(1.702, 100.0).forward(x.double(), [p.double() for p in parts])
    assert scaled_err(kernels.expert_transposed(x, *parts, 1.702, 0.8), unclamped) > 1e-3


def test_transposed_expert_does_not_depend_on_the_batch():
    parts = gpt_oss_parts(700, 300, torch.bfloat16, 3)  # about 1.3 MB: shared over the pool
    xs = torch.randn(7, 700, generator=torch.Generator().manual_seed(4))
    batch = kernels.expert_transposed(xs, *parts, 1.702, 7.0)
    single = torch.cat([kernels.expert_transposed(xs[i : i + 1], *parts, 1.702, 7.0) for i in range(7)])
    assert torch.equal(single, batch)
    assert torch.equal(kernels.expert_transposed(xs[:3], *parts, 1.702, 7.0), batch[:3])


@pytest.mark.parametrize("T,N,K", [(1, 5, 32), (3, 77, 96), (5, 300, 2880), (9, 129, 512)])
def test_mxfp4_linear_is_the_dequantized_product(T, N, K):
    """gpt-oss's MXFP4 experts read as stored: the product with the dequantized weights
    (each code times its power-of-two scale is exact in fp32), batch invariant."""
    from tiny_models import mxfp4

    from moespeq_cli.models.expert_format import mxfp4_dequantize

    g = torch.Generator().manual_seed(T + N + K)
    blocks, scales = mxfp4(torch.randn(N, K, generator=g))
    x, bias = torch.randn(T, K, generator=g), torch.randn(N, generator=g)
    assert kernels.takes_mxfp4(x, blocks, scales)
    want = reference(x, mxfp4_dequantize(blocks, scales, torch.float64), bias)
    got = kernels.linear_mxfp4(x, blocks, scales, bias)
    assert scaled_err(got, want) < FP32_TOL
    assert torch.equal(torch.cat([kernels.linear_mxfp4(x[i : i + 1], blocks, scales, bias) for i in range(T)]), got)


def nf4_weights(n: int, k: int, bs: int, method: str, g: torch.Generator):
    """(codes, absmax, table, W as float64) for a random [n, k] matrix quantized by
    bitsandbytes, W dequantized here in float64 from the codes (high nibble first)."""
    import bitsandbytes.functional as bnb

    q, s = bnb.quantize_4bit((torch.randn(n, k, generator=g) * 0.05).contiguous(), blocksize=bs, quant_type=method)
    flat = q.view(-1)
    idx = torch.stack((flat >> 4, flat & 15), -1).reshape(-1).long()
    w = (s.code.double()[idx].reshape(-1, bs) * s.absmax.double()[:, None]).reshape(n, k)
    return flat, s.absmax, s.code, w


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("T,N,K,bs", [(1, 5, 64, 64), (3, 77, 128, 64), (5, 300, 1024, 128), (9, 129, 512, 256)])
def test_4bit_linear_is_the_dequantized_product(T, N, K, bs, method):
    """The draft's 4-bit weights read as bitsandbytes stores them: the product with
    ``table[code] * absmax`` in fp32 (exact), batch invariant."""
    g = torch.Generator().manual_seed(T + N + K + bs)
    codes, absmax, table, w = nf4_weights(N, K, bs, method, g)
    x = torch.randn(T, K, generator=g)
    assert kernels.takes_nf4(x, codes, absmax, table, bs)
    got = kernels.linear_nf4(x, codes, absmax, table, bs, N)
    xr, wr = x, w
    if kernels.nf4_in_bf16():  # each weight rounded to bf16 from its fp32 product, the activations too
        xr, wr = x.to(torch.bfloat16), w.float().to(torch.bfloat16)
    assert scaled_err(got, reference(xr, wr)) < FP32_TOL
    assert torch.equal(
        torch.cat([kernels.linear_nf4(x[i : i + 1], codes, absmax, table, bs, N) for i in range(T)]), got
    )
    assert not kernels.takes_nf4(x, codes, absmax, table, 32)  # blocks of a multiple of 64 only


def test_the_draft_runs_moespeqs_4bit_kernel_on_the_cpu():
    """A draft whose shapes suit the kernel runs it (no repacking, no bitsandbytes op in
    the decode loop), within the 4-bit reference's rounding of the dequantized weights to
    the draft's dtype, for one token and for a prompt's many rows; without it, the
    reference path."""
    import bitsandbytes.functional as bnb

    from moespeq_cli.quant.draft import QuantizedExperts

    h, i = 128, 192
    g = torch.Generator().manual_seed(4)
    q = {
        (0, 0): [
            bnb.quantize_4bit((torch.randn(*s, generator=g) * 0.05).contiguous(), blocksize=64, quant_type="nf4")
            for s in ((i, h), (i, h), (h, i))
        ]
    }
    qe = QuantizedExperts(q, "nf4", 64, torch.float32, h, i)
    assert qe.kernel_ready() and qe.path((0, 0), "cpu") == "kernel" and qe.path((0, 0), "cuda") == "cuda"
    for rows in (1, 3, kernels.MAX_ROWS + 5):
        x = torch.randn(rows, h, generator=g)
        got, want = qe.forward(0, 0, x), qe.forward_reference(0, 0, x)
        assert got.dtype == x.dtype and got.shape == want.shape
        # fp32: the reference's own rounding; bf16 weights and activations: theirs
        assert float((got - want).norm() / want.norm()) < (1e-2 if kernels.nf4_in_bf16() else 1e-5)
        assert torch.equal(qe.forward(0, 0, x[:1]), got[:1])  # batch invariant: the draft's tokens do not depend on k
    qe.use_kernel = False
    assert qe.path((0, 0), "cpu") == "reference" and not qe.cpu_packed


@pytest.mark.parametrize(
    "T,N,K,block", [(1, 5, 32, (16, 16)), (3, 77, 100, (16, 32)), (5, 300, 2048, (128, 128)), (9, 129, 520, (128, 128))]
)
def test_fp8_linear_is_the_dequantized_product(T, N, K, block):
    """Block-FP8 weights read as stored: the product with the weights as dequantizing
    rounds them (partial edge blocks included), batch invariant."""
    from tiny_models import fp8

    from moespeq_cli.models.expert_format import fp8_dequantize

    g = torch.Generator().manual_seed(T + N + K)
    w, scale_inv = fp8(torch.randn(N, K, generator=g), block)
    x = torch.randn(T, K, generator=g)
    assert kernels.takes_fp8(x, w, scale_inv, block)
    got = kernels.linear_fp8(x, w, scale_inv, block)
    assert scaled_err(got, reference(x, fp8_dequantize(w, scale_inv, block, torch.float32))) < FP32_TOL
    assert torch.equal(torch.cat([kernels.linear_fp8(x[i : i + 1], w, scale_inv, block) for i in range(T)]), got)
    assert not kernels.takes_fp8(x, w, scale_inv, (16, 8))  # column blocks narrower than a chunk: torch


@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
@pytest.mark.parametrize("T,top_k", [(1, 1), (1, 2), (3, 2), (9, 4), (kernels.MAX_ROWS, 2)])
def test_a_layer_of_experts_in_one_call_is_grouped_bit_for_bit(wdtype, T, top_k):
    """``kernels.moe`` gives executors/experts.py ``grouped`` over ``expert``'s outputs
    exactly (each expert's rows together, weighted, summed in ascending expert order), for
    one token and for a verification's several: the plain path and the one-call path
    round alike, so speculative decoding stays lossless whichever a pass takes."""
    from moespeq_cli.runtime.executors.experts import grouped, token_groups

    g = torch.Generator().manual_seed(T * 10 + top_k)
    E, H, inter = 8, 40, 72
    parts = [
        tuple(torch.randn(*s, generator=g).to(wdtype) for s in ((inter, H), (inter, H), (H, inter))) for _ in range(E)
    ]
    table = kernels.ExpertTable(parts)
    x = torch.randn(T, H, generator=g)
    w, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=g), -1), top_k)
    assert kernels.takes_moe(x, ids, w, table)
    want = grouped(x, ids, w, lambda e, xe: expert_mlp(xe, *parts[e], fast=True), groups=token_groups(ids))
    assert torch.equal(kernels.moe(x, ids, w, table), want)
    # the same rows alone: a token's result does not depend on the others (batch invariance)
    alone = torch.cat([kernels.moe(x[t : t + 1].clone(), ids[t : t + 1], w[t : t + 1], table) for t in range(T)])
    assert torch.equal(alone, want)


def test_the_one_call_layer_is_refused_where_it_does_not_apply():
    ws = [(torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)) for _ in range(3)]
    table = kernels.ExpertTable(ws)
    x, ids, w = torch.randn(2, 4), torch.tensor([[0, 2], [1, 2]]), torch.rand(2, 2)
    assert kernels.takes_moe(x, ids, w, table)
    assert not kernels.takes_moe(x.double(), ids, w, table)  # activations other than fp32
    assert not kernels.takes_moe(x, ids.int(), w, table)
    assert not kernels.takes_moe(x, ids, w.half(), table)
    assert not kernels.takes_moe(torch.randn(kernels.MAX_ROWS + 1, 4), ids, w, table)
    mixed = kernels.ExpertTable([ws[0], (ws[1][0].bfloat16(), ws[1][1], ws[1][2]), ws[2]])
    assert not mixed.usable  # one dtype for every expert, or the torch path
    assert not kernels.ExpertTable([(t.t(), u, d) for t, u, d in ws]).usable  # not contiguous
    # routing the kernel refuses without computing (the per-expert path decides): an id
    # outside the table, a token choosing one expert twice (Phi-MoE's sparsemixer can)
    for bad in ([[0, 3], [1, 2]], [[0, -1], [1, 2]], [[2, 2], [1, 2]]):
        assert kernels.moe(x, torch.tensor(bad), w, table) is None
    assert kernels.moe(x, ids, w, table) is not None


def test_the_cpu_backend_computes_a_layer_s_experts_in_one_call(tiny, monkeypatch):
    """The cpu backend takes the one-call path for plain gated experts, for a prompt's
    rows and for single tokens, and its logits are the per-expert path's bit for bit."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    path, _ = tiny("mixtral", "gqa", torch.bfloat16)
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(32)
    assert eng.cpu_kernels
    model, calls = eng.model, []
    monkeypatch.setattr(kernels, "model_forward", lambda *a: None)  # layer by layer (the one-call pass: below)
    monkeypatch.setattr(kernels, "layer_forward", lambda *a: None)  # module by module (the one-call layer: below)
    moe = kernels.moe
    monkeypatch.setattr(kernels, "moe", lambda x, *a, **k: calls.append(x.shape[0]) or moe(x, *a, **k))
    ids = torch.randint(3, 200, (9,), generator=torch.Generator().manual_seed(5))

    def logits():
        cache = model.new_cache()
        return torch.cat([model(ids[:6], cache), model(ids[6:7], cache), model(ids[7:], cache)])

    one_call = logits()
    layers = len(model.moe_blocks)
    assert calls == [6] * layers + [1] * layers + [2] * layers
    monkeypatch.setattr(kernels, "takes_moe", lambda *a: False)  # each expert its own kernel call
    assert torch.equal(logits(), one_call)
    assert len(calls) == 3 * layers


def prompt_token_verify(model, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    """The logits of a prompt's six rows, one token, then a verification's two (ids [9]),
    and the cache they leave."""
    cache = model.new_cache()
    return torch.cat([model(ids[:6], cache), model(ids[6:7], cache), model(ids[7:], cache)]), cache


def assert_same_cache(a, b, layers: int, n: int) -> None:
    for i in range(layers):
        assert torch.equal(a.k[i][:, :n], b.k[i][:, :n]) and torch.equal(a.v[i][:, :n], b.v[i][:, :n])


@pytest.mark.parametrize(
    "family,variant,dtype",
    [
        ("mixtral", "gqa", torch.bfloat16),
        ("mixtral", "gqa", torch.float32),
        ("qwen3_moe", "base", torch.bfloat16),  # q and k normalized per head
        ("phimoe", "gqa", torch.float32),  # biases on q, k, v and o
    ],
)
def test_a_layer_s_attention_in_one_call_is_the_module_s_bit_for_bit(tiny, monkeypatch, family, variant, dtype):
    """On the cpu backend a plain attention module is one ``kernels.attention_block`` call
    (projections, q/k norms, rotary, the cache's write, attention, output projection):
    for a prompt's rows, single tokens and a verification's few, its logits and its KV
    cache are the module's own kernel path's bit for bit."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    path, _ = tiny(family, variant, dtype)
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(32)
    model, calls = eng.model, []
    monkeypatch.setattr(kernels, "model_forward", lambda *a: None)  # layer by layer (the one-call pass: below)
    monkeypatch.setattr(kernels, "layer_forward", lambda *a: None)  # module by module (the one-call layer: below)
    block = kernels.attention_block
    monkeypatch.setattr(kernels, "attention_block", lambda x, *a: calls.append(x.shape[0]) or block(x, *a))
    ids = torch.randint(3, 200, (9,), generator=torch.Generator().manual_seed(5))

    run = functools.partial(prompt_token_verify, model, ids)

    one_call, cache = run()
    layers = len(model.model.layers)
    assert calls == [6] * layers + [1] * layers + [2] * layers
    monkeypatch.setattr(kernels, "attention_block", lambda *a: None)  # the module's own path
    modules, cache2 = run()
    assert torch.equal(one_call, modules)
    assert_same_cache(cache, cache2, layers, 9)


@pytest.mark.parametrize(
    "family,variant",
    [
        ("mixtral", "gqa"),
        ("qwen2_moe", "sparse_step"),  # a dense MLP layer between MoE layers
        ("qwen3_moe", "dense_layer"),
        ("deepseek_v2", "lite"),  # MLA, a float32 router
        ("deepseek_v3", "v3"),  # MLA, the sigmoid router with groups
        ("glm4_moe", "base"),
        ("glm4_moe_lite", "flash"),
        ("gpt_oss", "alternating"),
        ("gemma4", "alternating"),
        ("qwen3_next", "hybrid"),  # linear attention's SiLU, sigmoid, softplus and exp; a gated attention
        ("qwen3_5_moe", "text"),
    ],
)
def test_a_verification_block_is_single_steps_bit_for_bit_on_the_cpu_backend(tiny, family, variant):
    """What keeps speculative decoding exact on the cpu backend with bf16 weights: the
    logits of a block of tokens over the cache equal one token at a time's bit for bit."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    path, _ = tiny(family, variant, torch.bfloat16)
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(32)
    model = eng.model
    for seed in range(3):
        ids = torch.randint(3, 200, (14,), generator=torch.Generator().manual_seed(seed))
        cache = model.new_cache()
        prompt = model(ids[:8], cache)
        cache.keep_from(8)  # as a speculative cycle does: the block may roll back to any of its tokens
        block = torch.cat([prompt, model(ids[8:], cache)])
        cache = model.new_cache()
        steps = torch.cat([model(ids[:8], cache)] + [model(ids[i : i + 1], cache) for i in range(8, 14)])
        assert torch.equal(block, steps), seed


def test_expert_mlp_falls_back_where_the_kernels_do_not_apply():
    g = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(24, 16, generator=g).bfloat16() for _ in range(2))
    down = torch.randn(16, 24, generator=g).bfloat16()
    many = torch.randn(kernels.MAX_ROWS + 1, 16, generator=g)  # a prefill: torch's GEMM
    assert not kernels.takes(many, gate)
    assert scaled_err(expert_mlp(many, gate, up, down, fast=True), expert_mlp(many, gate, up, down).double()) < 1e-6
    half = torch.randn(2, 16, generator=g).bfloat16()  # bf16 activations: computed in fp32, returned in bf16
    out = expert_mlp(half, gate, up, down, fast=True)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16)


def test_rmsnorm_and_rope_match_torch():
    g = torch.Generator().manual_seed(5)
    norm = RMSNorm(100, 1e-5)
    norm.weight.data = torch.randn(100, generator=g)
    norm.weight.requires_grad_(False)
    x = torch.randn(3, 4, 100, generator=g)
    assert scaled_err(kernels.rmsnorm(x, norm.weight, 1e-5), norm(x).double()) < 1e-6
    q = torch.randn(5, 8, 64, generator=g).transpose(0, 1)  # [heads, T, d], as attention passes it
    cos, sin = torch.randn(2, 5, 64, generator=g)
    assert torch.equal(kernels.rope(q, cos, sin), apply_rope(q, cos, sin))


def attention_reference(q, k, v, start, scale, window=None, sinks=None):
    """float64 attention of q [H, T, d] at positions [start, start+T) over k [Hkv, L, d],
    v [Hkv, L, dv], causal (within ``window``), with gpt-oss's sink logit a head."""
    H, T, _ = q.shape
    L = k.shape[1]
    k, v = (a.double().repeat_interleave(H // a.shape[0], 0) for a in (k, v))
    scores = q.double() @ k.transpose(1, 2) * scale
    pos, key = torch.arange(start, start + T)[:, None], torch.arange(L)[None]
    seen = key <= pos
    if window:
        seen &= key > pos - window
    scores = scores.masked_fill(~seen, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.double().view(H, 1, 1).expand(H, T, 1)], -1)
    return (torch.softmax(scores, -1)[..., :L] @ v).transpose(0, 1).reshape(T, -1)


# (heads, kv heads, key dim, value dim, queries, start, window, sinks): grouped and not,
# ragged head dims (a tail past the 8-wide chunks; MLA's one latent head, its values a
# view of its keys' first columns),
# sliding windows shorter than the cache, a verification-sized block, a prefill of 64
ATTENTION_CASES = [
    (8, 8, 128, 128, 1, 95, None, False),
    (8, 2, 64, 64, 3, 10, None, False),
    (4, 1, 19, 11, 5, 0, None, False),
    (8, 4, 32, 40, 4, 40, 16, False),
    (4, 2, 24, 24, 6, 30, 8, True),
    (2, 2, 12, 12, 2, 3, None, True),
    (16, 4, 80, 80, 64, 0, None, False),
    # blocks of rows over pieces of keys (MLA-like: one kv head for every query head)
    (16, 1, 200, 160, 5, 695, None, False),
    (8, 2, 64, 64, 7, 1500, 300, True),
]


def check_attention(call):
    """``call(q, k, v, start, scale, window, sinks)`` gives the reference, and each query
    computed alone (over the cache as it stood at its step) gives its row bit for bit."""
    g = torch.Generator().manual_seed(5)
    for H, Hkv, d, dv, T, start, window, with_sinks in ATTENTION_CASES:
        L = start + T
        # the cache as the model keeps it: views into longer buffers
        k = torch.randn(Hkv, L + 9, d, generator=g)[:, :L]
        v = torch.randn(Hkv, L + 9, dv, generator=g)[:, :L] if Hkv > 1 else k[..., :dv]
        q = torch.randn(T, H, d, generator=g).transpose(0, 1)  # [H, T, d], as the model's
        sinks = torch.randn(H, generator=g) if with_sinks else None
        scale = d**-0.5
        got = call(q, k, v, start, scale, window, sinks)
        assert scaled_err(got, attention_reference(q, k, v, start, scale, window, sinks)) < FP32_TOL, (H, Hkv, d, T)
        alone = [call(q[:, t : t + 1], k[:, : start + t + 1], v[:, : start + t + 1], start + t, scale, window, sinks)
                 for t in range(T)]  # fmt: skip
        assert torch.equal(torch.cat(alone), got), (H, Hkv, d, T)


def mla_operands(H, T, nope, rope, v, r, wdtype, g):
    """MLA's absorbed products' operands as the model holds them: the query's no-position
    part a view of the query projection's output ``[T, H * (nope + rope)]``, the key and
    value expansions views of ``kv_b_proj``'s weight ``[H * (nope + v), r]``, attention's
    latent output ``[T, H * r]`` seen per head."""
    q = torch.randn(T, H * (nope + rope), generator=g).view(T, H, nope + rope)[..., :nope].transpose(0, 1)
    w = torch.randn(H * (nope + v), r, generator=g).to(wdtype).view(H, nope + v, r)
    lat = torch.randn(T, H * r, generator=g).view(T, H, r).transpose(0, 1)
    return q, w[:, :nope], w[:, nope:], lat


def check_per_head(call):
    """``call(x, w, out, transposed)`` gives each head's product (the query through the
    key expansion, ``x @ w``; the latent through the value expansion, ``x @ w.T``, written
    into a [T, H * v] output), and each token computed alone gives its row bit for bit."""
    g = torch.Generator().manual_seed(7)
    # (heads, tokens, nope, rope, v, r): ragged sizes past the 8- and 16-wide chunks, one
    # head, a verification-sized block, enough weight to share over the pool
    for H, T, nope, rope, v, r in [
        (1, 1, 16, 8, 16, 32),
        (5, 6, 24, 8, 40, 48),
        (3, 4, 19, 6, 11, 37),
        (20, 3, 64, 16, 96, 160),
    ]:
        for wdtype in WDTYPES:
            q, w_uk, w_uv, lat = mla_operands(H, T, nope, rope, v, r, wdtype, g)
            absorbed = torch.empty(H, T, r)
            assert call(q, w_uk, absorbed, True)
            assert scaled_err(absorbed, torch.matmul(q.double(), w_uk.double())) < FP32_TOL, (H, T, wdtype)
            y = torch.empty(T, H * v)
            assert call(lat, w_uv, y.view(T, H, v).transpose(0, 1), False)
            want = torch.matmul(lat.double(), w_uv.double().transpose(1, 2)).transpose(0, 1).reshape(T, H * v)
            assert scaled_err(y, want) < FP32_TOL, (H, T, wdtype)
            for t in range(T):
                one = torch.empty(H, 1, r)
                assert call(q[:, t : t + 1], w_uk, one, True) and torch.equal(one, absorbed[:, t : t + 1])
                row = torch.empty(1, H * v)
                assert call(lat[:, t : t + 1], w_uv, row.view(1, H, v).transpose(0, 1), False)
                assert torch.equal(row, y[t : t + 1])


def lib_per_head(lib, x, w, out, transposed):
    """``ms_heads`` of a library built here, called directly."""
    H, T, K = x.shape
    N = w.shape[2] if transposed else w.shape[1]
    lib.ms_heads(
        x.data_ptr(), *x.stride()[:2], w.data_ptr(), kernels.WTYPES[w.dtype], w.stride(0), int(transposed),
        out.data_ptr(), *out.stride()[:2], H, T, N, K,
    )  # fmt: skip
    return True


def test_per_head_products_match_the_reference_and_do_not_depend_on_the_batch():
    check_per_head(kernels.per_head)


def test_per_head_products_leave_what_they_do_not_take_to_torch():
    g = torch.Generator().manual_seed(8)
    q, w_uk, w_uv, lat = mla_operands(2, 3, 8, 4, 8, 16, torch.bfloat16, g)
    assert not kernels.per_head(q.double(), w_uk, torch.empty(2, 3, 16, dtype=torch.float64), True)
    assert not kernels.per_head(q, w_uk.double(), torch.empty(2, 3, 16), True)  # a weight dtype it has no path for
    assert not kernels.per_head(q, w_uk, torch.empty(3, 2, 16).transpose(0, 1), True)  # rows not N apart
    assert not kernels.per_head(q, w_uk, torch.empty(2, 3, 15), True)  # the wrong shape
    assert not kernels.per_head(q, w_uk.transpose(1, 2), torch.empty(2, 3, 16), False)  # weight rows not contiguous
    assert not kernels.per_head(lat, w_uv, torch.empty(2, 1, 8).expand(2, 3, 8), False)  # rows on one another
    long = torch.randn(2, kernels.MAX_ROWS + 1, 16, generator=g)
    assert not kernels.per_head(long, w_uv, torch.empty(2, kernels.MAX_ROWS + 1, 8), False)  # a prefill: torch's


def lib_attention(lib, q, k, v, start, scale, window, sinks):
    """``ms_attend`` of a library built here, called directly."""
    H, T, d = q.shape
    Hkv, L, dv = v.shape
    out = torch.empty(T, H * dv)
    strides = (*q.stride()[:2], k.data_ptr(), *k.stride()[:2], v.data_ptr(), *v.stride()[:2])
    sink_ptr = None if sinks is None else sinks.data_ptr()
    args = (H, Hkv, T, L, d, dv, start, window or 0, scale)
    assert lib.ms_attend(q.data_ptr(), *strides, sink_ptr, out.data_ptr(), *args)
    return out


def test_attention_matches_the_reference_and_does_not_depend_on_the_batch():
    check_attention(kernels.attention)


def test_heads_taken_four_at_a_time_are_each_head_alone_bit_for_bit():
    """Where a kv head serves four or more query heads, ``ms_attend`` takes four at once
    (each key and value loaded once for them); each head's output is what the head alone
    gives (one query head a kv head: the one-row path), bit for bit."""
    g = torch.Generator().manual_seed(6)
    for H, Hkv, d, dv, T, start, window, with_sinks in ATTENTION_CASES:
        if H // Hkv < 4:
            continue
        L = start + T
        k, v = torch.randn(Hkv, L, d, generator=g), torch.randn(Hkv, L, dv, generator=g)
        q = torch.randn(T, H, d, generator=g).transpose(0, 1)
        sinks = torch.randn(H, generator=g) if with_sinks else None
        together = kernels.attention(q, k, v, start, d**-0.5, window, sinks).view(T, H, dv)
        for h in range(H):
            kv = h // (H // Hkv)
            alone = kernels.attention(
                q[h : h + 1],
                k[kv : kv + 1],
                v[kv : kv + 1],
                start,
                d**-0.5,
                window,
                None if sinks is None else sinks[h : h + 1],
            )
            assert torch.equal(alone, together[:, h]), (H, Hkv, d, T, h)


def test_one_query_sees_the_keys_up_to_its_position_as_in_attend():
    """One query at position ``start`` sees keys ``<= start`` in both (attend masked
    nothing for one query wherever it was: a tile of one row of a longer pass then saw the
    keys after it); and a query that sees no key gets zeros."""
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(4, 1, 16, generator=g), torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    for window in (None, 16):
        for start in (2, 5):
            want = attend(q, k, v, start, 0.25, window)
            assert scaled_err(kernels.attention(q, k, v, start, 0.25, window), want.double()) < FP32_TOL
            assert scaled_err(want, attend(q, k[:, : start + 1], v[:, : start + 1], start, 0.25, window)) < FP32_TOL
    qs = torch.randn(4, 3, 16, generator=g)
    blind = kernels.attention(qs, k, v, 20, 0.25, 4)  # positions 20-22, a window of 4: no key in the cache
    assert torch.equal(blind, torch.zeros(3, 4 * 16)) and torch.equal(blind, attend(qs, k, v, 20, 0.25, 4))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
def test_a_dense_gated_mlp_runs_as_one_batch_invariant_kernel_call(act):
    """Dense MLPs and shared experts (GatedMLP) on the cpu backend: the gated kernel, the
    reference's values, and rows that do not depend on the batch on a width that is not a
    multiple of 16 (where torch's activations split a row between their vector body and
    scalar tail differently for one token and for several)."""
    from moespeq_cli.kernels.modules import use_cpu_kernels
    from moespeq_cli.models.base import GATE_ACTIVATIONS, GatedMLP

    torch.manual_seed(3)
    mlp = use_cpu_kernels(GatedMLP(40, 37, act=act))
    calls = []
    real = kernels.expert
    kernels.expert = lambda *a: calls.append(a[-1]) or real(*a)
    try:
        x = torch.randn(5, 40)
        with torch.inference_mode():
            together = mlp(x)
            alone = torch.cat([mlp(x[i : i + 1].clone()) for i in range(5)])
    finally:
        kernels.expert = real
    assert calls == [act] * 6  # one call a pass, with the MLP's activation
    w = [m.weight.double() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    want = F.linear(GATE_ACTIVATIONS[act](F.linear(x.double(), w[0])) * F.linear(x.double(), w[1]), w[2])
    assert scaled_err(together, want) < 1e-5
    assert torch.equal(alone, together)


def test_attention_leaves_what_it_does_not_take_to_torch():
    q, k = torch.randn(2, 1, 8), torch.randn(2, 5, 8)
    assert kernels.attention(q.double(), k.double(), k.double(), 4, 0.3) is None  # not fp32
    assert kernels.attention(torch.randn(2, kernels.MAX_ROWS + 1, 8), k, k, 0, 0.3) is None  # a long prefill
    strided = torch.randn(2, 5, 16)[..., ::2]
    assert kernels.attention(q, strided, strided, 4, 0.3) is None  # a strided head dim


def test_no_compiler_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(build, "_lib", False)
    monkeypatch.setattr(build, "_compiler", lambda: None)
    assert build.library() is None
    assert "no C compiler" in build.why_not
    monkeypatch.setattr(kernels, "_pool", 0)
    assert not kernels.available() and not kernels.takes(torch.zeros(1, 4), torch.zeros(4, 4))
    monkeypatch.setattr(build, "_lib", False)
    monkeypatch.setenv("MOESPEQ_KERNELS", "off")
    assert build.library() is None and "MOESPEQ_KERNELS" in build.why_not


def test_a_failed_build_is_reported_not_loaded(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(build, "_lib", False)
    monkeypatch.setattr(build, "FLAGS", [*build.FLAGS, "-DMS_BROKEN", "-include", "/nonexistent/header.h"])
    assert build.library() is None
    assert "could not build" in build.why_not
    assert not list((tmp_path / "moespeq" / "kernels").glob("*.so*"))  # no half-written library left


def test_build_is_cached_per_source(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cc = build._compiler()
    first = build._build(cc)
    assert first.is_file() and first.parent == tmp_path / "moespeq" / "kernels"
    mtime = first.stat().st_mtime_ns
    assert build._build(cc) == first and first.stat().st_mtime_ns == mtime  # not rebuilt


def test_bf16_checkpoint_keeps_bf16_weights_on_the_cpu_backend(tiny):
    """The cpu backend holds a bf16 checkpoint's weights in bf16 (half of float32's memory)
    and computes in float32: the logits are the float32 model's on the same weights."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    path, _ = tiny("mixtral", "gqa", torch.bfloat16)
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(64)
    assert eng.cpu_kernels and eng.dtype == torch.float32
    model = eng.model
    assert model.lm_head.weight.dtype == torch.bfloat16
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.dtype == torch.bfloat16
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.k_proj.weight.untyped_storage().data_ptr()  # fused
    store = model.moe_blocks[0].experts.store
    assert store.packed[0].dtype == torch.bfloat16
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.models.loader import load_model
    from moespeq_cli.runtime.executors.experts import InMemoryExperts

    ck = Checkpoint(path)
    widened = load_model(ck, torch.float32)  # torch, every weight widened to float32 at load
    widened.set_experts(InMemoryExperts(ck, torch.float32))
    assert widened.lm_head.weight.dtype == torch.float32
    ids = torch.randint(3, 200, (16,), generator=torch.Generator().manual_seed(3))
    expected = widened(ids, widened.new_cache())
    got = model(ids, model.new_cache())
    assert float((got - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("T,E,top_k", [(1, 8, 2), (3, 8, 1), (9, 60, 4), (2, 128, 8), (1, 3, 3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_routing_in_one_call_is_softmax_then_top_k(T, E, top_k, normalize):
    """``kernels.route_softmax`` chooses the experts torch's ``softmax_topk`` chooses, in its
    order, with their probabilities to float32 rounding (libm's exp, not torch's); ties
    go to the lower expert; logits it does not take are left to torch."""
    from moespeq_cli.models.base import softmax_topk

    g = torch.Generator().manual_seed(T * E + top_k)
    logits = torch.randn(T, E, generator=g) * 3
    ids, w = kernels.route_softmax(logits, top_k, normalize)
    want_ids, want_w = softmax_topk(top_k, normalize)(logits)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    assert torch.allclose(w, want_w, rtol=1e-6, atol=1e-7)
    if normalize:
        assert torch.allclose(w.sum(-1), torch.ones(T))
    tied = kernels.route_softmax(torch.zeros(2, E), top_k, normalize)[0]
    assert torch.equal(tied, torch.arange(top_k).expand(2, top_k))
    assert kernels.route_softmax(logits.double(), top_k, normalize) is None
    assert kernels.route_softmax(logits[0], top_k, normalize) is None  # [E]: not [T, E]
    assert kernels.route_softmax(torch.randn(1, kernels.MAX_ROUTED + 1), 2, normalize) is None


def test_the_one_call_layer_refuses_a_cache_of_another_shape(tiny):
    """``layer_forward`` writes the cache by its strides: buffers of another head count,
    head size or too short are refused (nothing computed), not written out of bounds."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    path, _ = tiny("mixtral", "gqa", torch.float32)
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(32)
    layer = eng.model.model.layers[0]
    cache = eng.model.new_cache()
    eng.model(torch.tensor([5, 6]), cache)  # describes the layer, fills the cache
    desc, x = layer.kernel_desc[1], torch.randn(1, layer.kernel_parts[0].weight.shape[0])
    rope = eng.model.rope_tables(2, 3, x.device, x.dtype)
    kb, vb = cache.k[0], cache.v[0]
    assert kernels.layer_forward(desc, x, *rope, (kb, vb), 2) is not None
    for bad in ((kb[:-1], vb), (kb, vb[:, :2]), (kb, vb[..., :-1].contiguous())):
        assert kernels.layer_forward(desc, x, *rope, bad, 2) is None


@pytest.mark.parametrize(
    "family,variant,dtype",
    [
        ("mixtral", "gqa", torch.bfloat16),
        ("mixtral", "gqa", torch.float32),
        ("qwen3_moe", "base", torch.bfloat16),  # q and k normalized per head
        ("qwen3_moe", "dense_layer", torch.float32),  # routing not renormalized; a dense layer module by module
    ],
)
def test_a_decoder_layer_in_one_call_is_the_modules_bit_for_bit(tiny, monkeypatch, family, variant, dtype):
    """On the cpu backend a layer of a plain attention, RMSNorms and softmax-routed experts
    all in memory is one ``kernels.layer_forward`` call: for a prompt's rows, single tokens
    and a verification's few, its logits and KV cache are the module-by-module kernel
    path's bit for bit (the same kernels in the same order, the same residual sums)."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    path, _ = tiny(family, variant, dtype)
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(32)
    model, calls = eng.model, []
    layer_forward = kernels.layer_forward

    def counted(desc, x, *a):
        y = layer_forward(desc, x, *a)
        calls.append(x.shape[0] if y is not None else None)
        return y

    monkeypatch.setattr(kernels, "layer_forward", counted)
    monkeypatch.setattr(kernels, "model_forward", lambda *a: None)  # layer by layer (the one-call pass: below)
    ids = torch.randint(3, 200, (9,), generator=torch.Generator().manual_seed(5))

    run = functools.partial(prompt_token_verify, model, ids)

    one_call, cache = run()
    layers = len(model.model.layers)
    whole = sum(hasattr(layer, "kernel_parts") for layer in model.model.layers)
    assert whole == len(model.moe_blocks) >= 1
    assert calls == [6] * whole + [1] * whole + [2] * whole
    monkeypatch.setattr(kernels, "layer_forward", lambda *a: None)  # module by module
    modules, cache2 = run()
    assert torch.equal(one_call, modules)
    assert_same_cache(cache, cache2, layers, 9)


@pytest.mark.parametrize(
    "family,variant,dtype", [("mixtral", "gqa", torch.bfloat16), ("qwen3_moe", "base", torch.float32)]
)
def test_a_whole_forward_pass_in_one_call_is_the_modules_bit_for_bit(tiny, monkeypatch, family, variant, dtype):
    """Where every layer is one call, the whole pass is (``kernels.model_forward``:
    embedding, layers, final norm, head): for a prompt, single tokens with ``last_only``
    and a verification's rows, logits and KV cache equal the module-by-module path's; a
    hook on the embedding, the final norm or the head sees the pass run layer by layer."""
    from moespeq_cli.models.base import CausalLM, DecoderLayer
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    path, _ = tiny(family, variant, dtype)
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(32)
    model, calls = eng.model, []
    whole = kernels.model_forward
    monkeypatch.setattr(kernels, "model_forward", lambda *a: calls.append(a[2].shape[0]) or whole(*a))
    ids = torch.randint(3, 200, (12,), generator=torch.Generator().manual_seed(7))

    def run():
        cache = model.new_cache()
        out = [model(ids[:6], cache), model(ids[6:7], cache, last_only=True), model(ids[7:10], cache)]
        return torch.cat(out + [model(ids[10:11], cache, last_only=True)]), cache

    one_call, cache = run()
    assert calls == [6, 1, 3, 1]
    layers = model.model.layers
    with monkeypatch.context() as m:  # module by module: the pass and each layer
        m.setattr(model, "forward", CausalLM.forward.__get__(model))
        for layer in layers:
            m.setattr(layer, "forward", DecoderLayer.forward.__get__(layer))
        modules, cache2 = run()
    assert torch.equal(one_call, modules)
    assert_same_cache(cache, cache2, len(layers), 11)
    hook = model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    assert torch.equal(run()[0], one_call) and calls.count("head") == 4 and len(calls) == 8
    hook.remove()


def test_the_one_call_layer_steps_aside_for_what_watches_a_layer(tiny, monkeypatch):
    """A routing observer, a forward hook on one of the layer's parts or a global one
    sees the layer run module by module (the one call would skip them), and the logits
    are the same; families whose layers it does not take keep their modules."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    path, _ = tiny("mixtral", "gqa", torch.bfloat16)
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(32)
    model, taken = eng.model, []
    whole = kernels.layer_forward
    monkeypatch.setattr(kernels, "layer_forward", lambda *a: taken.append(1) or whole(*a))
    monkeypatch.setattr(kernels, "model_forward", lambda *a: None)  # layer by layer
    ids = torch.tensor([5, 9, 11])

    def logits():
        return model(ids, model.new_cache())

    want = logits()
    layers = len(model.model.layers)
    assert len(taken) == layers
    seen = []
    model.set_router_observer(lambda layer, rows: seen.append(layer))
    assert torch.equal(logits(), want) and seen == list(range(layers)) and len(taken) == layers
    model.set_router_observer(None)
    hooks = [model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda *a: seen.append("norm"))]
    hooks.append(torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None))
    assert torch.equal(logits(), want) and "norm" in seen and len(taken) == layers
    for h in hooks:
        h.remove()
    logits()
    assert len(taken) == 2 * layers
    phi, _ = tiny("phimoe", "gqa", torch.float32)  # sparsemixer routing: module by module
    eng = Engine(phi, EngineOptions(backend="cpu"))
    eng.load(32)
    assert not any(hasattr(layer, "kernel_parts") for layer in eng.model.model.layers)


@pytest.mark.parametrize("N", [1, 15, 16, 17, 4096, 32000 + 3])
def test_greedy_choice_in_one_call_is_numpys_argmax(N):
    """``kernels.argmax`` (greedy decoding's choice where the kernels run) gives each row's
    first maximum, as numpy's argmax (ties, a maximum in the vector body or the scalar
    tail), and refuses rows with a NaN or an infinity, which ``greedy_tokens`` then
    reports as the checkpoint's fault."""
    from moespeq_cli.errors import CheckpointError
    from moespeq_cli.runtime.sampling import greedy_tokens

    assert kernels.available()  # the library in use in this process, as on the cpu backend
    g = torch.Generator().manual_seed(N)
    rows = torch.randn(4, N, generator=g)
    rows[1] = 0.0  # every entry tied: the first
    rows[2, N // 2] = rows[2, N - 1] = 1e30  # two maxima: the first
    rows[3, N - 1] = 1e30  # in the tail
    assert kernels.argmax(rows) == rows.numpy().argmax(-1).tolist()
    assert greedy_tokens(rows) == rows.numpy().argmax(-1).tolist()
    for bad in (float("nan"), float("inf"), float("-inf")):
        worse = rows.clone()
        worse[2, N - 1] = bad
        assert kernels.argmax(worse) is None
        with pytest.raises(CheckpointError, match="NaN or infinite"):
            greedy_tokens(worse)
    assert kernels.argmax(rows.double()) is None


@pytest.mark.parametrize("march,simd", [("x86-64", 0), ("haswell", 256)])
def test_the_plain_and_avx2_paths_are_exact_and_batch_invariant(tmp_path, march, simd):
    """The paths machines without AVX-512 build, called directly: plain C (compiled for
    baseline x86-64) and AVX2 with FMA and F16C (compiled for Haswell: AMD Zen 2/3, Intel
    client CPUs); each must give the reference's products and rows that do not depend on
    the batch. The AVX-512 path is the one ``kernels`` loads on an AVX-512 machine."""
    import ctypes
    import platform
    import subprocess

    if platform.machine() != "x86_64":
        pytest.skip("x86-64 paths")
    if simd and not {"avx2", "fma", "f16c"} <= set(build._cpu_flags().split()):
        pytest.skip("this CPU cannot run AVX2 code")
    flags = [f for f in build.FLAGS if not f.startswith("-march")] + [f"-march={march}"]
    lib_path = tmp_path / f"{march}.so"
    subprocess.run([build._compiler(), *flags, "-o", str(lib_path), str(build.SOURCE), "-lm"], check=True, timeout=120)
    lib = ctypes.CDLL(str(lib_path))
    build._declare(lib)
    assert lib.ms_simd() == simd
    lib.ms_init(2, 1000)
    g = torch.Generator().manual_seed(11)
    for wdtype in WDTYPES:
        x = torch.randn(6, 77, generator=g)
        w = torch.randn(301, 77, generator=g).to(wdtype)  # 301 rows: split over two threads
        b = torch.randn(301, generator=g)

        def linear(rows, x=x, w=w, b=b, wdtype=wdtype):
            y = torch.empty(rows.shape[0], 301)
            lib.ms_linear(
                rows.data_ptr(), w.data_ptr(), kernels.WTYPES[wdtype], b.data_ptr(), y.data_ptr(), *y.shape, 77
            )
            return y

        together = linear(x)
        assert scaled_err(together, reference(x, w, b)) < FP32_TOL
        assert torch.equal(torch.cat([linear(x[i : i + 1].clone()) for i in range(6)]), together)
    # MXFP4 rows on the plain path: the dequantized product, batch invariant
    from tiny_models import mxfp4

    from moespeq_cli.models.expert_format import mxfp4_dequantize

    blocks, scales = mxfp4(torch.randn(301, 96, generator=g))
    xm = torch.randn(6, 96, generator=g)

    def linear_mx(rows):
        y = torch.empty(rows.shape[0], 301)
        lib.ms_linear_mxfp4(rows.data_ptr(), blocks.data_ptr(), scales.data_ptr(), None, y.data_ptr(), *y.shape, 96)
        return y

    together = linear_mx(xm)
    assert scaled_err(together, reference(xm, mxfp4_dequantize(blocks, scales, torch.float64))) < FP32_TOL
    assert torch.equal(torch.cat([linear_mx(xm[i : i + 1].clone()) for i in range(6)]), together)
    # bitsandbytes' 4-bit rows (the draft's) on the plain path
    codes, absmax, table, wq = nf4_weights(301, 128, 64, "nf4", g)
    xq = torch.randn(6, 128, generator=g)

    def linear_q(rows):
        y = torch.empty(rows.shape[0], 301)
        lib.ms_linear_nf4(
            rows.data_ptr(),
            codes.data_ptr(),
            absmax.data_ptr(),
            table.data_ptr(),
            64,
            None,
            y.data_ptr(),
            *y.shape,
            128,
        )
        return y

    together = linear_q(xq)
    assert scaled_err(together, reference(xq, wq)) < FP32_TOL
    assert torch.equal(torch.cat([linear_q(xq[i : i + 1].clone()) for i in range(6)]), together)
    # block FP8 rows on the plain path
    from tiny_models import fp8

    w8, s8 = fp8(torch.randn(301, 100, generator=g), (16, 32))
    xs8 = torch.randn(6, 100, generator=g)

    def linear_fp8(rows):
        y = torch.empty(rows.shape[0], 301)
        lib.ms_linear_fp8(rows.data_ptr(), w8.data_ptr(), s8.data_ptr(), 16, 32, None, y.data_ptr(), *y.shape, 100)
        return y

    together = linear_fp8(xs8)
    from moespeq_cli.models.expert_format import fp8_dequantize

    assert scaled_err(together, reference(xs8, fp8_dequantize(w8, s8, (16, 32), torch.float32))) < FP32_TOL
    assert torch.equal(torch.cat([linear_fp8(xs8[i : i + 1].clone()) for i in range(6)]), together)
    # gpt-oss's transposed expert on the plain path: exact, and batch invariant
    from moespeq_cli.models.expert_format import gpt_oss_experts

    parts = gpt_oss_parts(300, 150, torch.bfloat16, 9)
    xs = torch.randn(5, 300, generator=g)

    def expert_t(rows):
        scratch = torch.empty(lib.ms_expert_t_scratch(rows.shape[0], 300, 150))
        y = torch.empty(rows.shape[0], 300)
        ptrs = [p.data_ptr() for p in parts]
        lib.ms_expert_t(
            rows.data_ptr(),
            *ptrs,
            kernels.WTYPES[torch.bfloat16],
            1.702,
            7.0,
            scratch.data_ptr(),
            y.data_ptr(),
            rows.shape[0],
            300,
            150,
        )
        return y

    together = expert_t(xs)
    want = gpt_oss_experts(1.702, 7.0).forward(xs.double(), [p.double() for p in parts])
    assert scaled_err(together, want) < 1e-5
    assert torch.equal(torch.cat([expert_t(xs[i : i + 1].clone()) for i in range(5)]), together)
    # attention over the cache, and MLA's per-head products, on this path
    check_attention(lambda *a: lib_attention(lib, *a))
    check_per_head(lambda *a: lib_per_head(lib, *a))
    # greedy's choice on this path: numpy's argmax, non-finite rows refused
    rows = torch.randn(3, 4099, generator=g)
    rows[1, 7] = rows[1, 4000] = 1e30
    best = torch.empty(3, dtype=torch.int64)
    assert lib.ms_argmax(rows.data_ptr(), 3, 4099, best.data_ptr()) == 1
    assert best.tolist() == rows.numpy().argmax(-1).tolist()
    rows[2, 4098] = float("nan")
    assert lib.ms_argmax(rows.data_ptr(), 3, 4099, best.data_ptr()) == 0


def test_the_fp32_4bit_path_without_avx512_bf16(tmp_path):
    """AVX-512 machines without BF16 (Skylake-X, Ice Lake) compute the draft's 4-bit
    products in fp32: built here with BF16 turned off, exact and batch invariant."""
    import ctypes
    import subprocess

    if kernels._lib().ms_simd() != 512:
        pytest.skip("this CPU has no AVX-512")
    flags = [*build.FLAGS, "-mno-avx512bf16"]
    lib_path = tmp_path / "nobf16.so"
    subprocess.run([build._compiler(), *flags, "-o", str(lib_path), str(build.SOURCE), "-lm"], check=True, timeout=120)
    lib = ctypes.CDLL(str(lib_path))
    build._declare(lib)
    assert lib.ms_simd() == 512 and lib.ms_nf4_bf16() == 0
    lib.ms_init(2, 1000)
    g = torch.Generator().manual_seed(12)
    for n, k, bs in ((301, 128, 64), (77, 1024, 128)):
        codes, absmax, table, w = nf4_weights(n, k, bs, "nf4", g)
        x = torch.randn(9, k, generator=g)

        def linear_q(rows, codes=codes, absmax=absmax, table=table, n=n, k=k, bs=bs):
            y = torch.empty(rows.shape[0], n)
            lib.ms_linear_nf4(
                rows.data_ptr(),
                codes.data_ptr(),
                absmax.data_ptr(),
                table.data_ptr(),
                bs,
                None,
                y.data_ptr(),
                *y.shape,
                k,
            )
            return y

        together = linear_q(x)
        assert scaled_err(together, reference(x, w)) < FP32_TOL
        assert torch.equal(torch.cat([linear_q(x[i : i + 1].clone()) for i in range(9)]), together)


def test_a_run_says_when_the_cpu_kernels_are_unavailable(monkeypatch, cli, tiny):
    """Decoding on the CPU without the kernels is several times slower: the plan line says
    why (it fell back without a word); turned off on purpose, it says nothing."""
    path, _ = tiny("mixtral", "gqa")
    monkeypatch.setattr(build, "_lib", False)
    monkeypatch.setattr(build, "why_not", None)
    monkeypatch.setattr(build, "_compiler", lambda: None)
    monkeypatch.setattr(kernels, "_pool", 0)
    r = cli("run", str(path), "--backend", "cpu", "-p", "hi", "-n", "2")
    assert r.exit_code == 0, r.stderr
    assert "CPU kernels unavailable (no C compiler found" in r.stderr
    monkeypatch.setattr(build, "_lib", False)
    monkeypatch.setenv("MOESPEQ_KERNELS", "off")
    r = cli("run", str(path), "--backend", "cpu", "-p", "hi", "-n", "2")
    assert r.exit_code == 0 and "CPU kernels" not in r.stderr


def test_a_mock_run_does_not_build_the_cpu_kernels(monkeypatch, tmp_path):
    """The mock computes with torch: its engine must not compile the kernels into the
    cache (asking why they are unavailable builds them, so it is asked only where they run)."""
    from moespeq_cli.model_ref import DEMO_DIR
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    monkeypatch.setattr(build, "_lib", False)
    monkeypatch.setattr(kernels, "_pool", 0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    eng = Engine(DEMO_DIR, EngineOptions(backend="mock"))
    assert build._lib is False and eng.kernels_note is None
    assert not (tmp_path / "moespeq" / "kernels").exists()


def test_a_cc_that_is_not_a_command_is_said(monkeypatch):
    """$CC naming nothing on PATH is no compiler, said as such (it was silently replaced by cc)."""
    monkeypatch.setattr(build, "_lib", False)
    monkeypatch.setattr(build, "why_not", None)
    monkeypatch.setenv("CC", "no-such-cc")
    assert build._compiler() is None
    assert build.library() is None and "CC=no-such-cc is not a command" in build.why_not


def test_a_stopped_build_stops_the_whole_compiler(tmp_path):
    """`kill PID` of moespeq during its first-run kernel build killed only the compiler's
    driver: its cc1 went on, orphaned, and left /tmp/cc*.s behind. The build runs in a
    process group of its own, stopped (then waited for) whole."""
    import os
    import subprocess
    import time

    from moespeq_cli.kernels.build import compile_in_own_group

    pid_file = tmp_path / "pid"
    cmd = ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]  # a driver and its child, like cc and cc1
    with pytest.raises(subprocess.TimeoutExpired):  # (any exception there: a Ctrl-C, a SIGTERM raised)
        compile_in_own_group(cmd, timeout=1)
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # (gone, waiting for init to reap it)
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        raise AssertionError("the compiler's child outlived the build")
    assert compile_in_own_group(["sh", "-c", "echo ok; exit 3"], timeout=10).returncode == 3
