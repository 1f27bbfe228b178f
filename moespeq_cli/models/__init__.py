"""Architectures, one file per Hugging Face ``model_type``.

``ARCHITECTURES`` maps config.json's ``model_type`` to the module that implements it.
Each module has ``parse(cfg) -> MoEConfig`` and ``Model(cfg, context)``, a CausalLM
whose parameter names are the checkpoint's.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from moespeq_cli.errors import CheckpointError, UnsupportedModelError

ARCHITECTURES = {
    "mixtral": "Mixtral-8x7B, Mixtral-8x22B",
    "qwen2_moe": "Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B",
    "qwen3_moe": "Qwen3-30B-A3B, Qwen3-235B-A22B",
    "olmoe": "OLMoE-1B-7B",
    "phimoe": "Phi-3.5-MoE",
    "deepseek_v2": "DeepSeek-V2-Lite, DeepSeek-V2",
}


def architecture(model_type: str | None) -> ModuleType:
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        supported = ", ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items())
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported: {supported}")
    return importlib.import_module(f"moespeq_cli.models.{model_type}")


def parse_config(raw: dict, source: str = "config.json"):
    """-> (family module, MoEConfig) of a raw config.json, validated first (schema.py) so
    that family code only ever sees well-typed, sane fields. A failure the schema did not
    foresee still names the file rather than escaping as a Python error."""
    from moespeq_cli.models.schema import validate_config

    validate_config(raw, source)
    arch = architecture(raw.get("model_type"))
    try:
        return arch, arch.parse(raw)
    except (TypeError, ValueError, KeyError, ZeroDivisionError, AttributeError) as e:
        raise CheckpointError(f"{source} cannot be used ({type(e).__name__}: {e}); fix the file") from None
