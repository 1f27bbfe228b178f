"""Parity on the *published* configs, not only the hand-made tiny ones: each alias's
bundled config.json (moespeq_cli/assets/configs), shrunk in its sizes alone -- every
other field kept (rope scaling as published, biases, scoring, groups, the patterns of
dense, sliding, linear and full layers) -- built with random weights by transformers and
read back by moespeq in two layouts: transformers' own config.json and the published one
(the hub's spellings: ``rope_scaling``, ``text_config`` with the language model's
``model.language_model.`` prefix, Kimi-K2's ``model_type``). Logits within 1e-4 over a
prompt pass and single steps, and the same 16 greedy tokens. (Storage formats, FP8 and
MXFP4, and the offloading runtime are checked on the tiny configs elsewhere.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiny_models
import torch
from test_parity import ours, reference_and_ours, reference_greedy, rel_err

from moespeq_cli.runtime.generate import generate
from moespeq_cli.runtime.sampling import SamplingParams

CONFIGS = Path(__file__).resolve().parents[1] / "moespeq_cli" / "assets" / "configs"
VOCAB = 512
NOT_KWARGS = ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "quantization_config")


def alternating(n: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


MIXTRAL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
MLA = dict(q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
GPT_OSS = dict(hidden_size=64, intermediate_size=64, head_dim=16, num_hidden_layers=4, num_attention_heads=8)
GPT_OSS |= dict(num_key_value_heads=1, num_local_experts=16, sliding_window=8, layer_types=alternating(4))
QWEN35 = dict(hidden_size=64, moe_intermediate_size=64, shared_expert_intermediate_size=64, head_dim=64)
QWEN35 |= dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=1, num_experts=16, **LINEAR)
QWEN35 |= dict(layer_types=["linear_attention"] * 3 + ["full_attention"])
GLM = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, head_dim=16, num_attention_heads=12)
GLM |= dict(num_key_value_heads=1, n_routed_experts=16)
DEEPSEEK = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_attention_heads=4)
DEEPSEEK |= dict(num_key_value_heads=4, **MLA)

# alias -> (transformers family in tiny_models.CLASSES, the sizes that replace the published ones);
# the layer counts keep each pattern (first dense layers, one full layer in four, ...)
SHRUNK: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", MIXTRAL | dict(num_local_experts=8)),
    "phi-moe": ("phimoe", MIXTRAL | dict(num_local_experts=16)),
    "qwen-moe": (
        "qwen2_moe",
        dict(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=16,
            max_window_layers=2,
        ),
    ),
    "qwen3-moe": (
        "qwen3_moe",
        dict(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=64,
            head_dim=16,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=1,
            num_experts=16,
            max_window_layers=3,
        ),
    ),
    "olmoe": (
        "olmoe",
        dict(
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=16,
        ),
    ),
    "deepseek-lite": ("deepseek_v2", DEEPSEEK | dict(num_hidden_layers=3, n_routed_experts=16, q_lora_rank=None)),
    "deepseek-v3": ("deepseek_v3", DEEPSEEK | dict(num_hidden_layers=5, n_routed_experts=32)),
    "kimi-k2": ("deepseek_v3", DEEPSEEK | dict(num_hidden_layers=3, n_routed_experts=16)),
    "gpt-oss-20b": ("gpt_oss", GPT_OSS),
    "gpt-oss-120b": ("gpt_oss", GPT_OSS),
    "qwen3-next": (
        "qwen3_next",
        dict(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            head_dim=32,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=1,
            num_experts=16,
            **LINEAR,
        ),
    ),
    "qwen3.5-moe": ("qwen3_5_moe", QWEN35),
    "qwen3.6-moe": ("qwen3_5_moe", QWEN35),
    "glm-4.7": ("glm4_moe", GLM | dict(num_hidden_layers=5)),
    "glm-4.5-air": ("glm4_moe", GLM | dict(num_hidden_layers=3)),
    "glm-4.7-flash": (
        "glm4_moe_lite",
        DEEPSEEK
        | dict(
            num_hidden_layers=3,
            n_routed_experts=16,
            qk_nope_head_dim=24,
            v_head_dim=32,
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    ),
    "gemma-4-26b": (
        "gemma4",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            head_dim=16,
            global_head_dim=32,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=4,
            num_global_key_value_heads=1,
            num_experts=16,
            sliding_window=8,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
        ),
    ),
}


def shrunk(alias: str) -> tuple[str, dict, dict]:
    """-> (family, the published config.json with its sizes shrunk, its language model's part)."""
    family, sizes = SHRUNK[alias]
    published = json.loads((CONFIGS / f"{alias}.json").read_text())
    published.pop("quantization_config", None)  # (weights stored plainly here)
    text = published.get("text_config", published)
    text.update(sizes, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    if "pad_token_id" in text:
        text["pad_token_id"] = 0
    experts = next(text[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in text)
    for k in ("num_experts_per_tok", "experts_per_token", "top_k_experts"):
        if k in text:
            text[k] = min(text[k], experts)  # (as published where it fits)
    if text.get("n_group"):
        assert experts % text["n_group"] == 0 and text["topk_group"] <= text["n_group"]
    rope = text.get("rope_parameters") or {}
    if "mrope_section" in rope:  # Qwen3.5's multimodal rotary split over the smaller head
        half = int(text["head_dim"] * rope.get("partial_rotary_factor", 1.0)) // 2
        rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
    for d in (published, text):
        for key in ("torch_dtype", "dtype"):
            if key in d:
                d[key] = "float32"
    return family, published, text


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """alias -> (transformers' model, [its own layout, the published layout])."""
    made: dict = {}

    def make(alias: str):
        if alias not in made:
            family, published, text = shrunk(alias)
            out = tmp_path_factory.mktemp(alias.replace(".", "_"))
            variant = f"published-{alias}"
            tiny_models.CONFIGS[family][variant] = {k: v for k, v in text.items() if k not in NOT_KWARGS}
            try:
                ref = tiny_models.build(family, variant, out / "saved")
            finally:
                del tiny_models.CONFIGS[family][variant]
            hub = out / "published"
            hub.mkdir()
            shutil.copy(out / "saved" / "tokenizer.json", hub / "tokenizer.json")
            if "text_config" in published:  # the multimodal checkpoints' tensor names
                from safetensors.torch import load_file, save_file

                tensors = load_file(out / "saved" / "model.safetensors")
                renamed = {n.replace("model.", "model.language_model.", 1): t for n, t in tensors.items()}
                save_file(renamed, hub / "model.safetensors")
            else:
                shutil.copy(out / "saved" / "model.safetensors", hub / "model.safetensors")
            (hub / "config.json").write_text(json.dumps(published))
            made[alias] = ref, [out / "saved", hub]
        return made[alias]

    return make


@pytest.mark.parametrize("alias", sorted(SHRUNK))
def test_published_configs_shrunk_match_transformers(built, alias):
    ref, layouts = built(alias)
    ids = torch.randint(3, 200, (24,), generator=torch.Generator().manual_seed(1))
    prompt = torch.randint(3, 200, (16,), generator=torch.Generator().manual_seed(2)).tolist()
    want = reference_greedy(ref, prompt, 16)
    for path in layouts:
        model = ours(path)
        expected, got = reference_and_ours(ref, model, ids, 24)
        assert rel_err(got, expected) < 1e-4, (path.name, rel_err(got, expected))
        _, stepped = reference_and_ours(ref, model, ids, 8)  # 8 in one pass, then one at a time
        assert rel_err(stepped, expected) < 1e-4, (path.name, rel_err(stepped, expected))
        assert [ev.token for ev in generate(model, prompt, 16, SamplingParams())] == want, path.name
