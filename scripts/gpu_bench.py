#!/usr/bin/env python3
"""GPU benchmark for scripts/gpu_check.sh: pinned vs pageable host-to-device bandwidth,
copy/compute overlap on two streams, the draft's 4-bit kernel (``bnb.matmul_4bit``, the
cuda path of quant/draft.py) against dequantize-then-matmul and the bf16 target's own
product at Mixtral's expert shape, and each policy's tokens/s on generated checkpoints of
real layer widths (random weights, Hugging Face layout): two Mixtral-8x7B layers and two
Qwen3-30B-A3B layers. Prints tables and ends with one JSON line (also written to --out,
rewritten after each stage so that a run cut short still reports what it measured)."""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
import traceback
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


def draft_kernel(hidden: int = 4096, inter: int = 14336, reps: int = 50) -> list[dict]:
    """One expert projection (``inter`` x ``hidden``) at the batch sizes verification uses:
    bf16 ``F.linear`` (the target), ``bnb.matmul_4bit`` on NF4 with the state on the device
    (the draft), and ``dequantize_4bit`` then ``F.linear`` (the reference): microseconds a
    call by CUDA events, and the 4-bit kernel's error against the reference."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF
    import torch.nn.functional as F

    w = torch.randn(inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    deq = BF.dequantize_4bit(packed, state)

    def us(fn) -> float:
        for _ in range(5):
            fn()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) * 1e3 / reps

    rows = []
    for t in (1, 2, 3, 5, 9):
        x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, deq)
        got = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        rows.append(
            {
                "tokens": t,
                "bf16_us": us(lambda x=x: F.linear(x, w)),
                "nf4_matmul_4bit_us": us(lambda x=x: bnb.matmul_4bit(x, packed.t(), quant_state=state)),
                "nf4_dequant_matmul_us": us(lambda x=x: F.linear(x, BF.dequantize_4bit(packed, state))),
                "nf4_rel_err": ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item(),
            }
        )
    return rows


def policies(path: Path, new_tokens: int, profile: str | None) -> list[dict]:
    """Each policy on the cuda backend (tok/s, hit rate, stall, bytes, the allocator's
    peak reservation against the plan), moespeq also after a forced draft release, and
    the mock's prediction for the same run with ``profile`` (this GPU's calibration)."""
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.runtime.backends import library_bytes
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.runtime.planning.planner import checkpoint_plan
    from moespeq_cli.runtime.sampling import SamplingParams

    ck = Checkpoint(path)
    prompt = list(range(10, 42))
    context = len(prompt) + new_tokens
    plan = checkpoint_plan(ck, context, library_bytes=library_bytes("cuda", None))  # cuBLAS's workspaces included
    half = plan.fixed_bytes + plan.total_experts // 2 * plan.expert_bytes
    full = plan.fixed_bytes + plan.total_experts * plan.expert_bytes
    rows = []
    for policy in ("resident", "ondemand", "lru", "gate-prefetch", "hybrid", "moespeq"):
        vram = full if policy == "resident" else half
        row: dict = {"policy": policy}
        t0 = time.perf_counter()
        try:
            gc.collect()  # the previous policy's engine gone before the baseline (else its blocks count in it)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_reserved()
            base_alloc = torch.cuda.memory_allocated()
            hw = profile or "h100-pcie"
            eng = Engine(path, EngineOptions(backend="cuda", policy=policy, vram=vram, hardware=hw))
            eng.load(context)
            for _ in range(2):  # warm-up, then measure
                tokens = [ev.token for ev in eng.generate(prompt, new_tokens, SamplingParams())]
            s = eng.last_stats
            row |= {
                "tokens_per_s": s.tokens_per_s,
                "expert_hit_rate": s.expert_hit_rate,
                "io_stall_s": s.io_stall_s,
                "bytes_h2d": s.bytes_h2d,
                "plan_bytes": eng.plan.budget_bytes,
                "plan_used_bytes": eng.plan.budget_bytes - eng.plan.free_bytes,
                "blas_workspace_bytes": library_bytes("cuda", None),
                "max_reserved_bytes": torch.cuda.max_memory_reserved() - base,
                # what tensors held at the peak (reserved less the allocator's cached slack);
                # both against a baseline that holds what earlier rows left (cuBLAS's workspaces)
                "max_allocated_bytes": torch.cuda.max_memory_allocated() - base_alloc,
                "tokens": tokens[:8],
            }
            if policy == "moespeq" and eng.spec is not None and not eng.spec.released:
                eng.release_draft()  # forced: the freed draft must become slots, not extra memory
                after = [ev.token for ev in eng.generate(prompt, new_tokens, SamplingParams())]
                row |= {
                    "after_release_tokens_per_s": eng.last_stats.tokens_per_s,
                    "after_release_max_reserved_bytes": torch.cuda.max_memory_reserved() - base,
                    "after_release_same_tokens": after[:8] == tokens[:8],
                }
            eng.close()
            del eng
            mock = Engine(path, EngineOptions(backend="mock", policy=policy, vram=vram, hardware=hw))
            mock.load(context)
            for _ in mock.generate(prompt, new_tokens, SamplingParams()):
                pass
            row["mock_tokens_per_s"] = mock.last_stats.tokens_per_s
            mock.close()
            del mock
        except Exception as e:  # one policy's failure is a row, not the end of the check
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        row["wall_s"] = time.perf_counter() - t0
        print(f"  {policy}: {json.dumps(row)[:400]}", flush=True)
        rows.append(row)
    return rows


def profiler_overlap(path: Path, trace_out: Path | None, new_tokens: int = 8) -> dict:
    """A torch.profiler trace of a few gate-prefetch tokens at half the experts: the GPU
    time in host-to-device copies, in kernels, and in both at once (copies hidden behind
    compute), from the trace's own device events, not from moespeq's timeline."""
    from torch.profiler import ProfilerActivity, profile

    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.runtime.backends import library_bytes
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.runtime.planning.planner import checkpoint_plan
    from moespeq_cli.runtime.sampling import SamplingParams

    prompt = list(range(10, 42))
    plan = checkpoint_plan(Checkpoint(path), len(prompt) + new_tokens, library_bytes=library_bytes("cuda", None))
    vram = plan.fixed_bytes + plan.total_experts // 2 * plan.expert_bytes
    eng = Engine(path, EngineOptions(backend="cuda", policy="gate-prefetch", vram=vram, hardware="h100-pcie"))
    eng.load(len(prompt) + new_tokens)
    list(eng.generate(prompt, new_tokens, SamplingParams()))  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        list(eng.generate(prompt, new_tokens, SamplingParams()))
    eng.close()
    if trace_out is not None:
        prof.export_chrome_trace(str(trace_out))
    copies, kernels = [], []
    for ev in prof.events():
        if ev.device_type.name != "CUDA" or ev.time_range.elapsed_us() <= 0:
            continue
        span = (ev.time_range.start, ev.time_range.end)
        (copies if "Memcpy HtoD" in ev.name or "memcpy" in ev.name.lower() else kernels).append(span)

    def busy(spans):
        total, end = 0.0, float("-inf")
        for a, b in sorted(spans):
            if b > end:
                total += b - max(a, end)
                end = b
        return total

    both = busy(copies) + busy(kernels) - busy(copies + kernels)
    return {
        "copy_us": busy(copies),
        "kernel_us": busy(kernels),
        "overlap_us": both,
        "copies_hidden": both / busy(copies) if copies else None,
    }


SHAPES = {
    # two layers of Mixtral-8x7B at their real width (8 experts of 4096 x 14336, top-2)
    "mixtral-8x7b-2l": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    # two layers of Qwen3-30B-A3B (128 experts of 2048 x 768, top-8)
    "qwen3-30b-a3b-2l": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
        ),
    ),
}


def make_checkpoint(out: Path, shape: str) -> None:
    """Random bf16 weights of ``shape`` (vocabulary cut to 32k: the layers are what matter),
    built on the GPU (fast) and saved in the Hugging Face layout."""
    import transformers

    config_cls, model_cls, dims = SHAPES[shape]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(
        vocab_size=32000, num_hidden_layers=2, max_position_embeddings=2048, tie_word_embeddings=False, **dims
    )
    with torch.device("cuda"):
        model = getattr(transformers, model_cls)(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_models

    (out / "tokenizer.json").write_text(json.dumps(tiny_models.byte_tokenizer_json()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--profile", default=None, help="this GPU's calibrated profile (gpu_check.sh writes one)")
    args = ap.parse_args()
    result: dict = {"device": torch.cuda.get_device_name(0)}

    def stage(name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - one stage's failure is a finding, not the end of the check
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[{name}: {time.perf_counter() - t0:.1f} s] {json.dumps(result[name])[:600]}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(result) + "\n")

    stage("pinned_GBps", lambda: bandwidth(True) / 1e9)
    stage("pageable_GBps", lambda: bandwidth(False) / 1e9)
    stage("overlap", overlap)
    stage("draft_kernel", draft_kernel)
    for i, shape in enumerate(s for s in args.shapes.split(",") if s):
        with tempfile.TemporaryDirectory() as d:
            stage(f"make {shape}", lambda d=d, shape=shape: make_checkpoint(Path(d), shape))
            stage(f"policies {shape}", lambda d=d: policies(Path(d), args.new_tokens, args.profile))
            if i == 0:
                trace = args.out.with_name("profiler_trace.json") if args.out else None
                stage("profiler", lambda d=d, trace=trace: profiler_overlap(Path(d), trace))
    if isinstance(result.get("pinned_GBps"), float) and isinstance(result.get("pageable_GBps"), float):
        print(f"H2D pinned {result['pinned_GBps']:.1f} GB/s, pageable {result['pageable_GBps']:.1f} GB/s")
    if "overlap_fraction" in result.get("overlap", {}):
        print(f"copy/compute overlap on two streams {result['overlap']['overlap_fraction']:.0%}")
    if isinstance(result.get("draft_kernel"), list):
        print("| tokens | bf16 us | matmul_4bit us | dequant+matmul us | nf4 rel err |\n|---|---|---|---|---|")
        for r in result["draft_kernel"]:
            print(
                f"| {r['tokens']} | {r['bf16_us']:.1f} | {r['nf4_matmul_4bit_us']:.1f} | "
                f"{r['nf4_dequant_matmul_us']:.1f} | {r['nf4_rel_err']:.4f} |"
            )
    head = "| shape | policy | tok/s | mock tok/s | hit | stall s | MB H2D | peak reserved / allocated / plan |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for key, rows in result.items():
        if not key.startswith("policies ") or not isinstance(rows, list):
            continue
        shape = key.split(" ", 1)[1]
        for r in rows:
            if "error" in r:
                print(f"| {shape} | {r['policy']} | error: {r['error'][:200]} |")
                continue
            hit = f"{r['expert_hit_rate']:.2f}" if r["expert_hit_rate"] is not None else "-"
            mock = f"{r['mock_tokens_per_s']:.1f}" if r.get("mock_tokens_per_s") else "-"
            print(
                f"| {shape} | {r['policy']} | {r['tokens_per_s']:.1f} | {mock} | {hit} | {r['io_stall_s']:.3f} | "
                f"{(r['bytes_h2d'] or 0) / 1e6:.1f} | {r['max_reserved_bytes'] / 1e6:.0f} / "
                f"{r.get('max_allocated_bytes', 0) / 1e6:.0f} / {r['plan_bytes'] / 1e6:.0f} MB |"
            )
    prof = result.get("profiler", {})
    if "copies_hidden" in prof and prof["copies_hidden"] is not None:
        print(
            f"profiler: {prof['copy_us'] / 1e3:.1f} ms of copies, {prof['kernel_us'] / 1e3:.1f} ms of kernels, "
            f"{prof['copies_hidden']:.0%} of the copy time hidden behind kernels"
        )
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
