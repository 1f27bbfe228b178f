#!/usr/bin/env python3
"""Benchmark: moespeq's CPU engine against transformers ``generate`` on the same checkpoint.

Builds a Mixtral-shaped model of about 86M parameters (hidden 512, 4 layers, 8 experts,
top-2, vocab 32000) with random weights in the Hugging Face layout, then times greedy
decoding of 64 new tokens from a 32-token prompt in bf16 and fp32, best of ``--repeats``.
Prints a table and ends with one JSON line. Needs the dev extra (transformers).

    python scripts/bench_cpu.py [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def build(out: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = MixtralForCausalLM(cfg)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    model.save_pretrained(out, safe_serialization=True)


def time_ours(path: Path, dtype: torch.dtype, prompt: list[int], n: int, repeats: int) -> tuple[float, list[int]]:
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.models.loader import load_model
    from moespeq_cli.runtime.executors.experts import InMemoryExperts
    from moespeq_cli.runtime.generate import generate
    from moespeq_cli.runtime.sampling import SamplingParams

    ck = Checkpoint(path)
    model = load_model(ck, dtype)
    model.set_experts(InMemoryExperts(ck, dtype))
    best, tokens = float("inf"), []
    for _ in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        tokens = [ev.token for ev in generate(model, prompt, n, SamplingParams())]
        best = min(best, time.perf_counter() - t0)
    return n / best, tokens


def time_hf(path: Path, dtype: torch.dtype, prompt: list[int], n: int, repeats: int) -> tuple[float, list[int]]:
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor([prompt])
    best, tokens = float("inf"), []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                attention_mask=torch.ones_like(ids),
            )
        best = min(best, time.perf_counter() - t0)
        tokens = out[0, len(prompt) :].tolist()
    return n / best, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    prompt = torch.randint(3, 32000, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = Path(d)
        build(path)
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            ours, t_ours = time_ours(path, dtype, prompt, args.new_tokens, args.repeats)
            hf, t_hf = time_hf(path, dtype, prompt, args.new_tokens, args.repeats)
            rows.append(
                {
                    "dtype": name,
                    "moespeq_tok_s": round(ours, 1),
                    "transformers_tok_s": round(hf, 1),
                    "ratio": round(ours / hf, 2),
                    "same_tokens": t_ours == t_hf,
                }
            )
    print(f"{'dtype':6} {'moespeq tok/s':>14} {'transformers tok/s':>19} {'ratio':>6} same tokens")
    for r in rows:
        print(
            f"{r['dtype']:6} {r['moespeq_tok_s']:>14} {r['transformers_tok_s']:>19} {r['ratio']:>6} {r['same_tokens']}"
        )
    print(
        json.dumps(
            {
                "benchmark": "cpu_vs_transformers",
                "threads": torch.get_num_threads(),
                "new_tokens": args.new_tokens,
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
