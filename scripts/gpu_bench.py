#!/usr/bin/env python3
"""GPU benchmark for scripts/gpu_check.sh: pinned vs pageable host-to-device bandwidth,
copy/compute overlap on two streams, and each policy's tokens/s on a generated
Mixtral-shaped checkpoint (random weights, real layout) on the cuda backend.
Prints a table and ends with one JSON line (also written to --out)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def bandwidth(pinned: bool, nbytes: int = 256 * 2**20, reps: int = 10) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=pinned)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=pinned)
    torch.cuda.synchronize()
    return nbytes * reps / (time.perf_counter() - t0)


def overlap(nbytes: int = 512 * 2**20) -> dict:
    """Time a copy alone, a matmul loop alone, and both on separate streams."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    copy_stream = torch.cuda.Stream()

    def copy():
        with torch.cuda.stream(copy_stream):
            dst.copy_(src, non_blocking=True)

    def compute():
        for _ in range(40):
            a @ a

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(copy), timed(compute)
    t_copy, t_compute = timed(copy), timed(compute)
    t_both = timed(lambda: (copy(), compute()))
    hidden = (t_copy + t_compute - t_both) / min(t_copy, t_compute)
    return {"copy_s": t_copy, "compute_s": t_compute, "both_s": t_both, "overlap_fraction": max(0.0, min(1.0, hidden))}


def policies(path: Path, new_tokens: int) -> list[dict]:
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.runtime.planning.planner import checkpoint_plan
    from moespeq_cli.runtime.sampling import SamplingParams

    ck = Checkpoint(path)
    prompt = list(range(10, 42))
    context = len(prompt) + new_tokens
    plan = checkpoint_plan(ck, context)
    half = plan.fixed_bytes + plan.total_experts // 2 * plan.expert_bytes
    full = plan.fixed_bytes + plan.total_experts * plan.expert_bytes
    rows = []
    for policy in ("resident", "ondemand", "lru", "gate-prefetch", "hybrid"):
        vram = full if policy == "resident" else half
        eng = Engine(path, EngineOptions(backend="cuda", policy=policy, vram=vram, hardware="h100-pcie"))
        eng.load(context)
        for _ in range(2):  # warm-up, then measure
            tokens = [ev.token for ev in eng.generate(prompt, new_tokens, SamplingParams())]
        s = eng.last_stats
        rows.append(
            {
                "policy": policy,
                "tokens_per_s": s.tokens_per_s,
                "expert_hit_rate": s.expert_hit_rate,
                "io_stall_s": s.io_stall_s,
                "bytes_h2d": s.bytes_h2d,
                "tokens": tokens[:8],
            }
        )
        del eng
        torch.cuda.empty_cache()
    return rows


def make_checkpoint(out: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_models

    (out / "tokenizer.json").write_text(json.dumps(tiny_models.byte_tokenizer_json()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = {
        "device": torch.cuda.get_device_name(0),
        "pinned_GBps": bandwidth(True) / 1e9,
        "pageable_GBps": bandwidth(False) / 1e9,
        "overlap": overlap(),
    }
    with tempfile.TemporaryDirectory() as d:
        make_checkpoint(Path(d))
        result["policies"] = policies(Path(d), args.new_tokens)
    print(
        f"H2D pinned {result['pinned_GBps']:.1f} GB/s, pageable {result['pageable_GBps']:.1f} GB/s; "
        f"copy/compute overlap {result['overlap']['overlap_fraction']:.0%}"
    )
    print(f"{'policy':14} {'tok/s':>8} {'hit':>6} {'stall s':>8} {'MB H2D':>8}")
    for r in result["policies"]:
        hit = f"{r['expert_hit_rate']:.2f}" if r["expert_hit_rate"] is not None else "-"
        print(f"{r['policy']:14} {r['tokens_per_s']:8.1f} {hit:>6} {r['io_stall_s']:8.3f} {r['bytes_h2d'] / 1e6:8.1f}")
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
