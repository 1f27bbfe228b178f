#!/usr/bin/env python3
"""Benchmark: Multi-head Latent Attention on the cpu backend, and the memory its cache holds.

Builds a GLM-4.7-Flash-shaped checkpoint with random bf16 weights (the real attention
sizes: hidden 2048, 20 heads, q LoRA 768, kv LoRA 512, rotary 64, no-position key 192,
value 256; 4 layers, 8 small experts top-4, the first layer dense) and, on the cpu
backend, times at each ``--contexts`` length: a decoding step (one token over the cache,
p50 of 32), a 5-token verification block (p50 of 8) and a prefill of that many tokens in
one pass (best of 3), and reports the KV cache's bytes as held. The last line is JSON.
Needs the dev extra (transformers).

    python scripts/bench_mla.py [--contexts 256,2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def build(out: Path) -> None:
    from tiny_models import byte_tokenizer_json
    from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    cfg = Glm4MoeLiteConfig(
        vocab_size=2048, hidden_size=2048, intermediate_size=1024, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=20, num_key_value_heads=20, q_lora_rank=768, kv_lora_rank=512,
        qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, n_routed_experts=8, num_experts_per_tok=4,
        n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=8192,
    )  # fmt: skip
    torch.manual_seed(0)
    Glm4MoeLiteForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))


def measure(model, ctx: int) -> dict:
    ids = torch.randint(3, 2000, (ctx + 8,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model.new_cache()
        for s in range(0, ctx, 64):
            model(ids[s : min(s + 64, ctx)], cache)
        steps = []
        for _ in range(32):
            cache.truncate(ctx)
            t = time.perf_counter()
            model(ids[ctx : ctx + 1], cache, last_only=True)
            steps.append(time.perf_counter() - t)
        blocks = []
        for _ in range(8):
            cache.truncate(ctx)
            t = time.perf_counter()
            model(ids[ctx : ctx + 5], cache)
            blocks.append(time.perf_counter() - t)
        kv = sum(t.numel() * t.element_size() for t in cache.k + cache.v if t is not None)
        prefill = []
        for _ in range(3):
            fresh = model.new_cache()
            t = time.perf_counter()
            model(ids[:ctx], fresh, last_only=True)
            prefill.append(time.perf_counter() - t)
    return {
        "context": ctx,
        "decode_ms": round(statistics.median(steps) * 1e3, 2),
        "verify5_ms": round(statistics.median(blocks) * 1e3, 2),
        "prefill_s": round(min(prefill), 3),
        "kv_mib": round(kv / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="256,2048")
    args = ap.parse_args()
    from moespeq_cli.runtime.engine import Engine, EngineOptions

    with tempfile.TemporaryDirectory() as d:
        build(Path(d))
        eng = Engine(Path(d), EngineOptions(backend="cpu"))
        eng.load(8192)
        rows = [measure(eng.model, int(c)) for c in args.contexts.split(",")]
    for r in rows:
        print(
            f"context {r['context']:>5}: decode {r['decode_ms']:.2f} ms, 5-token verification {r['verify5_ms']:.2f} ms, "
            f"prefill {r['prefill_s']:.3f} s, KV cache held {r['kv_mib']} MiB"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
