"""Rotary position embeddings: default, linear, YaRN (DeepSeek-V2) and LongRoPE (Phi-3.5-MoE).

``rope_parameters(cfg)`` reads either spelling a checkpoint may use: the hub's
``rope_theta`` + ``rope_scaling`` or transformers 5's ``rope_parameters``.
``inv_freq(...)`` returns the inverse frequencies and the factor that scales cos/sin;
``make_rotary(...)`` the tables a model rotates with.

LongRoPE (Phi-3.5-MoE) has two sets of factors: the short ones while the sequence is at
most ``original_max_position_embeddings`` long, the long ones beyond, as the reference
does (Phi-3's code picks them by the sequence so far, and its ``generate`` recomputes the
whole cache with the long ones when the sequence first passes that length). The tables
follow the pass's end (``Rotary.switch``); ``CausalLM.__call__`` recomputes the cache
when a pass crosses it, so a token's logits never depend on how long the run will be.
"""

from __future__ import annotations

import math

import torch

from moespeq_cli.errors import CheckpointError


def rope_parameters(cfg: dict, default_theta: float = 10000.0) -> dict:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    params.setdefault("rope_theta", cfg.get("rope_theta", default_theta))
    kind = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = "longrope" if kind == "su" else kind
    return params


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


ROPE_TYPES = ("default", "linear", "yarn", "longrope", "proportional")


def _number(params: dict, key: str, lowest: float = 0.0, required: bool = True, zero: bool = False) -> None:
    """params[key] is a finite number above ``lowest`` (or equal to it with ``zero``)."""
    v = params.get(key)
    if v is None and not required:
        return
    number = not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)
    if not number or v < lowest or (v == lowest and not zero):
        bound = f"{'at least' if zero else 'above'} {lowest:g}"
        need = "is required" if v is None else f"must be a finite number {bound}, got {v!r}"
        raise CheckpointError(
            f"config.json rope parameter {key!r} {need} (rope type {params['rope_type']!r}); fix the file"
        )


def check_rope(params: dict, dim: int) -> None:
    """What ``_inv_freq`` reads for the rope type, checked first: the type is supported,
    its required figures are present and sane, LongRoPE's factor lists have dim/2 entries."""
    kind = params["rope_type"]
    if kind in ("dynamic", "llama3"):  # valid in transformers; no MoE family moespeq runs ships them
        raise CheckpointError(
            f"config.json's rope type {kind!r} is one moespeq does not implement (it does: {', '.join(ROPE_TYPES)})"
        )
    if kind not in ROPE_TYPES:
        raise CheckpointError(
            f"config.json rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)}); fix the file"
        )
    _number(params, "rope_theta", lowest=1.0)
    if kind in ("linear", "yarn"):
        _number(params, "factor")
    if kind == "proportional":
        _number(params, "factor", required=False)
        _number(params, "partial_rotary_factor", required=False, zero=True)
        if params.get("partial_rotary_factor", 1.0) > 1:
            raise CheckpointError("config.json rope parameter 'partial_rotary_factor' must be at most 1; fix the file")
    if kind in ("yarn", "longrope"):
        orig = params.get("original_max_position_embeddings")
        if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
            raise CheckpointError(
                f"config.json rope parameter 'original_max_position_embeddings' must be a positive integer for "
                f"rope type {kind!r}, got {orig!r}; fix the file"
            )
    if kind == "yarn":
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            _number(params, key, required=False, zero=key.startswith("mscale"))
    if kind == "longrope":
        for key in ("long_factor", "short_factor"):
            v = params.get(key)
            ok = isinstance(v, list) and len(v) == dim // 2
            if not ok or not all(not isinstance(x, bool) and isinstance(x, int | float) and 0 < x < 1e30 for x in v):
                raise CheckpointError(
                    f"config.json rope parameter {key!r} must be a list of {dim // 2} positive numbers "
                    f"(rope type 'longrope'), got {str(v)[:40]}; fix the file"
                )
        for key in ("long_mscale", "short_mscale", "attention_factor", "factor"):
            _number(params, key, required=False)


