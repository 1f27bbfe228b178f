#!/usr/bin/env python3
"""Benchmark: moespeq's CPU decoding against the memory-bandwidth bound and transformers.

On the CPU a decoding step reads the weights it uses once from DRAM, so its speed limit
is (bytes of weight read per token) / (memory bandwidth). This script builds Mixtral-shaped
checkpoints with random weights in the Hugging Face layout, saved in bf16 and in fp32:

- ``86M``: hidden 512, 4 layers, 8 experts top-2, vocab 32000 (cache-resident on most CPUs);
- ``791M``: hidden 1024, intermediate 3584, 8 layers, 8 experts top-2 (DRAM-bound);

then, for each, times greedy decoding of ``--new-tokens`` tokens from a 32-token prompt
with ``moespeq`` (the cpu backend: the plain reference engine) and with transformers'
``generate``, best of ``--repeats`` after a warm-up. It reports decode tok/s (the steps
after the first token), the bytes read per token, this machine's memory bandwidth (a
reduction over a 512 MiB buffer, larger than any last-level cache), the bound that
implies, the share of it each achieves, and whether the tokens agree. This VM's bandwidth
drifts by tens of percent within seconds, so each of moespeq's runs is paired with the
bandwidth measured just before and just after it: its share is that run's rate over the
bound of that moment, and the row reports the median run's share (all of them listed).
transformers' share is against the median of those bandwidths. The last line is
JSON. Needs the dev extra (transformers); the 791M build takes about a minute and 5 GB
of temporary disk.

    python scripts/bench_cpu.py [--sizes 86M,791M] [--dtypes bf16,fp32] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {  # make_checkpoint.py's shape arguments (8 experts, top-2, vocab 32000)
    "86M": ["--hidden", "512", "--intermediate", "1024", "--layers", "4"],
    "791M": ["--hidden", "1024", "--intermediate", "3584", "--layers", "8"],
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build(out: Path, size: str, dtype: torch.dtype) -> None:
    """The checkpoint, written by scripts/make_checkpoint.py (as the other benchmarks do)."""
    script = Path(__file__).with_name("make_checkpoint.py")
    dtype_name = str(dtype).removeprefix("torch.")
    subprocess.run([sys.executable, str(script), str(out), *SIZES[size], "--dtype", dtype_name], check=True)


def bytes_per_token(path: Path) -> int:
    """Weight bytes one decoding step reads: every dense weight (attention, routers, the
    LM head) and top-k routed experts per MoE layer; one embedding row (negligible)."""
    from moespeq_cli.models.checkpoint import Checkpoint

    ck = Checkpoint(path)
    c = ck.config
    elem = torch.empty(0, dtype=c.dtype).element_size()
    expert_names = {k for layer in c.moe_layers for e in range(c.num_experts) for k in c.expert_keys(layer, e)}
    dense = 0
    for name in ck.keys():
        if name in expert_names or "embed_tokens" in name:
            continue
        n = 1
        for d in ck.shape(name):
            n *= d
        dense += n * elem
    expert = 3 * c.hidden_size * c.expert_intermediate * elem
    return dense + c.top_k * expert * len(c.moe_layers)


_BUF: torch.Tensor | None = None


def memory_bandwidth(samples: int = 9) -> float:
    """Bytes/s of a reduction over 512 MiB of float32 on every core, the median of
    ``samples``. This VM's bandwidth drifts by tens of percent from one second to the next
    (27-50 GB/s measured within a minute), so each decoding run is paired with a
    measurement taken just before and just after it."""
    from moespeq_cli import kernels

    global _BUF
    if _BUF is None:
        _BUF = torch.randn(128 * 2**20)
    with kernels.torch_parallel():
        _BUF.sum()
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            _BUF.sum()
            times.append(time.perf_counter() - t0)
    return _BUF.numel() * 4 / sorted(times)[len(times) // 2]


def decode_rate(first: float, total: float, n: int) -> float:
    """Tokens per second of the steps after the first token."""
    return (n - 1) / max(total - first, 1e-9)


def time_ours(
    path: Path, prompt: list[int], n: int, repeats: int
) -> tuple[list[tuple[float, float, float]], list[int]]:
    """Per timed run (after a warm-up): (decode tok/s, end-to-end tok/s, the memory
    bandwidth around it: the mean of the measurements just before and just after)."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.runtime.sampling import SamplingParams

    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(len(prompt) + n)
    eng.tokenizer.eos_ids = set()  # random weights: every run decodes all n tokens, as generate's min_new_tokens
    runs, tokens = [], []
    for i in range(repeats + 1):  # the first run warms up
        before = memory_bandwidth(5)
        t0 = time.perf_counter()
        first = None
        tokens = []
        for ev in eng.generate(prompt, n, SamplingParams()):
            tokens.append(ev.token)
            if first is None:
                first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        after = memory_bandwidth(5)
        if i:
            runs.append((decode_rate(first, total, n), n / total, (before + after) / 2))
    eng.close()
    return runs, tokens


