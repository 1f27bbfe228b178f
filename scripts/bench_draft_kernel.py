"""Which 4-bit kernel can run the self-draft's experts on this CPU faster than the bf16
target's own expert? (a benchmark, not a test; docs/design.md §9, issue: a draft that pays
on the CPU).

For one projection of ``--hidden`` x ``--inter`` and every batch size verification uses
(1 .. k_max + 1 tokens), it times:

- ``bf16``: the target's expert, ``F.linear`` on bf16 weights;
- ``bnb-linear4bit``: ``bitsandbytes.nn.Linear4bit`` in eval mode under no_grad (NF4). On
  a CPU with AVX-512 BF16 it repacks once and runs bitsandbytes' fast kernel; elsewhere it
  falls back to dequantize-then-matmul (the table says which);
- ``bnb-dequant``: ``dequantize_4bit`` then ``F.linear`` (the reference path);
- ``torch-int4pack``: torch's ``_weight_int4pack_mm_for_cpu`` (asymmetric int4, group 64).

Each 4-bit path's output is compared with dequantize-then-matmul of its own weights.
Prints a table and ends with one JSON line.

    python scripts/bench_draft_kernel.py
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
import torch.nn.functional as F


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def int4pack(w: torch.Tensor, group: int):
    """torch's CPU int4 layout: per-group scale and zero, w ~ (q - 8) * scale + zero."""
    rows, cols = w.shape
    wg = w.float().reshape(rows, cols // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-8) / 15
    zero = lo + 8 * scale
    q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(rows, cols)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    deq = ((q.reshape(rows, cols // group, group).float() - 8) * scale + zero).reshape(rows, cols)
    return packed, sz, deq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=3584)
    ap.add_argument("--max-tokens", type=int, default=9, help="k_max + 1")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    torch.manual_seed(0)
    H, I = args.hidden, args.inter  # noqa: E741 - the hidden and intermediate sizes
    w = (torch.randn(I, H) * 0.02).to(torch.bfloat16)
    packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    lin = bnb.nn.Linear4bit(H, I, bias=False, quant_type="nf4", compute_dtype=torch.bfloat16)
    lin.weight = bnb.nn.Params4bit(
        data=packed.clone(), requires_grad=False, quant_state=state, quant_type="nf4", blocksize=64, bnb_quantized=True
    )
    lin.eval()
    nf4_ref = bf.dequantize_4bit(packed, state).to(torch.bfloat16)
    i4, i4_sz, i4_ref = int4pack(w, 64)
    fast_bnb = bool(lin.support_avx512bf16_for_cpu)
    rows = []
    with torch.no_grad():
        for T in range(1, args.max_tokens + 1):
            x = torch.randn(T, H).to(torch.bfloat16)
            row = {"tokens": T}
            row["bf16_ms"] = timed(lambda x=x: F.linear(x, w), args.reps) * 1e3
            row["bnb_linear4bit_ms"] = timed(lambda x=x: lin(x), args.reps) * 1e3
            row["bnb_dequant_ms"] = (
                timed(lambda x=x: F.linear(x, bf.dequantize_4bit(packed, state).to(x.dtype)), args.reps) * 1e3
            )
            row["torch_int4pack_ms"] = (
                timed(lambda x=x: torch._weight_int4pack_mm_for_cpu(x, i4, 64, i4_sz), args.reps) * 1e3
            )
            ref = F.linear(x.float(), nf4_ref.float())
            row["bnb_linear4bit_err"] = float((lin(x).float() - ref).norm() / ref.norm())
            ref4 = F.linear(x.float(), i4_ref)
            row["torch_int4pack_err"] = float(
                (torch._weight_int4pack_mm_for_cpu(x, i4, 64, i4_sz).float() - ref4).norm() / ref4.norm()
            )
            rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    print(
        f"{H} x {I} projection; bitsandbytes' AVX-512 BF16 kernel {'available' if fast_bnb else 'NOT available (falls back to dequantize)'}; "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"{'tokens':>6} {'bf16 ms':>8} {'bnb L4bit':>10} {'bnb deq':>8} {'int4pack':>9} {'int4/bf16':>9}")
    for r in rows:
        print(
            f"{r['tokens']:>6} {r['bf16_ms']:>8.3f} {r['bnb_linear4bit_ms']:>10.3f} {r['bnb_dequant_ms']:>8.3f} "
            f"{r['torch_int4pack_ms']:>9.3f} {r['torch_int4pack_ms'] / r['bf16_ms']:>9.2f}"
        )
    print(
        json.dumps(
            {
                "hidden": H,
                "inter": I,
                "bnb_fast_kernel": fast_bnb,
                "cpu": torch.backends.cpu.get_cpu_capability(),
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
