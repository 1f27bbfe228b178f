"""How a checkpoint stores its routed experts, and how one of them computes.

Most families store each expert as three matrices in ``nn.Linear`` layout -- gate and up
``[I, H]``, down ``[H, I]`` -- under names like ``model.layers.3.mlp.experts.7.gate_proj.weight``,
and compute ``down(silu(gate x) * up x)``. gpt-oss stores a layer's experts *fused*, one
tensor per kind for all E of them, transposed, with biases, and gate and up interleaved
column by column::

    model.layers.3.mlp.experts.gate_up_proj       [E, H, 2I]  (x @ W: column 2j is gate j, 2j+1 is up j)
    model.layers.3.mlp.experts.gate_up_proj_bias  [E, 2I]
    model.layers.3.mlp.experts.down_proj          [E, I, H]
    model.layers.3.mlp.experts.down_proj_bias     [E, H]

and its activation is a clamped SwiGLU: ``(clamp(up, ±limit) + 1) * g * sigmoid(alpha g)``
with ``g = min(gate, limit)``. Gemma 4 fuses too, untransposed: ``experts.gate_up_proj``
``[E, 2I, H]`` (gate rows, then up rows) and ``experts.down_proj`` ``[E, H, I]``, with a
GELU gate.

An ``ExpertFormat`` names an expert's *parts*: the pieces of the checkpoint that hold it,
each one contiguous range of a file (a whole tensor, or row ``e`` of a fused one). Every
tier holds an expert as its parts packed end to end, *as stored* -- the disk tier reads
them without converting anything, a copy up to the device moves one buffer -- and the
format computes from them (``forward``). The 4-bit draft quantizes the expert's canonical
matrices (``canonical``: gate, up ``[I, H]`` and down ``[H, I]`` plus any biases), which
every kernel path of the draft takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MXFP4 = "mxfp4"  # OCP microscaling FP4: blocks of 32 e2m1 values sharing a power-of-two scale
FP8 = "fp8"  # DeepSeek-style block FP8: e4m3 weights, one fp32 ``weight_scale_inv`` per block
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

SWIGLU = "swiglu"
GPT_OSS = "gpt_oss"
GEGLU = "geglu"  # Gemma 4: fused gate|up halves [E, 2I, H], down [E, H, I], GELU (tanh) gate


@dataclass(frozen=True)
class ExpertFormat:
    names: tuple[str, ...]  # the parts' tensor names after the prefix
    prefix: str  # "model.layers.{layer}.mlp.experts.{expert}." (fused: no {expert})
    kind: str = SWIGLU
    alpha: float = 1.702  # gpt-oss's clamped SwiGLU
    limit: float = 7.0
    approximate: str = "tanh"  # GEGLU: torch's GELU approximation ("tanh" or "none")
    quant: str | None = None  # MXFP4 or FP8: the matrices are stored compact
    block: tuple[int, int] = (128, 128)  # FP8: the rows and columns one scale covers

    @property
    def fused(self) -> bool:
        """One tensor per part holds all of a layer's experts; expert e is its row e."""
        return "{expert}" not in self.prefix

    @property
    def biased(self) -> bool:
        return self.kind == GPT_OSS

    @property
    def compact(self) -> bool:
        """The matrices are stored quantized: every tier holds and moves the stored bytes."""
        return self.quant is not None

    @property
    def four_bit(self) -> bool:
        """Stored at 4 bits a weight already: a 4-bit draft of them would be no smaller."""
        return self.quant == MXFP4

    def part_dtypes(self, dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        """Each part's dtype, for a checkpoint whose floating-point tensors are ``dtype``."""
        if self.quant == MXFP4:
            u8 = torch.uint8
            return u8, u8, dtype, u8, u8, dtype
        if self.quant == FP8:
            return (torch.float8_e4m3fn, torch.float32) * 3
        return (dtype,) * len(self.names)

    def nbytes(self, hidden: int, inter: int, dtype: torch.dtype) -> int:
        """One expert's bytes as stored."""
        return sum(
            math.prod(s) * d.itemsize for s, d in zip(self.shapes(hidden, inter), self.part_dtypes(dtype), strict=True)
        )

    def keys(self, layer: int, expert: int) -> tuple[str, ...]:
        """The checkpoint tensors that hold the parts (fused: the layer's shared tensors)."""
        if self.fused:
            p = self.prefix.format(layer=layer)
            return tuple(p + n for n in self.names)
        p = self.prefix.format(layer=layer, expert=expert)
        if self.quant == FP8:
            return tuple(f"{p}{n}.{s}" for n in self.names for s in ("weight", "weight_scale_inv"))
        return tuple(f"{p}{n}.weight" for n in self.names)

    def shapes(self, hidden: int, inter: int) -> tuple[tuple[int, ...], ...]:
        """One expert's parts as stored (a fused tensor is ``[E, *shape]``)."""
        if self.quant == FP8:  # each matrix, then its grid of block scales
            bm, bn = self.block
            return tuple(s for r, c in self.matrix_shapes(hidden, inter) for s in ((r, c), (-(-r // bm), -(-c // bn))))
        if self.quant == MXFP4:  # matrices [out, in] as 32-value blocks of 16 bytes, a scale each
            return (
                (2 * inter, hidden // 32, 16),
                (2 * inter, hidden // 32),
                (2 * inter,),
                (hidden, inter // 32, 16),
                (hidden, inter // 32),
                (hidden,),
            )
        if self.kind == GPT_OSS:
            return (hidden, 2 * inter), (2 * inter,), (inter, hidden), (hidden,)
        if self.kind == GEGLU:
            return (2 * inter, hidden), (hidden, inter)
        return (inter, hidden), (inter, hidden), (hidden, inter)

    @staticmethod
    def matrix_shapes(hidden: int, inter: int) -> tuple[tuple[int, int], ...]:
        """The canonical matrices: gate, up ``[I, H]``, down ``[H, I]``."""
        return (inter, hidden), (inter, hidden), (hidden, inter)

    def bias_numel(self, hidden: int, inter: int) -> int:
        return 2 * inter + hidden if self.biased else 0

    def canonical(self, parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
        """(gate [I, H], up [I, H], down [H, I], (gate bias, up bias, down bias) or None),
        views of ``parts`` where the layout allows (copy them to keep them)."""
        if self.quant == FP8:
            gate, up, down = (fp8_dequantize(parts[j], parts[j + 1], self.block, torch.float32) for j in (0, 2, 4))
            return gate, up, down, None
        if self.quant == MXFP4:  # dequantized (rows of gate_up alternate gate, up)
            gu_b, gu_s, gu_bias, d_b, d_s, down_bias = parts
            gu, down = mxfp4_dequantize(gu_b, gu_s, gu_bias.dtype), mxfp4_dequantize(d_b, d_s, down_bias.dtype)
            return gu[0::2], gu[1::2], down, (gu_bias[0::2], gu_bias[1::2], down_bias)
        if self.kind == GPT_OSS:
            gu, gu_bias, down, down_bias = parts
            return gu[:, 0::2].t(), gu[:, 1::2].t(), down.t(), (gu_bias[0::2], gu_bias[1::2], down_bias)
        if self.kind == GEGLU:
            gu, down = parts
            gate, up = gu.chunk(2, dim=0)
            return gate, up, down, None
        gate, up, down = parts
        return gate, up, down, None

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The product fed to down, from the gate's and up's outputs (biases added)."""
        if self.kind == GPT_OSS:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        if self.kind == GEGLU:
            return F.gelu(gate, approximate=self.approximate) * up
        return F.silu(gate) * up

    def forward(self, x: torch.Tensor, parts) -> torch.Tensor:
        """x [n, H] -> [n, H] from the parts as stored, in torch (the order of operations of
        the family's transformers code, so float32 results agree with it)."""
        if self.quant == FP8:  # dequantized to the activations' dtype, as transformers does at load
            parts = tuple(fp8_dequantize(parts[j], parts[j + 1], self.block, x.dtype) for j in (0, 2, 4))
        if self.quant == MXFP4:  # dequantized to the activations' dtype, as transformers does at load
            gu_b, gu_s, gu_bias, d_b, d_s, down_bias = parts
            gu = mxfp4_dequantize(gu_b, gu_s, x.dtype).t()
            down = mxfp4_dequantize(d_b, d_s, x.dtype).t()
            parts = gu, gu_bias.to(x.dtype), down, down_bias.to(x.dtype)
        if self.kind == GPT_OSS:
            gu, gu_bias, down, down_bias = parts
            y = x @ gu + gu_bias
            return self.activate(y[..., 0::2], y[..., 1::2]) @ down + down_bias
        if self.kind == GEGLU:
            gu, down = parts
            return F.linear(self.activate(*F.linear(x, gu).chunk(2, dim=-1)), down)
        gate, up, down = parts
        return F.linear(self.activate(F.linear(x, gate), F.linear(x, up)), down)

    def forward_canonical(self, x: torch.Tensor, gate, up, down, biases=None) -> torch.Tensor:
        """The same expert from canonical matrices (the draft's dequantized weights)."""
        bg, bu, bd = biases if biases is not None else (None, None, None)
        return F.linear(self.activate(F.linear(x, gate, bg), F.linear(x, up, bu)), down, bd)


HF_EXPERTS = ExpertFormat(("gate_proj", "up_proj", "down_proj"), "model.layers.{layer}.mlp.experts.{expert}.")
MIXTRAL_EXPERTS = ExpertFormat(("w1", "w3", "w2"), "model.layers.{layer}.block_sparse_moe.experts.{expert}.")


def gemma4_experts(approximate: str) -> ExpertFormat:
    return ExpertFormat(("gate_up_proj", "down_proj"), "model.layers.{layer}.experts.", GEGLU, approximate=approximate)


def gpt_oss_experts(alpha: float, limit: float, quant: str | None = None) -> ExpertFormat:
    names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    if quant == MXFP4:
        names = (
            "gate_up_proj_blocks",
            "gate_up_proj_scales",
            "gate_up_proj_bias",
            "down_proj_blocks",
            "down_proj_scales",
            "down_proj_bias",
        )
    return ExpertFormat(names, "model.layers.{layer}.mlp.experts.", GPT_OSS, alpha, limit, quant=quant)


_FP4_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def fp4_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The e2m1 values as a tensor on ``device``, made once: built from a Python list each
    call it was a blocking copy to a GPU (a host sync) for every expert dequantized."""
    key = (dtype, device)
    if key not in _FP4_TABLES:
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            _FP4_TABLES[key] = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
    return _FP4_TABLES[key]


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 ``blocks [out, G, 16]`` (two e2m1 codes a byte, the low nibble first) and
    ``scales [out, G]`` (e8m0: a power of two, biased by 127) -> ``[out, 32 G]`` of
    ``dtype``: each code's value times its block's scale, exactly (both are powers of two
    times a 2-bit mantissa)."""
    lut = fp4_table(dtype, blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).int()  # [out, G, 32]: int32 indices
    values = torch.ldexp(lut[codes], (scales.to(torch.int32) - 127)[..., None])
    return values.flatten(-2)


def fp8_experts(fmt: ExpertFormat, block) -> ExpertFormat:
    """``fmt``'s experts stored in block FP8 (``quantization_config`` ``fp8``, ``weight_block_size``)."""
    from dataclasses import replace

    return replace(fmt, quant=FP8, block=(int(block[0]), int(block[1])))


def fp8_tiles(shape: tuple[int, int], block: tuple[int, int]) -> bool:
    """Whether blocks of ``block`` tile a matrix of ``shape`` exactly (every FP8 release:
    128 x 128 blocks over sizes that are multiples of 128)."""
    return shape[0] % block[0] == 0 and shape[1] % block[1] == 0


def fp8_dequantize(
    w: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    tiles: bool | None = None,
) -> torch.Tensor:
    """Block FP8 ``w [..., rows, cols]`` (e4m3) times its ``scale_inv [..., ceil(rows/bm),
    ceil(cols/bn)]`` (float32), block by block, in float32 (as transformers dequantizes),
    -> ``dtype``, written into ``out`` (``[..., rows, cols]``) when given: each product is
    rounded to ``dtype`` once either way. Leading dimensions are a batch of experts.

    Where the blocks tile the matrix (``fp8_tiles``; ``tiles`` forces the answer) the
    scales are broadcast over their blocks: two ops, and no float32 copy of the scales the
    size of the weights; otherwise they are expanded to the weights' shape first."""
    bm, bn = block
    *lead, rows, cols = w.shape
    if tiles is None:
        tiles = fp8_tiles((rows, cols), block)
    s = scale_inv if scale_inv.dtype == torch.float32 else scale_inv.float()
    if tiles:
        grid = (*lead, rows // bm, bm, cols // bn, bn)
        wf, s = w.float().view(grid), s[..., :, None, :, None]
    else:
        wf = w.float()
        s = s.repeat_interleave(bm, dim=-2)[..., :rows, :].repeat_interleave(bn, dim=-1)[..., :cols]
    if out is None:
        return (wf * s).view(*lead, rows, cols).to(dtype)
    torch.mul(wf, s, out=out.view(wf.shape))
    return out


def aligned(sizes: list[int], dtypes, order) -> bool:
    """Whether parts of ``sizes`` bytes packed end to end in ``order`` each start at a
    multiple of their element size, and the whole at one of the largest (slots of such
    buffers sit side by side): what viewing a compact expert's parts needs."""
    pos = 0
    for p in order:
        if pos % dtypes[p].itemsize:
            return False
        pos += sizes[p]
    return pos % max(d.itemsize for d in dtypes) == 0


def views_at(flat: torch.Tensor, starts, shapes, dtypes=None) -> tuple[torch.Tensor, ...]:
    """Part ``p`` of a packed expert buffer, a view of ``shapes[p]`` from element ``starts[p]``;
    with ``dtypes`` (a compact format's parts of several dtypes) ``flat`` holds bytes, the
    starts count bytes and each view is of its own dtype."""
    raw = flat.view(torch.uint8) if dtypes is not None else flat
    out = []
    for p, shape in enumerate(shapes):
        if dtypes is None:
            out.append(flat[starts[p] : starts[p] + math.prod(shape)].view(shape))
        else:
            n = math.prod(shape) * dtypes[p].itemsize
            out.append(raw[starts[p] : starts[p] + n].view(dtypes[p]).view(shape))
    return tuple(out)
