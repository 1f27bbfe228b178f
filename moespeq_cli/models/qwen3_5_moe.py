"""Qwen3.5-MoE and Qwen3.6-MoE (``qwen3_5_moe``; ``qwen3_5_moe_text`` for the text-only
checkpoints transformers' ``Qwen3_5MoeForCausalLM`` saves): Qwen3-Next's hybrid of
Gated DeltaNet and gated full attention (qwen3_next.py), with three differences:

- the linear attention's q|k|v, z, b and a come from four separate projections
  (``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``), not grouped per key head;
- every layer is sparse, and the top-k weights are always renormalised;
- the rotary embedding is multimodal (mrope sections per time/height/width axis), which
  for text, where the three positions are equal, is the plain rotary embedding.

The published checkpoints are multimodal: config.json holds the language model under
``text_config`` and its tensors under ``model.language_model.``; the vision tower and the
multi-token-prediction layers (``mtp.``) are present and not loaded (checkpoint.py).
"""

from __future__ import annotations

import torch
from torch import nn

from moespeq_cli.models import qwen3_next
from moespeq_cli.models.qwen3_next import parse

__all__ = ["Model", "parse"]


class SplitGatedDeltaNet(qwen3_next.GatedDeltaNet):
    def projections(self, hidden: int, key_dim: int, value_dim: int) -> None:
        self.in_proj_qkv = nn.Linear(hidden, 2 * key_dim + value_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, self.nv, bias=False)
        self.in_proj_a = nn.Linear(hidden, self.nv, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = x.shape[0]
        z = self.in_proj_z(x).view(T, self.nv, self.dv)
        return self.in_proj_qkv(x).t(), z, self.in_proj_b(x), self.in_proj_a(x)


class Model(qwen3_next.Model):
    delta_net = SplitGatedDeltaNet
    always_normalize = True
