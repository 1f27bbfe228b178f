"""Tiny random checkpoints in the real Hugging Face layout, built with transformers.

Each family has a few configurations with odd sizes on purpose (GQA ratios, top-k from 1
to 4, shared experts, DeepSeek's first dense layers). ``build(family, variant, dir)``
writes ``save_pretrained`` output plus a small byte-level tokenizer, and returns the
transformers model (in eval mode) to serve as the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 263  # 3 specials + 256 byte symbols + 4 unused ids

COMMON = dict(vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

CONFIGS: dict[str, dict[str, dict]] = {
    "mixtral": {
        "gqa": dict(
            hidden_size=48,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_theta=10000.0,
        ),
        "top1": dict(
            hidden_size=32,
            intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_local_experts=5,
            num_experts_per_tok=1,
            rope_theta=500.0,
        ),
        "top3": dict(
            hidden_size=40,
            intermediate_size=36,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            num_local_experts=8,
            num_experts_per_tok=3,
        ),
        "wide": dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=16,
            num_experts_per_tok=2,
        ),
    },
    "qwen2_moe": {
        "shared": dict(
            hidden_size=48,
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=6,
            num_experts_per_tok=4,
            norm_topk_prob=False,
        ),
        "sparse_step": dict(
            hidden_size=32,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        ),
    },
    "qwen3_moe": {
        "base": dict(
            hidden_size=48,
            intermediate_size=64,
            moe_intermediate_size=24,
            head_dim=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=4,
            norm_topk_prob=True,
        ),
        "top8": dict(  # Qwen3-30B-A3B's proportions: top-8 of many narrow experts
            hidden_size=64,
            intermediate_size=64,
            moe_intermediate_size=32,
            head_dim=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=32,
            num_experts_per_tok=8,
            norm_topk_prob=True,
        ),
        "dense_layer": dict(
            hidden_size=32,
            intermediate_size=40,
            moe_intermediate_size=20,
            head_dim=12,
            num_hidden_layers=3,
            num_attention_heads=3,
            num_key_value_heads=1,
            num_experts=5,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[0],
        ),
    },
    "olmoe": {
        "base": dict(
            hidden_size=48,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_tok=2,
        ),
        "clip": dict(
            hidden_size=36,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            num_experts=6,
            num_experts_per_tok=3,
            clip_qkv=0.5,
            norm_topk_prob=True,
        ),
    },
    "phimoe": {
        "base": dict(
            hidden_size=48,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        "gqa": dict(
            hidden_size=36,
            intermediate_size=28,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=1,
            num_local_experts=6,
            num_experts_per_tok=2,
            lm_head_bias=True,
            attention_bias=True,
            router_jitter_noise=0.05,
        ),
    },
    "deepseek_v2": {
        "lite": dict(
            hidden_size=48,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=2,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=24,
            qk_nope_head_dim=12,
            qk_rope_head_dim=8,
            v_head_dim=10,
            topk_method="greedy",
            routed_scaling_factor=1.0,
            norm_topk_prob=False,
        ),
        "grouped": dict(
            hidden_size=36,
            intermediate_size=48,
            moe_intermediate_size=12,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=3,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=0,
            q_lora_rank=20,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            norm_topk_prob=False,
        ),
    },
    "deepseek_v3": {
        "v3": dict(  # DeepSeek-V3's shape in miniature: q LoRA, groups, scaling, first dense layer
            hidden_size=48,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=20,
            kv_lora_rank=24,
            qk_nope_head_dim=12,
            qk_rope_head_dim=8,
            v_head_dim=10,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        ),
        "flat": dict(  # Kimi-K2 / Moonlight-like: one group, no q LoRA, half-split rotary
            hidden_size=40,
            intermediate_size=48,
            moe_intermediate_size=12,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            n_routed_experts=6,
            num_experts_per_tok=2,
            n_shared_experts=2,
            first_k_dense_replace=0,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=6,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            norm_topk_prob=False,
            rope_interleave=False,
        ),
    },
    "glm4_moe": {
        "base": dict(  # GLM-4.5-Air-like: q/k/v biases, half the head rotated, shared expert
            hidden_size=48,
            head_dim=16,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            norm_topk_prob=True,
            attention_bias=True,
            use_qk_norm=False,
        ),
        "qknorm": dict(  # per-head q/k norm, groups, top-3, a scaling factor
            hidden_size=36,
            head_dim=12,
            intermediate_size=40,
            moe_intermediate_size=12,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            first_k_dense_replace=0,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            attention_bias=True,
            use_qk_norm=True,
        ),
    },
}

CONFIGS["glm4_moe_lite"] = {
    "flash": dict(  # GLM-4.7-Flash in miniature: MLA with q LoRA, first layer dense, top-4
        hidden_size=48,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=4,
        n_shared_experts=1,
        q_lora_rank=20,
        kv_lora_rank=24,
        qk_nope_head_dim=12,
        qk_rope_head_dim=8,
        v_head_dim=10,
        routed_scaling_factor=1.8,
        norm_topk_prob=True,
    ),
    "sparse_all": dict(  # every layer sparse (mlp_layer_types), half-split rotary
        hidden_size=40,
        intermediate_size=48,
        moe_intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=6,
        num_experts_per_tok=2,
        n_shared_experts=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=6,
        v_head_dim=8,
        mlp_layer_types=["sparse", "sparse"],
        rope_interleave=False,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
    ),
}

CONFIGS["qwen3_next"] = {
    "hybrid": dict(  # linear, linear, full attention; grouped value heads; a dense layer
        hidden_size=48,
        head_dim=16,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        layer_types=["linear_attention", "linear_attention", "full_attention"],
        mlp_only_layers=[1],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=12,
        linear_conv_kernel_dim=4,
        partial_rotary_factor=0.25,
    ),
    "full_first": dict(  # full attention first, one value head per key head, top-3
        hidden_size=32,
        head_dim=8,
        intermediate_size=40,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=6,
        num_experts_per_tok=3,
        norm_topk_prob=False,
        layer_types=["full_attention", "linear_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=3,
        partial_rotary_factor=0.5,
    ),
}

CONFIGS["qwen3_5_moe"] = {
    "text": dict(  # Qwen3.5-MoE's language model: split linear-attention projections, all layers sparse
        hidden_size=48,
        head_dim=16,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=3,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=12,
        linear_conv_kernel_dim=4,
    ),
    "full_first": dict(  # full attention first, as many value heads as key heads, top-2
        hidden_size=32,
        head_dim=8,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=2,
        layer_types=["full_attention", "linear_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=3,
        partial_rotary_factor=0.5,
    ),
}

CONFIGS["gpt_oss"] = {
    "alternating": dict(  # sliding (window 4) and full attention, GQA, top-2 of 6
        hidden_size=48,
        intermediate_size=40,
        head_dim=12,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=6,
        num_experts_per_tok=2,
        sliding_window=4,
    ),
    "clamped": dict(  # a tight SwiGLU clamp that binds, full attention only, top-4 of 8
        hidden_size=32,
        intermediate_size=24,
        head_dim=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=4,
        layer_types=["full_attention", "full_attention"],
        swiglu_limit=0.5,
        swiglu_alpha=1.2,
    ),
    "mx": dict(  # sizes in MXFP4's blocks of 32 (mxfp4_copy), alternating windows, top-2 of 4
        hidden_size=64,
        intermediate_size=32,
        head_dim=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
    ),
}

CONFIGS["gemma4"] = {
    "kv_eq": dict(  # keys as values in the global layer (its own head dim and KV heads), tied, soft-capped
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        global_head_dim=16,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        enable_moe_block=True,
        num_experts=6,
        top_k_experts=2,
        moe_intermediate_size=16,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    ),
    "twelve": dict(  # the default five-to-one layer pattern; a saved per_layer_config has keys "05", "11"
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=12,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        sliding_window=3,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=8,
    ),
    "alternating": dict(  # separate values, alternating windows, top-3 of 8, no soft cap
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=8,
        attention_k_eq_v=False,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=3,
        moe_intermediate_size=12,
    ),
}

CLASSES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM"),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM"),
}

VARIANTS = [(f, v) for f, vs in CONFIGS.items() for v in vs]


def byte_tokenizer_json() -> dict:
    """A tiny tokenizer.json: 3 specials, then one token per byte value we use (<= VOCAB)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return json.loads(tok.to_str())


