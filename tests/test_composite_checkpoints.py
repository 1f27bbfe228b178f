"""Checkpoints as published under another model_type. Multimodal ones (Qwen3.5-MoE, Gemma 4):
config.json with the language model under ``text_config``, its tensors under
``model.language_model.``, a vision tower and multi-token-prediction layers beside it.
moespeq runs the language model and gives the same tokens as from the text-only
checkpoint transformers saves. And Kimi-K2's ``kimi_k2``: DeepSeek-V3's architecture."""

import json

import pytest
import torch
from offload_helpers import prompt_for, run_engine
from safetensors.torch import load_file, save_file

from moespeq_cli.models.checkpoint import Checkpoint


def composite_copy(src, dst, family="qwen3_5_moe"):
    """The text-only checkpoint at ``src`` rewritten in the published multimodal layout."""
    dst.mkdir()
    text = json.loads((src / "config.json").read_text())
    config = {
        "model_type": family,
        "architectures": ["ConditionalGeneration"],
        "text_config": dict(text, model_type=f"{family}_text"),
        "vision_config": {"model_type": family, "hidden_size": 8, "depth": 1},
        "tie_word_embeddings": text.get("tie_word_embeddings", False),
        "image_token_id": 5,
    }
    (dst / "config.json").write_text(json.dumps(config))
    tensors = {}
    for name, t in load_file(src / "model.safetensors").items():
        tensors[name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name] = t
    tensors["model.visual.patch_embed.proj.weight"] = torch.ones(8, 3, 2, 2)
    tensors["mtp.fc.weight"] = torch.ones(4, 4)
    save_file(tensors, dst / "model.safetensors")
    (dst / "tokenizer.json").write_text((src / "tokenizer.json").read_text())


@pytest.mark.parametrize("family,variant", [("qwen3_5_moe", "text"), ("gemma4", "kv_eq")])
def test_published_layout_gives_the_text_checkpoints_tokens(tiny, tmp_path, family, variant):
    path, _ = tiny(family, variant)
    composite_copy(path, tmp_path / "mm", family)
    ck = Checkpoint(tmp_path / "mm")
    assert ck.config.model_type == family and ck.config.expert_prefix.startswith("model.language_model.")
    assert "model.layers.0.input_layernorm.weight" not in ck.keys()  # aliases are not counted as tensors
    prompt = prompt_for(7, 10)
    expected, _ = run_engine(path, prompt, 12, backend="cpu")
    for kw in (dict(backend="cpu"), dict(backend="mock", policy="lru", slots=6)):
        got, _ = run_engine(tmp_path / "mm", prompt, 12, **kw)
        assert got == expected, kw


def test_kimi_k2_is_deepseek_v3_by_another_name(tiny, tmp_path):
    """Kimi-K2's config.json says model_type kimi_k2 (DeepSeek-V3's architecture, named
    apart so engines can tell them apart): it loads as deepseek_v3 and gives its tokens."""
    from tiny_models import edited_copy

    path, _ = tiny("deepseek_v3", "v3")
    kimi = edited_copy(path, tmp_path / "kimi", config=lambda cfg: cfg.update(model_type="kimi_k2"))
    assert Checkpoint(kimi).config.num_experts == Checkpoint(path).config.num_experts
    prompt = prompt_for(8, 10)
    expected, _ = run_engine(path, prompt, 12, backend="cpu")
    for kw in (dict(backend="cpu"), dict(backend="mock", policy="lru", slots=6)):
        got, _ = run_engine(kimi, prompt, 12, **kw)
        assert got == expected, kw
