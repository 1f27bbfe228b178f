#!/usr/bin/env python3
"""The MoE-SpeQ benchmark: every policy side by side, on the demo model and on a
Mixtral-shaped checkpoint, on simulated RTX 3060 12GB, RTX 4090 24GB and H100 PCIe cards
(``--hardware``), at "same
memory" (SM: --vram = fixed part + half of the routed experts' full-precision bytes;
moespeq pays its 4-bit draft out of it) and "same cache" (SC: the same full-precision
slots for everyone; moespeq gets the draft on top). 128 new tokens by default, as
llama-bench's tg128 (tokens/s includes the prompt's prefill, as in ``run --json``). Mock
backend: the virtual clock is deterministic, so the table is reproducible.

Prints a Markdown table per cell, the measured union of experts per verified layer
against (k+1) x top_k, the draft's share of memory, and ends with one JSON line.

    python scripts/bench_policies.py [--new-tokens 128] [--out build/bench_policies.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moespeq_cli.cli.run import DEFAULT_PROMPT, DEMO_PROMPT  # noqa: E402
from moespeq_cli.model_ref import DEMO_DIR  # noqa: E402
from moespeq_cli.runtime.bench import bench, budget_for  # noqa: E402
from moespeq_cli.runtime.engine import Engine, EngineOptions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench_policies.json")
    ap.add_argument("--models", default="demo,mixtral-shaped")
    ap.add_argument("--hardware", default="rtx3060-12gb,rtx4090-24gb,h100-pcie")
    args = ap.parse_args()
    mixtral = ROOT / "build" / "mixtral-shaped"
    if "mixtral-shaped" in args.models:
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_checkpoint.py"), str(mixtral)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    models = {"demo": (DEMO_DIR, DEMO_PROMPT), "mixtral-shaped": (mixtral, DEFAULT_PROMPT)}
    policies = ["moespeq", "hybrid", "gate-prefetch", "lru", "ondemand"]
    # moespeq as in the MoE-SpeQ issue (experts copied only), then with CPU experts
    moespeq_runs = [("auto", False), ("2", False), ("4", False), ("8", False), ("auto", True)]
    cells = []
    for model in args.models.split(","):
        path, prompt = models[model]
        probe = Engine(path, EngineOptions(backend="mock"))
        ids = probe.tokenizer.encode(prompt)
        context = len(ids) + args.new_tokens
        vram, _ = budget_for(path, context, 0.5)  # fixed part + half the experts
        for hw in args.hardware.split(","):
            for same_cache in (False, True):
                opts = EngineOptions(backend="mock", hardware=hw, vram=vram)
                results = bench(
                    path,
                    ids,
                    args.new_tokens,
                    policies,
                    opts,
                    same_cache=same_cache,
                    moespeq_runs=moespeq_runs,
                )
                assert len({tuple(r.token_ids) for r in results}) == 1, "policies disagree on tokens"
                cells.append(
                    {
                        "model": model,
                        "hardware": hw,
                        "budget": "SC" if same_cache else "SM",
                        "vram_bytes": vram,
                        "results": [r.to_dict() for r in results],
                    }
                )
                print_cell(cells[-1])
    summary = summarize(cells)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cells": cells, "summary": summary}) + "\n")
    print(json.dumps({"benchmark": "bench_policies", "new_tokens": args.new_tokens, "summary": summary}))


def print_cell(cell: dict) -> None:
    print(
        f"\n### {cell['model']} · {cell['hardware']} · {cell['budget']} (--vram {cell['vram_bytes'] / 2**20:.1f} MiB)\n"
    )
    print(
        "| policy | slots | tok/s | vs gate-prefetch | vs lru | vs ondemand | vs hybrid | hit rate | stall | MB moved "
        "| CPU share | accept | k | union / (k+1)·top_k | draft share |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in cell["results"]:
        s = r["stats"]
        sv = r["speedup_vs"]
        stall = s["io_stall_s"] / s["seconds"] if s["seconds"] else 0
        union = f"{r['mean_union']:.1f} / {r['union_bound']}" if r["mean_union"] else "-"
        share = f"{r['draft_bytes'] / r['vram_bytes']:.0%}" if r["draft_bytes"] else "-"
        acc = f"{s['acceptance_rate']:.2f}" if s["acceptance_rate"] is not None else "-"
        k = f"{s['spec_depth_mean']:.1f}" if s["spec_depth_mean"] is not None else "-"
        cpu = f"{s['cpu_expert_share']:.0%}" if s["cpu_expert_share"] is not None else "-"
        slots = f"{r['slots']} (draft released)" if r["draft_released"] else str(r["slots"])
        print(
            f"| {r['label']} | {slots} | {s['tokens_per_s']:.1f} | {sv['gate-prefetch']:.2f}x | {sv['lru']:.2f}x | "
            f"{sv['ondemand']:.2f}x | {sv['hybrid']:.2f}x | {s['expert_hit_rate']:.0%} | {stall:.0%} | "
            f"{s['bytes_h2d'] / 1e6:.1f} | {cpu} | {acc} | {k} | {union} | {share} |"
        )


def summarize(cells: list[dict]) -> list[dict]:
    out = []
    for c in cells:
        res = {r["label"]: r["stats"]["tokens_per_s"] for r in c["results"]}
        acc = {r["label"]: r["stats"]["acceptance_rate"] for r in c["results"]}
        copy_baselines = max(res[p] for p in ("gate-prefetch", "lru", "ondemand"))
        auto = res["moespeq k=auto"]
        cpu_auto = res["moespeq+cpu k=auto"]
        best_spec = max(v for k, v in res.items() if k.startswith("moespeq") and "+cpu" not in k)
        best_other = max(v for k, v in res.items() if k != "moespeq+cpu k=auto")
        out.append(
            {
                "model": c["model"],
                "hardware": c["hardware"],
                "budget": c["budget"],
                "auto_vs_best_baseline": round(auto / copy_baselines, 3),
                "best_moespeq_vs_gate_prefetch": round(best_spec / res["gate-prefetch"], 3),
                "cpu_auto_vs_best_of_all": round(cpu_auto / best_other, 3),
                "cpu_auto_vs_hybrid": round(cpu_auto / res["hybrid"], 3),
                "acceptance_k4": acc.get("moespeq k=4"),
            }
        )
    return out


if __name__ == "__main__":
    main()
