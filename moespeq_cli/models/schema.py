"""What a config.json must hold before any model code reads it.

Family code reads fields with ``cfg.get`` and trusts their types; a hostile or broken
config (``num_attention_heads: 0``, ``rms_norm_eps: "tiny"``, ``num_hidden_layers:
10**9``) must not reach it. ``validate_config`` checks every field the families read:
its type, its range (with upper bounds that keep the arithmetic of a plan sane: no
real MoE has a million layers), and the relations between fields (top-k within the
experts, heads divisible by KV heads, the model's parameter count). It raises a
CheckpointError naming the file, the field and the fix, and is cheap: arithmetic only.
"""

from __future__ import annotations

import math

from moespeq_cli.errors import CheckpointError

DIM = 2**18  # hidden and intermediate sizes (the largest released models use ~2**15)
# field -> (lowest, highest) for positive or non-negative integers
INTS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 2**22),
    "hidden_size": (1, DIM),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 4096),
    "num_key_value_heads": (1, 4096),
    "head_dim": (1, 8192),
    "intermediate_size": (1, DIM),
    "moe_intermediate_size": (1, DIM),
    "shared_expert_intermediate_size": (0, DIM),
    "num_local_experts": (1, 2**14),
    "num_experts": (1, 2**14),
    "n_routed_experts": (1, 2**14),
    "n_shared_experts": (0, 64),
    "num_experts_per_tok": (1, 2**14),
    "max_position_embeddings": (1, 2**26),
    "sliding_window": (0, 2**26),  # 0 or null: no window
    "first_k_dense_replace": (0, 1024),
    "moe_layer_freq": (1, 1024),
    "decoder_sparse_step": (1, 1024),
    "kv_lora_rank": (1, DIM),
    "q_lora_rank": (1, DIM),
    "qk_nope_head_dim": (1, 8192),
    "qk_rope_head_dim": (1, 8192),
    "v_head_dim": (1, 8192),
    "n_group": (1, 2**14),
    "topk_group": (1, 2**14),
}
# field -> (lowest, lowest excluded, highest) for finite numbers; the upper bounds keep
# every figure representable in float32 (bf16 shares its range) and physically meaningful
FLOATS: dict[str, tuple[float, bool, float]] = {
    "rms_norm_eps": (0.0, True, 1.0),
    "rope_theta": (1.0, False, 1e15),
    "routed_scaling_factor": (0.0, True, 1e4),
    "router_jitter_noise": (0.0, False, 1.0),
    "input_jitter_noise": (0.0, False, 1.0),
    "clip_qkv": (0.0, True, 1e6),
    "attention_dropout": (0.0, False, 1.0),
    "partial_rotary_factor": (0.0, True, 1.0),
    "swiglu_alpha": (0.0, True, 1e4),
    "swiglu_limit": (0.0, True, 1e6),
}
BOOLS = (
    "norm_topk_prob",
    "attention_bias",
    "tie_word_embeddings",
    "use_sliding_window",
    "qkv_bias",
    "mlp_bias",
    "lm_head_bias",
)
STRINGS = ("model_type", "hidden_act", "torch_dtype", "dtype", "topk_method")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
ROPE_FLOATS = (
    "rope_theta",
    "factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "low_freq_factor",
    "high_freq_factor",
)
# DeepSeek-V2's routers, and V3's ("noaux_tc": sigmoid scores with a correction bias, as
# DeepSeek-V3, R1, Kimi-K2 and Moonlight's config.json name it)
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
EXPERT_COUNT = ("num_local_experts", "num_experts", "n_routed_experts")
EXPERT_INTER = ("moe_intermediate_size", "intermediate_size")
MAX_PARAMS = 2 * 10**13  # 20 trillion parameters: beyond any released model by 10x


def _bad(source: str, field: str, want: str, value) -> CheckpointError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return CheckpointError(f"{source}: field {field!r} must be {want}, got {shown}; fix the file or download it again")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_token_ids(source: str, field: str, v, vocab: int | None = None) -> None:
    """A token id or a list of them: non-negative integers (below the vocabulary)."""
    ids = v if isinstance(v, list) else [v]
    top = vocab if vocab else 2**31
    if not all(is_int(i) and 0 <= i < top for i in ids):
        raise _bad(source, field, f"a token id (an integer from 0 to {top - 1}) or a list of them", v)


