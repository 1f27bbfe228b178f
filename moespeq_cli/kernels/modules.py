"""Put a model's dense layers on the CPU kernels: every ``nn.Linear`` computes through
``kernels.linear`` (its weight kept in the checkpoint's dtype, activations fp32), every
``nn.Embedding`` looks up rows in that dtype and widens them, attention's q, k and v
projections run as one product (one call and one weight stream instead of three), and
RMSNorm, the rotary embedding, softmax-then-top-k routing and attention itself
(decoding's and verification's few queries over the cache) run as one call each instead
of several torch ops. A decoder layer built only of parts the kernels take (a plain
attention, RMSNorms, a SparseMoE routed by softmax then top-k over experts all in memory)
runs as one call: the same kernels in the same order, without the Python between them.

The module tree and its parameter names are unchanged (forward hooks, the op counter and
``load_state_dict`` see the same modules); only ``forward`` is rebound per instance.
Weights are bound where they lie once loaded (the fused q/k/v buffer; a layer's
description, made at its first call): loading into the parameters in place is seen,
replacing them (``load_state_dict(assign=True)``, ``.to()``) is not.
Shapes the kernels do not take (a long prefill, other activation dtypes) go to torch
with the weight widened for that call.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from moespeq_cli import kernels


def kernel_weight_names(model: nn.Module) -> set[str]:
    """The parameters a kernel-backed model keeps in the checkpoint's dtype."""
    return {
        f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Embedding)
    }


