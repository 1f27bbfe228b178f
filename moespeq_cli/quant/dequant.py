"""Many 4-bit experts dequantized at once, as one op: ``moespeq::dequantize_4bit``.

A draft layer computed in one grouped call (runtime/executors/draft.py) gathers the
routed experts' 4-bit codes and block scales from the layer's blocks and dequantizes
them together into one ``[n, numel]`` block of the activations' dtype, which the grouped
GEMM then reads. On CUDA that is bitsandbytes' dequantize kernel, one launch for every
expert gathered; elsewhere the same values from the CPU kernels (cpu_matvec.c
``ms_dequant_4bit``: fp32 or bf16 at the memory's speed) or, without them, torch ops (the
mock backend, the CPU).

It is registered as one operator so that it dispatches as one, on every device: the
mock counts the ops the code dispatches and charges each as a GPU launch, and the GPU
launches one kernel here, not the half dozen torch ops the CPU's version is made of.

The layout is bitsandbytes' ``quantize_4bit`` (NF4 or FP4), flattened: two weights a
byte, the first in the high nibble, each block of ``blocksize`` weights scaled by its
float32 absmax, not double-quantized. Experts laid end to end dequantize as one tensor
where each matrix is a whole number of blocks (a single matrix may end in a partial one).
"""

from __future__ import annotations

import torch

from moespeq_cli import kernels

_LIB = torch.library.Library("moespeq", "DEF")
_LIB.define(
    "dequantize_4bit(Tensor codes, Tensor absmax, Tensor table, int blocksize, str method, ScalarType dtype) -> Tensor"
)


def _values(codes, absmax, table, blocksize, method, dtype):
    if kernels.takes_dequantize_4bit(codes, absmax, table, blocksize, dtype):
        return kernels.dequantize_4bit(codes, absmax, table, blocksize, dtype)
    return _torch_values(codes, absmax, table, blocksize, dtype)


def _torch_values(codes, absmax, table, blocksize, dtype):
    """The same values with torch ops, where the CPU kernels are off or take no ``dtype``
    (an f32 gather a weight and two passes over it: ~25x the C kernel's time)."""
    n, m = codes.shape
    pairs = torch.stack((table.repeat_interleave(16), table.repeat(16)), -1)  # a byte -> its two weights' values
    w = pairs[codes.int()].view(n, 2 * m)
    if 2 * m % blocksize == 0:
        w.view(n, -1, blocksize).mul_(absmax.view(n, -1, 1))
    else:  # one row (``dequantize_4bit`` checks): its last block partial
        w.mul_(absmax.repeat_interleave(blocksize, dim=1)[:, : 2 * m])
    return w.to(dtype)


_KERNEL = None  # bitsandbytes' op, looked up once (the lookup is host time on every layer)


def _cuda(codes, absmax, table, blocksize, method, dtype):
    global _KERNEL
    if _KERNEL is None:
        from moespeq_cli.quant.draft import _bnb

        _bnb()  # registers bitsandbytes' ops
        _KERNEL = torch.ops.bitsandbytes.dequantize_4bit.default
    n, m = codes.shape
    # bitsandbytes' kernel has each method's table built in (``table`` is the same values)
    return _KERNEL(codes, absmax, blocksize, method, [n, 2 * m], dtype)


def _meta(codes, absmax, table, blocksize, method, dtype):
    return codes.new_empty((codes.shape[0], 2 * codes.shape[1]), dtype=dtype)


_LIB.impl("dequantize_4bit", _values, "CPU")
_LIB.impl("dequantize_4bit", _cuda, "CUDA")
_LIB.impl("dequantize_4bit", _meta, "Meta")


def dequantize_4bit(
    codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int, method: str, dtype: torch.dtype
) -> torch.Tensor:
    """``codes`` uint8 ``[n, m]`` (each row an expert's matrices end to end, as stored),
    ``absmax`` float32 ``[n, ceil(2 m / blocksize)]``, ``table`` the 16 values of ``method``'s
    codes -> ``[n, 2 m]`` of ``dtype``: each weight ``table[code] * absmax``, rounded once.
    Several rows must be whole blocks (the GPU's kernel reads them as one flat tensor); one
    row may end in a partial block."""
    n, m = codes.shape
    if n > 1 and 2 * m % blocksize:
        raise ValueError(f"rows of {2 * m} weights are not whole blocks of {blocksize}: dequantize them one at a time")
    return torch.ops.moespeq.dequantize_4bit(codes, absmax, table, blocksize, method, dtype)
