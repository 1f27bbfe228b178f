"""Architectures, one file per Hugging Face ``model_type``.

``ARCHITECTURES`` maps each config.json ``model_type`` moespeq implements to the models it
covers (for messages); ``architecture`` imports the module of that name.
Each module has ``parse(cfg) -> MoEConfig`` and ``Model(cfg)``, a CausalLM
whose parameter names are the checkpoint's.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from types import ModuleType

from moespeq_cli.errors import CheckpointError, UnsupportedModelError
from moespeq_cli.models.expert_format import FP8, SWIGLU, fp8_experts

ARCHITECTURES = {
    "mixtral": "Mixtral-8x7B, Mixtral-8x22B",
    "qwen2_moe": "Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B",
    "qwen3_moe": "Qwen3-30B-A3B, Qwen3-235B-A22B",
    "olmoe": "OLMoE-1B-7B",
    "phimoe": "Phi-3.5-MoE",
    "deepseek_v2": "DeepSeek-V2-Lite, DeepSeek-V2",
    "deepseek_v3": "DeepSeek-V3, DeepSeek-R1, Kimi-K2, Moonlight",
    "glm4_moe": "GLM-4.5, GLM-4.6, GLM-4.7, GLM-4.5-Air",
    "glm4_moe_lite": "GLM-4.7-Flash",
    "qwen3_next": "Qwen3-Next-80B-A3B",
    "qwen3_5_moe": "Qwen3.5-MoE, Qwen3.6-MoE (e.g. 35B-A3B)",
    "gpt_oss": "gpt-oss-20b, gpt-oss-120b (MXFP4 as published, and bf16 releases)",
    "gemma4": "Gemma-4-26B-A4B",
}
# model_type spellings of the same architecture: the text-only checkpoints transformers'
# ...ForCausalLM saves for a family published as a multimodal model, and Kimi-K2, which is
# DeepSeek-V3's architecture but says kimi_k2 so that engines can tell the two apart
TYPE_ALIASES = {"qwen3_5_moe_text": "qwen3_5_moe", "gemma4_text": "gemma4", "kimi_k2": "deepseek_v3"}
# multimodal checkpoints: the language model's config is under ``text_config`` and its
# tensors under this prefix (the vision tower and any MTP layers are left unread)
COMPOSITE = {"qwen3_5_moe": "model.language_model.", "gemma4": "model.language_model."}


def language_config(raw: dict) -> tuple[dict, str | None]:
    """-> (the language model's config, the prefix of its tensors or None): a composite
    config.json's ``text_config`` with the top level's dtype, tying and quantization."""
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    prefix = COMPOSITE.get(kind) if isinstance(kind, str) else None
    text = raw.get("text_config") if prefix else None
    if prefix is not None and not isinstance(text, dict) and "num_hidden_layers" not in raw:
        # (a flat config of the language model alone is read as it is)
        raise CheckpointError(
            f"config.json of this {kind} checkpoint (a multimodal one) has no text_config, the language model's "
            "config; download the checkpoint again"
        )
    if prefix is None or not isinstance(text, dict):
        return raw, None
    merged = dict(text, model_type=raw["model_type"])
    for key in ("tie_word_embeddings", "torch_dtype", "dtype", "quantization_config"):
        if key in raw:
            merged[key] = raw[key]
    return merged, prefix


def family(model_type) -> str | None:
    """The family implementing a config's ``model_type`` (either spelling a checkpoint
    carries), or None where none does."""
    if not isinstance(model_type, str):
        return None
    name = TYPE_ALIASES.get(model_type, model_type)
    return name if name in ARCHITECTURES else None


def architecture(model_type: str | None) -> ModuleType:
    if family(model_type) is None:
        supported = ", ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items())
        if model_type is None:
            raise UnsupportedModelError(f"config.json names no model_type (the architecture); supported: {supported}")
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported: {supported}")
    return importlib.import_module(f"moespeq_cli.models.{family(model_type)}")


def parse_config(raw: dict, source: str = "config.json"):
    """-> (family module, MoEConfig) of a raw config.json, validated first (schema.py) so
    that family code only ever sees well-typed, sane fields. A failure the schema did not
    foresee still names the file rather than escaping as a Python error."""
    from moespeq_cli.models.schema import validate_config

    validate_config(raw, source)
    arch = architecture(raw.get("model_type"))
    quant = raw.get("quantization_config")
    if quant is not None and not isinstance(quant, dict):
        raise CheckpointError(
            f'{source}: quantization_config must be an object ({{"quant_method": ...}}), got '
            f"{json.dumps(quant)[:40]}; fix the file"
        )
    method = quant.get("quant_method", "?") if quant is not None else None
    refused = UnsupportedModelError(
        f"{source}: its weights are stored quantized ({method!r}, quantization_config), a format moespeq does not "
        "read for this model: it reads float32, float16 and bfloat16, block FP8 (e4m3) experts in their own "
        "tensors, and gpt-oss's MXFP4; use the model's bf16 release or a bf16 conversion"
    )
    if quant is not None and method not in (*getattr(arch, "QUANT_METHODS", ()), FP8):
        raise refused
    with config_errors(source):
        cfg = arch.parse(raw)
    if method == FP8:
        fmt = cfg.expert_format
        if fmt.fused or fmt.kind != SWIGLU or fmt.compact:
            raise refused
        cfg.expert_format = fp8_experts(fmt, fp8_block(quant, source))
    if not cfg.moe_layers or not cfg.num_experts:
        raise CheckpointError(
            f"{source} describes no Mixture-of-Experts layer (every layer is dense); moespeq runs MoE models"
        )
    return arch, cfg


def fp8_block(quant: dict, source: str) -> tuple[int, int]:
    """The (rows, columns) one scale of a block-FP8 checkpoint covers, checked."""
    block = quant.get("weight_block_size")
    fmt = quant.get("fmt", "e4m3")
    ok = isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and 1 <= b <= 2**16 for b in block)
    if not ok or fmt != "e4m3" or quant.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(
            f"{source}: quantization_config fp8 must give weight_block_size [rows, cols] with fmt e4m3 and dynamic "
            f"activations (got {str(block)[:30]}, {fmt!r}, {quant.get('activation_scheme')!r}); moespeq reads "
            "DeepSeek-style block FP8"
        )
    return block[0], block[1]


def build_model(arch: ModuleType, raw: dict, context: int, source: str = "config.json"):
    """``arch.Model(raw)`` on PyTorch's meta device (shapes only: plans, and the
    skeleton the loader assigns the checkpoint's tensors to), with any failure the config
    causes reported against the config."""
    import torch

    with config_errors(source), torch.device("meta"), skip_init():
        model = arch.Model(raw)
    model.context = context
    return model


@contextlib.contextmanager
def skip_init():
    """Modules built without their random initialisation: their weights come from the
    checkpoint (or nowhere, on the meta device). Initialising a meta tensor is not free:
    torch routes it through its reference kernels, whose first use imports the compiler
    stack (about a second and 80 MB)."""
    from torch.nn import init

    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_", "xavier_uniform_")
    saved = {n: getattr(init, n) for n in names}
    for n in names:
        setattr(init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(init, n, fn)


@contextlib.contextmanager
def config_errors(source: str):
    """A failure of family code on a validated config still names the file, never
    escaping as a bare Python error (the schema is the first line, this the second); a
    family's own "config.json lacks ..." names the whole path (with many models, which)."""
    try:
        yield
    except CheckpointError as e:
        said = str(e)
        if said.startswith("config.json ") and source.endswith("config.json") and source != "config.json":
            e.args = (source + said.removeprefix("config.json"),)
        raise
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{source} cannot be used ({type(e).__name__}: {str(e)[:120]}); fix the file") from None