def inv_freq(params: dict, dim: int, max_positions: int, long: bool = False) -> tuple[torch.Tensor, float]:
    check_rope(params, dim)
    with torch.device("cpu"):  # models are built on the meta device; these are real
        return _inv_freq(params, dim, max_positions, long)


def make_rotary(params: dict, dim: int, max_positions: int, interleaved: bool = False) -> Rotary:
    """The rotary tables for ``params``: LongRoPE's carry its long factors' tables too,
    used by passes that end past ``original_max_position_embeddings``."""
    rotary = Rotary(*inv_freq(params, dim, max_positions), interleaved)
    if params["rope_type"] == "longrope":
        long = Rotary(*inv_freq(params, dim, max_positions, long=True), interleaved)
        rotary.beyond = (int(params["original_max_position_embeddings"]), long)
    return rotary


def _inv_freq(params: dict, dim: int, max_positions: int, long: bool) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for a rotary dimension ``dim``, and the cos/sin scale.

    ``long``: LongRoPE's long factors (a sequence past the original training length).
    """
    base = float(params["rope_theta"])
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim  # [dim/2]
    kind = params["rope_type"]
    if kind == "default":
        return 1.0 / base**exponents, 1.0
    if kind == "linear":
        return 1.0 / (float(params["factor"]) * base**exponents), 1.0
    if kind == "proportional":
        # Gemma 4's global layers: the first ``partial_rotary_factor`` of the frequencies at
        # the full dimension's spacing, the rest zero (those pairs are not rotated)
        angles = int(float(params.get("partial_rotary_factor", 1.0)) * dim // 2)
        inv = torch.zeros(dim // 2)
        inv[:angles] = 1.0 / base ** (torch.arange(0, 2 * angles, 2, dtype=torch.float32) / dim)
        return inv / float(params.get("factor") or 1.0), 1.0
    if kind == "yarn":
        factor = float(params["factor"])
        orig = params["original_max_position_embeddings"]
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attn = params.get("attention_factor")
        if attn is None:
            attn = (
                yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
                if mscale and mscale_all
                else yarn_mscale(factor)
            )
        fast, slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(fast), correction_dim(slow)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1.0 - ramp
        pos = base**exponents
        return (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate, float(attn)
    if kind == "longrope":
        orig = params["original_max_position_embeddings"]
        factor = params.get("factor") or max_positions / orig
        ext = torch.tensor(params["long_factor" if long else "short_factor"], dtype=torch.float32)
        key = "long_mscale" if long else "short_mscale"
        if params.get(key) is not None:
            attn = float(params[key])
        elif params.get("attention_factor") is not None:
            attn = float(params["attention_factor"])
        else:
            attn = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        return 1.0 / (ext * base**exponents), attn
    raise ValueError(f"unsupported rope type {kind!r}")


# The sin tables ``Rotary.tables`` handed out last, each with the same positions' sin
# whose first half is negated: ``apply_rope`` then rotates with one op fewer a layer (it
# negates that half of the table, once, instead of half of every layer's queries and keys).
# Bit for bit the same: (-x) * s and x * (-s) round alike. Looked up by identity, the most
# recent first; a table not found here is rotated as before.
_SIGNED: list[tuple[torch.Tensor, torch.Tensor]] = []
_SIGNED_KEPT = 4  # a model's rotaries in one pass (Gemma 4 has two), with room


def signed_sin(sin: torch.Tensor) -> torch.Tensor | None:
    return next((signed for s, signed in _SIGNED if s is sin), None)


def _remember(sin: torch.Tensor, signed: torch.Tensor) -> None:
    """``signed`` as ``sin``'s signed table, the most recent first."""
    _SIGNED.insert(0, (sin, signed))
    del _SIGNED[_SIGNED_KEPT:]


