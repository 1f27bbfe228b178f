#!/usr/bin/env python3
"""Benchmark: the CPU kernels' attention over a KV cache (``kernels.attention``, ms_attend).

One layer's attention, float32 cache, at real models' head counts and widths: MLA's one
latent head read by every query head (GLM-4.7-Flash: 20 heads; DeepSeek-V3: 128; keys
576 wide, values the first 512 of them) and grouped-query attention (Mixtral 32 heads
over 8 kv heads, Qwen3-30B-A3B 32 over 4; 128 wide), for a decoding step and a 5-token
verification block. p50 of ``--reps`` calls each; a checksum of the output so that two
builds' results can be compared. The last line is JSON.

    python scripts/bench_attention.py [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

CASES = [  # name, heads, kv heads, key width, value width, positions, queries
    ("mla-glm-4.7-flash-decode", 20, 1, 576, 512, 2048, 1),
    ("mla-glm-4.7-flash-verify5", 20, 1, 576, 512, 2048, 5),
    ("mla-deepseek-v3-decode", 128, 1, 576, 512, 2048, 1),
    ("gqa-mixtral-decode", 32, 8, 128, 128, 4096, 1),
    ("gqa-mixtral-verify5", 32, 8, 128, 128, 4096, 5),
    ("gqa-qwen3-decode", 32, 4, 128, 128, 4096, 1),
]


def main() -> None:
    from moespeq_cli import kernels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit(f"the CPU kernels are not available: {kernels.why_unavailable()}")
    results = {}
    for name, H, Hkv, d, dv, L, T in CASES:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(H, T, d, generator=g)
        k = torch.randn(Hkv, L, d, generator=g)
        v = k[..., :dv] if Hkv == 1 else torch.randn(Hkv, L, dv, generator=g)  # MLA: a view of the keys
        out = kernels.attention(q, k, v, L - T, d**-0.5)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            kernels.attention(q, k, v, L - T, d**-0.5)
            times.append(time.perf_counter() - t0)
        ms = sorted(times)[len(times) // 2] * 1e3
        results[name] = {"ms": round(ms, 3), "checksum": round(float(out.double().sum()), 6)}
        print(f"{name:28s} {ms:8.3f} ms  checksum {results[name]['checksum']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
