"""Build a model from a checkpoint: the non-expert weights are loaded into the family's
module tree by their Hugging Face names (shapes checked against the config first), the
routed experts stay in the checkpoint for an executor to fetch."""

from __future__ import annotations

import torch

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models import build_model
from moespeq_cli.models.base import CausalLM
from moespeq_cli.models.checkpoint import FP8_DTYPE, Checkpoint


def load_model(
    ckpt: Checkpoint, dtype: torch.dtype | None = None, context: int = 0, cpu_kernels: bool = False
) -> CausalLM:
    """``dtype``: what the model computes in. ``cpu_kernels``: the dense layers compute
    through moespeq's CPU kernels (kernels/modules.py) with their weights kept in the
    checkpoint's dtype, not widened to ``dtype`` (half the memory and bytes per token
    for a bf16 checkpoint computed in float32)."""
    dtype = dtype or ckpt.config.dtype
    model: CausalLM = build_model(ckpt.arch, ckpt.raw_config, context, str(ckpt.path / "config.json"))
    kept: set[str] = set()
    if cpu_kernels:
        from moespeq_cli.kernels.modules import kernel_weight_names

        kept = kernel_weight_names(model)
    tied = bool(ckpt.raw_config.get("tie_word_embeddings", getattr(model, "ties_by_default", False)))
    state = {}
    for name, p in model.state_dict().items():
        src = name
        if name == "lm_head.weight" and not ckpt.has(name) and tied:
            src = "model.embed_tokens.weight"
        shape = ckpt.shape(src)
        if shape != tuple(p.shape):
            raise CheckpointError(
                f"tensor {src} has shape {list(shape)} but config.json implies {list(p.shape)}; "
                "the checkpoint and its config disagree"
            )
        # a router's correction bias (DeepSeek-V3, GLM-4.5) only ranks experts, by margins
        # bf16 would round away: kept in float32, as transformers keeps it
        want = torch.float32 if name.endswith("e_score_correction_bias") else None if name in kept else dtype
        if want is None and ckpt.dtype_name(src) == FP8_DTYPE:
            want = ckpt.config.dtype  # a block-FP8 dense weight: dequantized at load (the experts stay FP8)
        state[name] = ckpt.tensor(src, want)
    model.load_state_dict(state, assign=True)
    if cpu_kernels:
        from moespeq_cli.kernels.modules import use_cpu_kernels

        use_cpu_kernels(model, dtype)
    return model.eval()