def build(family: str, variant: str, out: Path, dtype: torch.dtype = torch.float32, seed: int = 0):
    import transformers

    cfg_cls, model_cls = (getattr(transformers, n) for n in CLASSES[family])
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**COMMON, **CONFIGS[family][variant]})
    model = model_cls(cfg).eval()
    # Random init is tiny (std 0.02); widen it so routing and logits are not degenerate.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15 if "embed" not in name else 1.0)
            elif "bias" in name:
                p.normal_(0, 0.05)
            else:
                p.uniform_(0.6, 1.4)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # V3-style routers: steer the choice
                b.normal_(0, 0.1)
            elif name.endswith("layer_scalar"):  # Gemma 4
                b.uniform_(0.5, 1.5)
    model = model.to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
    return model


FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (blocks [..., out, in/32, 16], scales [..., out, in/32]) as the
    published gpt-oss checkpoints store MXFP4: per 32 values a power-of-two scale (e8m0,
    biased by 127) bringing the largest magnitude into [4, 8), each value the nearest e2m1
    code, two codes a byte, the even element in the low nibble. A test-only quantizer."""
    *pre, out, inn = w.shape
    b = w.float().reshape(*pre, out, inn // 32, 32)
    exp = torch.floor(torch.log2(b.abs().amax(-1, keepdim=True).clamp_min(2.0**-120))) - 2
    codes = (b / torch.exp2(exp))[..., None].sub(FP4_VALUES).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exp[..., 0] + 127).to(torch.uint8)


def mxfp4_copy(src: Path, dst: Path) -> Path:
    """A gpt-oss checkpoint's experts re-stored in MXFP4, as the published checkpoints are
    (``_blocks`` and ``_scales`` of the [E, out, in] matrices, biases and the rest as they
    were, ``quantization_config`` naming the method)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = {}
    for name, t in load_file(src / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name + "_blocks"], tensors[name + "_scales"] = mxfp4(t.transpose(1, 2))
        else:
            tensors[name] = t
    save_file(tensors, dst / "model.safetensors")
    (dst / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    return dst


def mxfp4_reference(path: Path):
    """transformers' model of an MXFP4 checkpoint, dequantized at load (float32)."""
    import transformers

    return transformers.GptOssForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    ).eval()


def fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, cols] -> (e4m3 weights, float32 ``scale_inv [ceil(rows/bm), ceil(cols/bn)]``)
    as DeepSeek-style block-FP8 checkpoints store them: each block's largest magnitude at
    e4m3's 448. A test-only quantizer (partial edge blocks included)."""
    bm, bn = block
    rows, cols = w.shape
    R, C = -(-rows // bm), -(-cols // bn)
    padded = torch.zeros(R * bm, C * bn)
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(R, bm, C, bn)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(R * bm, C * bn)[:rows, :cols]
    return q.contiguous(), scale


def fp8_copies(src: Path, dst: Path, block: tuple[int, int] = (16, 16)) -> tuple[Path, Path]:
    """The checkpoint at ``src`` in block FP8 as DeepSeek-V3 ships (every 2-D linear weight
    but the embeddings, the LM head and the routers' gates, each with ``_scale_inv``), and the
    same weights dequantized in float32 (the oracle's checkpoint): (fp8 dir, dequantized dir)."""
    from safetensors.torch import load_file, save_file

    from moespeq_cli.models.expert_format import fp8_dequantize

    quantized, plain = dst / "fp8", dst / "dequantized"
    cfg = json.loads((src / "config.json").read_text())
    tensors, deq = {}, {}
    for name, t in load_file(src / "model.safetensors").items():
        skip = "embed_tokens" in name or name.startswith("lm_head") or name.endswith(".gate.weight")
        if t.dim() == 2 and name.endswith(".weight") and not skip:
            q, s = fp8(t, block)
            tensors[name], tensors[f"{name}_scale_inv"] = q, s
            deq[name] = fp8_dequantize(q, s, block, torch.float32)
        else:
            tensors[name] = deq[name] = t
    for out, weights, config in (
        (
            quantized,
            tensors,
            dict(
                cfg,
                quantization_config={
                    "quant_method": "fp8",
                    "fmt": "e4m3",
                    "activation_scheme": "dynamic",
                    "weight_block_size": list(block),
                },
            ),
        ),
        (plain, deq, cfg),
    ):
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps(config))
        save_file(weights, out / "model.safetensors")
        (out / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    return quantized, plain


def edited_copy(src: Path, dst: Path, config=None, tensors=None) -> Path:
    """A copy of the checkpoint at ``src`` with ``config(cfg)`` applied to its config.json
    and ``tensors(dict)`` to its weights (each a function editing in place; None: as is)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        weights = load_file(dst / "model.safetensors")
        tensors(weights)
        save_file(weights, dst / "model.safetensors")
    return dst