def dense(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` through the kernels where they take it, else torch."""
    if x.dim() == 2 and kernels.takes(x, w):
        return kernels.linear(x, w, b)
    with kernels.torch_parallel():
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
            b = None if b is None else b.to(x.dtype)
        return F.linear(x, w, b)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return dense(x, self.weight, self.bias)


def _rmsnorm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return type(self).forward(self, x)
    return kernels.rmsnorm(x, self.weight, self.eps)


def _embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, self.weight).to(self.out_dtype)


def _attention_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    sinks = self._parameters.get("sinks")  # gpt-oss's (a dict read: no nn.Module.__getattr__)
    if sinks is not None and sinks.dtype != torch.float32:
        sinks = sinks.float()
    out = kernels.attention(q, k, v, start, self.scale, self.kernel_window, sinks)
    return out if out is not None else type(self).core(self, q, k, v, start)


def _fp32_router_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``Fp32Router.forward`` (DeepSeek, GLM) through ``dense``: the weight as stored,
    widened in registers, batch invariant (torch's fp32 GEMM need not be: a
    verification's rows then differed from single steps')."""
    return dense(x.float(), self.weight, None if self.bias is None else self.bias.float())


def _mla_absorb(self, q_nope: torch.Tensor) -> torch.Tensor:
    """``MLAttention.absorb`` as one ``kernels.per_head`` call over the weight as stored."""
    out = torch.empty(self.heads, q_nope.shape[0], self.kv_lora)
    if kernels.per_head(q_nope.transpose(0, 1), self.expansions()[0], out, transposed=True):
        return out
    return type(self).absorb(self, q_nope)


def _mla_expand(self, out: torch.Tensor) -> torch.Tensor:
    """``MLAttention.expand`` as one ``kernels.per_head`` call over the weight as stored."""
    T, H = out.shape[0], self.heads
    y = torch.empty(T, H * self.v_dim)
    lat = out.view(T, H, self.kv_lora).transpose(0, 1)
    if out.is_contiguous() and kernels.per_head(lat, self.expansions()[1], y.view(T, H, self.v_dim).transpose(0, 1)):
        return y
    return type(self).expand(self, out)


def _attention_block_forward(self, x: torch.Tensor, layer: int, cache, rope: tuple) -> torch.Tensor:
    """The whole attention (projections, q/k norms, rotary, the cache's write, attention,
    the output projection) as one ``kernels.attention_block`` call: the same kernels in the
    same order as ``Attention.forward`` with them, one ctypes call where there were five
    and two dozen small torch ops (about 40 us a layer on two cores)."""
    if x.dim() == 2 and x.dtype == torch.float32 and x.shape[0] <= kernels.MAX_ROWS:
        s, (_, w, b, _) = self.s, self.fused_qkv
        kv = cache.reserve(layer, x.shape[0], self.kv_like, self.kv_like)
        y = kernels.attention_block(
            x, (w, b), (self.o_proj.weight, self.o_proj.bias), self.kernel_qk_norm, *rope, kv,
            cache.length - cache.offset(layer),
            (s.heads, s.kv_heads, s.head_dim), s.window, self.scale,
        )  # fmt: skip
        if y is not None:
            return y
    return type(self).forward(self, x, layer, cache, rope)


def one_call_attention(m: nn.Module) -> bool:
    """Whether the kernels run attention module ``m`` as one ``kernels.attention_block``
    call (with float32 activations): plain ``Attention`` (no family's own forward or core),
    rotary over whole heads, no clipping, and no q/k norms but Qwen3's per head, plain
    RMSNorm (a family's own, e.g. 1 + w, is not the kernel's) with one eps."""
    from moespeq_cli.models.base import Attention, RMSNorm

    if type(m) is not Attention or m.s.clip_qkv is not None or m.s.rotary_dim is not None:
        return False
    if m.s.qk_norm == "head":
        return type(m.q_norm) is type(m.k_norm) is RMSNorm and m.q_norm.eps == m.k_norm.eps
    return m.s.qk_norm is None


def _whole_attention(m, act_dtype: torch.dtype) -> bool:
    """Rebinds ``m``'s forward to one ``kernels.attention_block`` call where
    ``one_call_attention`` holds and the q/k norms' weights are float32 (they run on the
    kernels too); whether it did."""
    if act_dtype != torch.float32 or not one_call_attention(m):
        return False
    s = m.s
    m.kernel_qk_norm = None
    if s.qk_norm == "head":
        qn, kn = m.q_norm, m.k_norm
        if not qn.weight.dtype == kn.weight.dtype == torch.float32:
            return False
        m.kernel_qk_norm = (qn.weight, kn.weight, qn.eps)
    m.kv_like = torch.empty(s.kv_heads, 0, s.head_dim)  # the cache's buffers are made like it
    m.forward = types.MethodType(_attention_block_forward, m)
    return True


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A dense gated MLP or shared expert as one ``kernels.expert`` call: one call where
    three products and two elementwise ops were, and rows that do not depend on the batch
    (torch's activations run a vector body and a scalar tail, which split a row's elements
    differently for one token and for several when the width is not a multiple of 16)."""
    w = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
    if x.dim() == 2 and w[0].dtype == w[1].dtype == w[2].dtype and kernels.takes(x, *w):
        return kernels.expert(x, *w, self.act_name)
    return type(self).forward(self, x)


def _kernel_route(route):
    """``route`` (a ``softmax_topk``) as one ``kernels.route_softmax`` call where it takes
    the logits, else ``route`` itself."""
    top_k, normalize = route.softmax_topk

    def kernel_route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = kernels.route_softmax(logits, top_k, normalize)
        return out if out is not None else route(logits)

    kernel_route.softmax_topk = route.softmax_topk
    kernel_route.select = route.select
    return kernel_route


def _hooked(modules: tuple) -> bool:
    """Whether a forward hook would see one of ``modules`` run (the one-call layer would
    skip it): their own or a global one."""
    from torch.nn.modules import module

    if module._global_forward_hooks or module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _describe_layer(self, layer: int) -> kernels.LayerDesc | None:
    """``kernels.layer_desc`` of this ``DecoderLayer`` with its experts as they are now set."""
    norm1, attn, norm2, moe = self.kernel_parts
    table = getattr(moe.experts, "table", None)
    table = table(layer) if table is not None else None
    if table is None:
        return None
    s, (_, wqkv, bqkv, _) = attn.s, attn.fused_qkv
    return kernels.layer_desc(
        ((norm1.weight, norm1.eps), (norm2.weight, norm2.eps)), (wqkv, bqkv), (attn.o_proj.weight, attn.o_proj.bias),
        attn.kernel_qk_norm, (s.heads, s.kv_heads, s.head_dim), s.window, attn.scale, moe.gate.weight,
        moe.route.softmax_topk, table,
    )  # fmt: skip


def _layer_desc_now(self, layer: int) -> kernels.LayerDesc | None:
    """This layer's description where the one-call layer may run it now: nothing watches
    the MoE block (no routing observer, no hook on the layer's parts) and its experts are
    all in memory in one table; else None."""
    moe = self.kernel_parts[3]
    if self.kernel_desc[0] is not moe.experts:  # described for the executor set now (set after loading)
        self.kernel_desc = (moe.experts, _describe_layer(self, layer))
    desc = self.kernel_desc[1]
    if desc is None or moe.observer is not None or _hooked((*self.kernel_parts, moe.gate)):
        return None
    return desc


def _layer_forward(self, x: torch.Tensor, layer: int, cache, rope: tuple) -> torch.Tensor:
    """The whole layer as one ``kernels.layer_forward`` call where it takes it
    (``_layer_desc_now``); else ``DecoderLayer.forward``."""
    attn = self.kernel_parts[1]
    desc = _layer_desc_now(self, layer)
    if desc is not None:
        kv = cache.reserve(layer, x.shape[0], attn.kv_like, attn.kv_like)
        y = kernels.layer_forward(desc, x, *rope, kv, cache.length - cache.offset(layer))
        if y is not None:
            return y
    return type(self).forward(self, x, layer, cache, rope)


def _whole_layer(layer: nn.Module) -> bool:
    """Rebinds a ``DecoderLayer``'s forward to ``_layer_forward`` where its parts are ones
    the one-call layer computes (checked again at each call for what can change); whether
    it did."""
    from moespeq_cli.models.base import DecoderLayer, RMSNorm, SparseMoE

    if type(layer) is not DecoderLayer:
        return False
    attn, moe = layer.attn, layer.ffn
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if not (
        getattr(attn.forward, "__func__", None) is _attention_block_forward
        and type(moe) is SparseMoE
        and hasattr(moe.route, "softmax_topk")
        and type(moe.gate) is nn.Linear  # not an Fp32Router
        and moe.gate.bias is None
        and all(type(n) is RMSNorm and n.weight.dtype == torch.float32 for n in norms)
    ):
        return False
    layer.kernel_parts = (norms[0], attn, norms[1], moe)
    layer.kernel_desc = (None, None)  # (the executor it describes, the description)
    layer.forward = types.MethodType(_layer_forward, layer)
    return True


def _pass_descs(self, input_ids: torch.Tensor) -> list[kernels.LayerDesc] | None:
    """Every layer's description where the whole pass may be one call now: rows the
    kernels take, each layer one call (``_layer_desc_now``) with no hook on it, and no hook
    on the embedding, the final norm or the head; else None."""
    base = self.model
    if not (1 <= input_ids.shape[0] <= kernels.MAX_ROWS and input_ids.is_cpu):
        return None
    if _hooked((base.embed_tokens, base.norm, self.lm_head)):
        return None
    descs = [_layer_desc_now(layer, i) for i, layer in enumerate(base.layers)]
    if any(d is None for d in descs) or _hooked(tuple(base.layers)):
        return None
    return descs


@torch.inference_mode()
def _model_forward(self, input_ids: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
    """The whole forward pass as one ``kernels.model_forward`` call where ``_pass_descs``
    allows it and every layer's buffers begin at position 0 (no sliding-window layer); else
    ``CausalLM.forward`` (layer by layer, each perhaps one call)."""
    descs = None if cache.windows else _pass_descs(self, input_ids)
    if descs is not None:
        base, start, T = self.model, cache.length, input_ids.shape[0]
        cos, sin = self.rope_tables(start, start + T, input_ids.device, torch.float32)
        kvs = [cache.reserve(i, T, layer.attn.kv_like, layer.attn.kv_like) for i, layer in enumerate(base.layers)]
        logits = kernels.model_forward(
            descs, base.embed_tokens.weight, input_ids, cos, sin, kvs, start,
            (base.norm.weight, base.norm.eps), (self.lm_head.weight, self.lm_head.bias), last_only,
        )  # fmt: skip
        if logits is not None:
            cache.length += T
            return logits
    return type(self).forward(self, input_ids, cache, last_only)


def _whole_model(model: nn.Module) -> bool:
    """Rebinds a ``CausalLM``'s forward to ``_model_forward`` where it runs the common
    top level unchanged (no family's own embedding scale, logit cap or rotary tables) over
    layers that are each one call, a plain RMSNorm and a linear head; whether it did."""
    from moespeq_cli.models.base import CausalLM, RMSNorm

    cls, base = type(model), getattr(model, "model", None)
    if not (
        isinstance(model, CausalLM)
        and all(getattr(cls, f) is getattr(CausalLM, f) for f in ("forward", "embed", "logits", "rope_tables"))
        and type(base.embed_tokens) is nn.Embedding
        and type(base.norm) is RMSNorm
        and base.norm.weight.dtype == torch.float32
        and type(model.lm_head) is nn.Linear
        and len(base.layers) > 0
        and all(hasattr(layer, "kernel_parts") for layer in base.layers)
    ):
        return False
    model.forward = types.MethodType(_model_forward, model)
    return True


def use_cpu_kernels(model: nn.Module, act_dtype: torch.dtype = torch.float32) -> nn.Module:
    from moespeq_cli.models.base import Attention, Fp32Router, GatedMLP, RMSNorm, SparseMoE, fuse_attention_projections
    from moespeq_cli.models.deepseek_v2 import MLAttention

    fuse_attention_projections(model, dense)
    for m in model.modules():
        if isinstance(m, Attention | MLAttention):
            m.kernel_window = m.s.window if isinstance(m, Attention) else None  # MLA: no sliding window
            m.core = types.MethodType(_attention_core, m)
        if isinstance(m, MLAttention):
            m.absorb = types.MethodType(_mla_absorb, m)
            m.expand = types.MethodType(_mla_expand, m)
        if isinstance(m, GatedMLP) and m.gate_proj.bias is None:
            m.forward = types.MethodType(_gated_mlp_forward, m)
        if isinstance(m, Attention):
            m.rotate = kernels.rope
            _whole_attention(m, act_dtype)
        elif type(m) is RMSNorm and m.weight.dtype == torch.float32 == act_dtype:
            m.forward = types.MethodType(_rmsnorm_forward, m)
        if isinstance(m, Fp32Router):
            m.forward = types.MethodType(_fp32_router_forward, m)
        elif isinstance(m, nn.Linear):
            m.forward = types.MethodType(_linear_forward, m)
        elif isinstance(m, nn.Embedding):
            m.out_dtype = act_dtype
            m.forward = types.MethodType(_embedding_forward, m)
        if isinstance(m, SparseMoE) and hasattr(m.route, "softmax_topk") and act_dtype == torch.float32:
            m.route = _kernel_route(m.route)
    for m in model.modules():  # after their parts: a layer is one call only where each part is
        _whole_layer(m)
    _whole_model(model)  # and a pass only where each layer is
    return model
