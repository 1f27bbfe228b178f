"""bitsandbytes' packed CPU layout for 4-bit weights, made in one pass over the bytes.

bitsandbytes' AVX-512 BF16 kernel (``gemv_4bit`` on CPU, what ``Linear4bit`` runs in eval
mode) reads a 4-bit matrix in its own layout: out features in blocks of 32, and for each
block and each pair of in features (k, k+1) one row of 32 bytes whose byte 2m+p holds the
weight (out m+16, in k+p) in its high nibble and (out m, in k+p) in its low one; the
per-block scales become bf16, transposed to [K / blocksize, N]. Its own converter
(``functional._convert_weight_packed_for_cpu``) gets there through an int32 copy of every
nibble and a transpose of them: about 20 bytes of memory traffic per weight, 7-18 ms per
Mixtral-at-quarter-width projection on this 2-core VM, 4 s for the 791M checkpoint's
draft at every load. The draft runs moespeq's own 4-bit kernel where the CPU kernels
build (it reads the standard layout: nothing to repack); this packing serves the
machines without them, and ``calibrate``'s timing of bitsandbytes' kernel.

The standard layout stores weight (n, 2j) in the high nibble of byte (n, j) and (n, 2j+1)
in its low nibble, so each output byte is two nibbles of two input bytes 16 rows apart:
with A = byte(n + 16, j) and B = byte(n, j),

    byte 2m     = (A & 0xF0) | (B >> 4)       weights (n+16, 2j) and (n, 2j)
    byte 2m + 1 = (A << 4)   | (B & 0x0F)     weights (n+16, 2j+1) and (n, 2j+1)

four byte-wide operations written straight into the packed order (1 ms where bitsandbytes'
takes 7-10), with the same result bit for bit
(tests/test_quant.py compares it with bitsandbytes' on every field it changes). A state
with nested (double-quantized) statistics goes through bitsandbytes' own converter.
"""

from __future__ import annotations

import torch

BLOCK_N = 32  # out features per block of the packed layout (bitsandbytes' default)


def pack_for_cpu(qweight: torch.Tensor, state, F):
    """(packed weight [N, K/2] uint8, ``state`` changed for the packed kernel), as
    ``F._convert_weight_packed_for_cpu(qweight, state)`` returns them (``F``:
    bitsandbytes.functional)."""
    n, k = state.shape
    if state.nested or n % BLOCK_N or k % 2 or qweight.numel() * qweight.element_size() * 2 != n * k:
        return F._convert_weight_packed_for_cpu(qweight, state)
    if qweight.dtype != torch.uint8:
        state.original_storage_type = qweight.dtype
        qweight = qweight.view(torch.uint8)
    state.original_dtype = state.dtype
    state.original_nested = state.nested
    state.original_qshape = qweight.shape
    rows = qweight.reshape(n // BLOCK_N, 2, BLOCK_N // 2, k // 2)  # [block, half, m, j]
    a, b = rows[:, 1], rows[:, 0]  # out features n + 16 and n
    packed = torch.empty(
        n // BLOCK_N, k // 2, BLOCK_N // 2, 2, dtype=torch.uint8, device=qweight.device
    )  # [block, j, m, p]
    into = packed.permute(0, 2, 1, 3)  # written in the input's order [block, m, j, p]: no copy of a copy
    torch.bitwise_or(a & 0xF0, b >> 4, out=into[..., 0])
    torch.bitwise_or(a << 4, b & 0x0F, out=into[..., 1])
    packed = packed.reshape(n, k // 2)
    state.absmax = state.absmax.reshape(n, k // state.blocksize).T.to(torch.bfloat16).contiguous()
    state.dtype = torch.bfloat16
    state.packing_format_for_cpu = True
    return packed, state
