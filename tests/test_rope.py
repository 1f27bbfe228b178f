"""Scaled rotary variants against transformers' own implementations."""

import pytest
import torch

from moespeq_cli.models.rope import inv_freq, rope_parameters


def reference(kind_cfg: dict, cfg_cls: str, head_dim: int, seq_len=None):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = getattr(transformers, cfg_cls)(**kind_cfg)
    kind = cfg.rope_parameters["rope_type"]
    return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len) if seq_len else ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")


def test_yarn_matches_deepseek_v2_lite():
    # DeepSeek-V2-Lite's own rope_scaling block.
    scaling = {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    }
    hub_cfg = {"rope_theta": 10000, "rope_scaling": scaling, "max_position_embeddings": 163840}
    ours, scale = inv_freq(rope_parameters(hub_cfg), 64, 163840)
    ref, ref_scale = reference(
        dict(
            hidden_size=256,
            num_attention_heads=4,
            qk_rope_head_dim=64,
            max_position_embeddings=163840,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000,
                **{k: v for k, v in scaling.items() if k != "type"},
            },
        ),
        "DeepseekV2Config",
        64,
    )
    assert torch.allclose(ours, ref, rtol=1e-6)
    assert scale == pytest.approx(ref_scale)


@pytest.mark.parametrize("long", [False, True])
def test_longrope_matches_phi(long):
    dim = 16
    short = [1.0 + 0.1 * i for i in range(dim // 2)]
    longf = [2.0 + 0.3 * i for i in range(dim // 2)]
    params = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": short,
        "long_factor": longf,
        "original_max_position_embeddings": 4096,
    }
    ours, scale = inv_freq(dict(params), dim, 131072, long=long)
    ref, ref_scale = reference(
        dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=dict(params)),
        "Phi3Config",
        dim,
        seq_len=8192 if long else 100,
    )
    assert torch.allclose(ours, ref, rtol=1e-6)
    assert scale == pytest.approx(ref_scale)


def test_hub_spelling_and_transformers_spelling_agree():
    a = rope_parameters({"rope_theta": 1e6})
    b = rope_parameters({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert a == b


def test_rotation_with_the_signed_sin_table_is_the_same_bits_in_one_op_fewer():
    """``Rotary.tables``' sin carries a table with its first half negated: ``apply_rope``
    swaps x's halves and multiplies by it, the same bits as ``rotate_half(x) * sin``
    (signed zeros included), one op (the negation of x's half) fewer a layer."""
    import torch

    from moespeq_cli.models.rope import Rotary, apply_rope, rotate_half
    from moespeq_cli.runtime.executors.opcount import OpCounter

    rot = Rotary(1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64)), 1.0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cos, sin = rot.tables(5, 13, torch.device("cpu"), dtype)
        x = torch.randn(6, 8, 64).to(dtype)
        x[0, 0, :4], x[0, 0, 32:36] = 0.0, -0.0
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        with OpCounter() as fast:
            got = apply_rope(x, cos, sin)
        with OpCounter() as plain:
            want = x * cos + rotate_half(x) * sin
        assert torch.equal(got.view(bits), want.view(bits)), dtype
        assert fast.ops == plain.ops - 1, (fast.ops, plain.ops)
    # a table it did not hand out: rotated as before
    assert torch.equal(apply_rope(x, cos, sin.clone()), want)