class Rotary:
    """Precomputed cos/sin tables for positions [0, capacity); grows on demand.
    ``beyond``: (n, the tables of a pass that ends past position n) -- LongRoPE's."""

    def __init__(self, inv: torch.Tensor, scale: float, interleaved: bool = False):
        self.inv, self.scale, self.interleaved = inv, scale, interleaved
        self.cos = self.sin = self.sin_signed = torch.empty(0)
        self.beyond: tuple[int, Rotary] | None = None

    @property
    def switch(self) -> int | None:
        """The sequence length past which a pass takes other tables (None: never)."""
        return self.beyond[0] if self.beyond else None

    def tables(
        self, start: int, end: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions [start, end) of a pass that ends at ``end``: [end - start, d]."""
        if self.beyond and end > self.beyond[0]:
            return self.beyond[1].tables(start, end, device, dtype)
        if end > self.cos.shape[0] or self.cos.dtype != dtype or self.cos.device != device:
            n = max(end, 2 * self.cos.shape[0], 64)
            freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv[None, :]  # [n, d/2]
            emb = freqs if self.interleaved else torch.cat((freqs, freqs), dim=-1)
            self.cos = (emb.cos() * self.scale).to(device, dtype)
            self.sin = (emb.sin() * self.scale).to(device, dtype)
            if not self.interleaved:
                h = self.sin.shape[-1] // 2
                self.sin_signed = torch.cat((-self.sin[:, :h], self.sin[:, h:]), dim=-1)
        sin = self.sin[start:end]
        if not self.interleaved:  # views of the tables: nothing computed per pass
            _remember(sin, self.sin_signed[start:end])
        return self.cos[start:end], sin


def rope_rows(rope, a: int, b: int):
    """A pass's rotary tables cut to its rows [a, b) (a prompt's part, models/base.py
    ``attention_in_parts``): ``(cos, sin)``, or a dict of them (Gemma 4's), each table's
    rows, a signed sine's too. None stays None."""
    if rope is None:
        return None
    if isinstance(rope, dict):
        return {key: rope_rows(tables, a, b) for key, tables in rope.items()}
    cos, sin = rope
    part, signed = sin[a:b], signed_sin(sin)
    if signed is not None:
        _remember(part, signed[a:b])
    return cos[a:b], part


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation (Llama/Mixtral layout). x: [heads, T, d]; cos/sin: [T, d].
    With the signed table of ``sin`` (``Rotary.tables``'): x's halves swapped times it,
    the same bits as ``rotate_half(x) * sin`` in one op fewer."""
    signed = signed_sin(sin)
    if signed is None:
        return x * cos + rotate_half(x) * sin
    h = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., h:], x[..., :h]), dim=-1) * signed


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pairwise (complex) rotation, DeepSeek layout: dims (2i, 2i+1) form one pair.
    Computed in float32 like the reference. x: [heads, T, d]; cos/sin: [T, d/2]."""
    xf = x.float().unflatten(-1, (-1, 2))  # [heads, T, d/2, 2]
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos.float(), sin.float()
    return torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2).to(x.dtype)


def partial_rotary_dim(cfg: dict, head_dim: int, default: float) -> int:
    """How many of a head's dimensions rotate: ``partial_rotary_factor`` (else ``default``)
    of ``head_dim`` (GLM-4.x, Qwen3-Next/3.5). An odd count is refused: transformers then
    rotates one dimension more than its frequencies are spaced for, which no published
    model does (and moespeq would give other tokens without a word)."""
    f = cfg.get("partial_rotary_factor") or rope_parameters(cfg).get("partial_rotary_factor") or default
    if not 0 < float(f) <= 1:
        raise CheckpointError(f"config.json partial_rotary_factor must be in (0, 1], got {f!r}; fix the file")
    dim = int(head_dim * float(f))
    if dim % 2:
        raise CheckpointError(
            f"config.json's head_dim {head_dim} x partial_rotary_factor {f} = {dim} rotary dimensions, an odd number "
            "that moespeq does not run; no published model has one"
        )
    return dim