def time_hf(path: Path, dtype: torch.dtype, prompt: list[int], n: int, repeats: int) -> tuple[float, float, list[int]]:
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor([prompt])

    def run(k: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=k,
                min_new_tokens=k,
                do_sample=False,
                pad_token_id=0,
                attention_mask=torch.ones_like(ids),
            )
        return time.perf_counter() - t0, out[0, len(prompt) :].tolist()

    run(n)  # warm-up
    first = min(run(1)[0] for _ in range(repeats))
    totals = [run(n) for _ in range(repeats)]
    total = min(t for t, _ in totals)
    return decode_rate(first, total, n), n / total, totals[0][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="86M,791M", help="comma-separated: " + ", ".join(SIZES))
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true", help="time moespeq only")
    args = ap.parse_args()
    from moespeq_cli import kernels

    threads = torch.get_num_threads()
    bw = memory_bandwidth()
    print(
        f"memory bandwidth: {bw / 1e9:.1f} GB/s (median reduction over 512 MiB, {threads} threads; measured again per run)"
    )
    print(f"CPU kernels: {'on' if kernels.available() else 'off (' + str(kernels.why_unavailable()) + ')'}")
    prompt = torch.randint(3, 32000, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for size in args.sizes.split(","):
        for name in args.dtypes.split(","):
            dtype = DTYPES[name]
            with tempfile.TemporaryDirectory() as d:
                path = Path(d)
                print(f"building {size} {name} ...", flush=True)
                build(path, size, dtype)
                nbytes = bytes_per_token(path)
                runs, t_ours = time_ours(path, prompt, args.new_tokens, args.repeats)
                ours, ours_e2e = max(r[0] for r in runs), max(r[1] for r in runs)
                # each run's share against the bandwidth measured around it; the median run's
                shares = sorted(rate * nbytes / around for rate, _, around in runs)
                share = shares[len(shares) // 2]
                bw = sorted(r[2] for r in runs)[len(runs) // 2]
                bound = bw / nbytes
                row = {
                    "checkpoint": size,
                    "dtype": name,
                    "bytes_per_token": nbytes,
                    "memory_bandwidth_gb_s": round(bw / 1e9, 1),
                    "bound_tok_s": round(bound, 1),
                    "moespeq_decode_tok_s": round(ours, 1),
                    "moespeq_share_of_bound": round(share, 3),
                    "moespeq_shares_per_run": [round(x, 3) for x in shares],
                    "moespeq_tok_s": round(ours_e2e, 1),
                }
                if not args.no_transformers:
                    with kernels.torch_parallel():  # transformers on every core
                        hf, hf_e2e, t_hf = time_hf(path, dtype, prompt, args.new_tokens, args.repeats)
                    row |= {
                        "transformers_decode_tok_s": round(hf, 1),
                        "transformers_share_of_bound": round(hf / bound, 3),
                        "transformers_tok_s": round(hf_e2e, 1),
                        "ratio_e2e": round(ours_e2e / hf_e2e, 2),
                        "same_tokens": t_ours == t_hf,
                    }
                rows.append(row)
                print(json.dumps(row), flush=True)
    head = f"{'ckpt':5} {'dtype':5} {'MB/tok':>7} {'GB/s':>5} {'bound':>7} {'moespeq':>8} {'share':>6}"
    if not args.no_transformers:
        head += f" {'transformers':>12} {'share':>6} {'e2e ratio':>9} same"
    print(head)
    for r in rows:
        line = (
            f"{r['checkpoint']:5} {r['dtype']:5} {r['bytes_per_token'] / 1e6:>7.1f} {r['memory_bandwidth_gb_s']:>5} "
            f"{r['bound_tok_s']:>7} "
            f"{r['moespeq_decode_tok_s']:>8} {r['moespeq_share_of_bound']:>6.0%}"
        )
        if "transformers_decode_tok_s" in r:
            line += (
                f" {r['transformers_decode_tok_s']:>12} {r['transformers_share_of_bound']:>6.0%}"
                f" {r['ratio_e2e']:>9} {r['same_tokens']}"
            )
        print(line)
    print(
        json.dumps(
            {
                "benchmark": "cpu_decode",
                "threads": threads,
                "memory_bandwidth_gb_s": round(bw / 1e9, 1),
                "kernels": kernels.available(),
                "new_tokens": args.new_tokens,
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