def _check_rope(source: str, field: str, params) -> None:
    if not isinstance(params, dict):
        raise _bad(source, field, "a mapping (or null)", params)
    for k in ("rope_type", "type"):
        if k in params and params[k] is not None and not isinstance(params[k], str):
            raise _bad(source, f"{field}.{k}", "a string", params[k])
    for k in ROPE_FLOATS:
        v = params.get(k)
        if v is not None and not (is_number(v) and v >= 0):
            raise _bad(source, f"{field}.{k}", "a finite non-negative number", v)
    if params.get("factor") is not None and params["factor"] <= 0:
        raise _bad(source, f"{field}.factor", "positive", params["factor"])
    v = params.get("original_max_position_embeddings")
    if v is not None and not (is_int(v) and 1 <= v <= 2**26):
        raise _bad(source, f"{field}.original_max_position_embeddings", "a positive integer", v)
    for k in ("long_factor", "short_factor"):
        v = params.get(k)
        if v is not None and not (isinstance(v, list) and all(is_number(x) and x > 0 for x in v)):
            raise _bad(source, f"{field}.{k}", "a list of positive numbers", v)


def validate_config(cfg: dict, source: str = "config.json") -> None:
    """Raise a CheckpointError for the first field of ``cfg`` the model code cannot use."""
    for f in STRINGS:
        if f in cfg and cfg[f] is not None and not isinstance(cfg[f], str):
            raise _bad(source, f, "a string", cfg[f])
    for f, (lo, hi) in INTS.items():
        v = cfg.get(f)
        if v is not None and not (is_int(v) and lo <= v <= hi):
            kind = "a positive integer" if lo == 1 else "a non-negative integer"
            raise _bad(source, f, f"{kind} of at most {hi}", v)
    for f, (lo, exclusive, hi) in FLOATS.items():
        v = cfg.get(f)
        if v is None:
            continue
        if not is_number(v) or v < lo or (exclusive and v == lo) or v > hi:
            low = ("above " if exclusive else "from ") + f"{lo:g}"
            raise _bad(source, f, f"a finite number {low} {'to' if not exclusive else 'and at most'} {hi:g}", v)
    for f in BOOLS:
        if cfg.get(f) is not None and not isinstance(cfg[f], bool):
            raise _bad(source, f, "true or false", cfg[f])
    for f in TOKEN_IDS:
        if cfg.get(f) is not None:
            check_token_ids(source, f, cfg[f], cfg.get("vocab_size"))
    for f in ("rope_scaling", "rope_parameters"):
        if cfg.get(f) is not None:
            _check_rope(source, f, cfg[f])
    method = cfg.get("topk_method")
    if method is not None and method not in TOPK_METHODS:
        raise _bad(source, "topk_method", f"one of {', '.join(TOPK_METHODS)}", method)
    dense = cfg.get("mlp_only_layers")
    if dense is not None and not (isinstance(dense, list) and all(is_int(i) and i >= 0 for i in dense)):
        raise _bad(source, "mlp_only_layers", "a list of layer numbers", dense)
    _check_relations(cfg, source)


def _first(cfg: dict, names: tuple[str, ...]):
    return next((cfg[n] for n in names if cfg.get(n) is not None), None)


def _check_relations(cfg: dict, source: str) -> None:
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    hidden = cfg.get("hidden_size")
    if heads and kv and heads % kv:
        raise CheckpointError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv}); fix the file"
        )
    if heads and hidden and cfg.get("head_dim") is None and "kv_lora_rank" not in cfg and hidden % heads:
        raise CheckpointError(
            f"{source}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}) "
            "when head_dim is not given; fix the file"
        )
    head_dim = cfg.get("head_dim") or (hidden // heads if heads and hidden else None)
    for field, dim in (
        ("head_dim", head_dim if "kv_lora_rank" not in cfg else None),
        ("qk_rope_head_dim", cfg.get("qk_rope_head_dim")),
    ):
        if dim and dim % 2:
            raise CheckpointError(
                f"{source}: {field} ({dim}) must be even (rotary embeddings rotate pairs of dimensions); fix the file"
            )
    experts, top_k = _first(cfg, EXPERT_COUNT), cfg.get("num_experts_per_tok")
    if experts and top_k and top_k > experts:
        raise CheckpointError(
            f"{source}: num_experts_per_tok ({top_k}) is more than the {experts} experts; fix the file"
        )
    if cfg.get("topk_method") == "group_limited_greedy":
        groups, keep = cfg.get("n_group"), cfg.get("topk_group")
        if not groups or not keep or keep > groups or (experts and experts % groups):
            raise CheckpointError(
                f"{source}: group_limited_greedy routing needs n_group dividing the experts and "
                f"topk_group <= n_group (got n_group {groups}, topk_group {keep}, {experts} experts); fix the file"
            )
    layers, inter = cfg.get("num_hidden_layers"), _first(cfg, EXPERT_INTER)
    vocab = cfg.get("vocab_size")
    if layers and hidden and vocab:
        # Experts, attention (four hidden x hidden projections) and the embeddings.
        params = layers * ((experts or 1) * 3 * hidden * (inter or hidden) + 4 * hidden * hidden) + 2 * vocab * hidden
        if params > MAX_PARAMS:
            raise CheckpointError(
                f"{source}: its sizes imply about {params:.2e} parameters, far beyond any real model "
                "(hidden_size, num_hidden_layers, the experts); fix the file"
            )
