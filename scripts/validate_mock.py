#!/usr/bin/env python3
"""Does the mock predict the wall clock? (a benchmark, not a test; issue: a simulator you
can trust).

It saves the checkpoint's draft (``moespeq quantize``, once), calibrates this machine
(``moespeq calibrate --model``, or ``--profile`` an existing one), then
runs the disk-tier benchmark's checkpoint (scripts/bench_disk.py builds it; with
``--family qwen3_moe`` a Qwen3-MoE-shaped one, 64 experts of 2.4 MB a layer, top-8;
``--checkpoint`` one of yours) at RAM
budgets of a quarter and a half of its experts both ways, for every policy:

- for real: ``--backend cpu --ram X`` (wall clock; the median of ``--rounds`` runs, the
  rounds interleaved);
- simulated: ``--backend mock --hardware <the calibrated cpu profile> --ram X`` (the CPU
  as the device, the disk as the link, virtual clock);
- simulated again with the disk as it was during the real runs: the profile's disk
  queue curve replaced by the one the median real run's reads show (the bytes the disk
  served with 1, 2, .. reads in flight, bench.queue_curve). A disk whose
  speed drifts between calibration and run (a VM's, behind its host's cache) is then no
  longer an error of the model: this column isolates what the model itself gets wrong.

It prints predicted against measured tokens/s per policy and their ratios, the time split
into I/O stall and the rest (compute and the host's own time), where the time went by
kind of region both ways, and
whether the policies rank alike; target: every policy within 15% of the wall clock.
Every run's tokens must equal the reference's. Ends with one JSON line.

    python scripts/validate_mock.py [--profile PROFILE.yaml] [--new-tokens 64] [--rounds 3]
    python scripts/validate_mock.py --family qwen3_moe --rounds 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moespeq_cli.cli.run import DEFAULT_PROMPT  # noqa: E402
from moespeq_cli.models.checkpoint import Checkpoint  # noqa: E402
from moespeq_cli.quant.draft_store import saved_draft  # noqa: E402
from moespeq_cli.runtime.bench import run_policy  # noqa: E402
from moespeq_cli.runtime.engine import Engine, EngineOptions  # noqa: E402
from moespeq_cli.runtime.planning.hardware import load_profile  # noqa: E402
from moespeq_cli.runtime.planning.overheads import BETWEEN, between  # noqa: E402
from moespeq_cli.runtime.tiers.disk import DiskExperts  # noqa: E402

SHAPE = ["--hidden", "1024", "--intermediate", "3584", "--layers", "8", "--experts", "8", "--top-k", "2"]
# --family: (the checkpoint built when none is given, make_checkpoint.py's arguments)
FAMILIES = {
    "mixtral": ("disk-bench", SHAPE),  # the disk-tier benchmark's: 8 experts of 22 MB a layer, top-2
    "qwen3_moe": (  # 64 experts of 2.4 MB a layer, top-8 (Qwen3-30B-A3B's kind)
        "validate-qwen3",
        ["--family", "qwen3_moe", "--hidden", "1024", "--intermediate", "384", "--layers", "8", "--experts", "64"]
        + ["--top-k", "8"],
    ),
}
POLICIES = (("moespeq", "auto"), ("moespeq", "4"), ("gate-prefetch", None), ("lru", None), ("ondemand", None))
TARGET = 0.15


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", type=Path, help="a calibrated cpu profile (default: calibrate now)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument(
        "--family", choices=sorted(FAMILIES), default="mixtral", help="the shape of the checkpoint built (once)"
    )
    ap.add_argument("--checkpoint", type=Path, help="a checkpoint of yours instead (default: build/ one per --family)")
    ap.add_argument("--out", type=Path, help="where the JSON goes (default: build/validate_mock[_FAMILY].json)")
    args = ap.parse_args()
    if args.out is None:
        suffix = "" if args.family == "mixtral" else f"_{args.family}"
        args.out = ROOT / "build" / f"validate_mock{suffix}.json"
    path = args.checkpoint
    if path is None:
        name, shape = FAMILIES[args.family]
        path = ROOT / "build" / name
        if not (path / "config.json").exists():
            subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "make_checkpoint.py"), str(path), *shape],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    elif not (path / "config.json").is_file():
        ap.error(  # a usage error: argparse's, exit 2 (sys.exit(str) exited 1)
            f"--checkpoint {path} has no config.json; give a checkpoint directory (scripts/make_checkpoint.py writes one)"
        )
    if saved_draft(path, EngineOptions.quant_method, EngineOptions.blocksize) is None:
        # saved once: every moespeq run loads it (rather than quantizing in memory each
        # time), and calibrate measures the draft's regions on it
        subprocess.run([sys.executable, "-m", "moespeq_cli", "quantize", str(path)], check=True)
    profile = args.profile
    if profile is None:
        profile = ROOT / "build" / "calibrated-cpu.yaml"
        subprocess.run(
            [sys.executable, "-m", "moespeq_cli", "calibrate", "--out", str(profile), "--model", str(path)],
            check=True,
        )
    experts = DiskExperts(Checkpoint(path)).total_bytes
    hw = load_profile(str(profile))
    probe = Engine(path, EngineOptions(backend="cpu"))
    ids = probe.tokenizer.encode(DEFAULT_PROMPT)
    n = args.new_tokens
    ref = Engine(path, EngineOptions(backend="cpu"))
    ref.load(len(ids) + n)
    from moespeq_cli.runtime.sampling import SamplingParams

    ref_tokens = [ev.token for ev in ref.generate(ids, n, SamplingParams())]
    cells = []
    for frac in (float(f) for f in args.fractions.split(",")):
        ram = int(experts * frac)
        real: dict[str, list] = {}
        for _ in range(args.rounds):
            for policy, k in POLICIES:
                label = policy + (f" k={k}" if k else "")
                o = EngineOptions(backend="cpu", ram=ram, spec_depth=k or "auto")
                real.setdefault(label, []).append(run_policy(path, ids, n, policy, o, label))
        rows = []
        for policy, k in POLICIES:
            label = policy + (f" k={k}" if k else "")
            o = EngineOptions(backend="mock", hardware=str(profile), ram=ram, spec_depth=k or "auto")
            sim = run_policy(path, ids, n, policy, o, label)
            runs = sorted(real[label], key=lambda r: r.stats.seconds)
            med = runs[len(runs) // 2]
            queue = med.disk_queue or list(hw.disk_queue_bandwidth or [hw.disk_bandwidth])
            as_run = replace(hw, disk_bandwidth=max(queue), disk_queue_bandwidth=tuple(queue))
            o2 = EngineOptions(backend="mock", hardware=as_run, ram=ram, spec_depth=k or "auto")
            sim2 = run_policy(path, ids, n, policy, o2, label)
            same = all(x.token_ids == ref_tokens for x in (sim, sim2, *runs))
            rows.append(
                {
                    "policy": label,
                    "measured_tokens_per_s": med.stats.tokens_per_s,
                    "measured_range": [runs[-1].stats.tokens_per_s, runs[0].stats.tokens_per_s],
                    "predicted_tokens_per_s": sim.stats.tokens_per_s,
                    "ratio": sim.stats.tokens_per_s / med.stats.tokens_per_s,
                    "predicted_as_run_tokens_per_s": sim2.stats.tokens_per_s,
                    "ratio_as_run": sim2.stats.tokens_per_s / med.stats.tokens_per_s,
                    "disk_during_run": med.disk_bandwidth,
                    "disk_queue_during_run": med.disk_queue,
                    "measured_io_stall_s": med.stats.io_stall_s,
                    "predicted_io_stall_s": sim.stats.io_stall_s,
                    "predicted_as_run_io_stall_s": sim2.stats.io_stall_s,
                    "measured_rest_s": med.stats.seconds - med.stats.io_stall_s,
                    "predicted_as_run_rest_s": sim2.stats.seconds - sim2.stats.io_stall_s,
                    "measured_bytes_read": med.stats.bytes_read,
                    "predicted_bytes_read": sim.stats.bytes_read,
                    "same_tokens": same,
                    "measured_regions": med.regions,
                    "predicted_as_run_regions": sim2.regions,
                    "measured": asdict(med.stats),
                    "predicted": asdict(sim.stats),
                }
            )
        measured_rank = [r["policy"] for r in sorted(rows, key=lambda r: -r["measured_tokens_per_s"])]
        as_run_rank = [r["policy"] for r in sorted(rows, key=lambda r: -r["predicted_as_run_tokens_per_s"])]
        by_round = [sorted(real, key=lambda p: -real[p][i].stats.tokens_per_s) for i in range(args.rounds)]
        predicted_rank = [r["policy"] for r in sorted(rows, key=lambda r: -r["predicted_tokens_per_s"])]
        cell = {
            "ram_fraction": frac,
            "ram_bytes": ram,
            "rows": rows,
            "measured_rank": measured_rank,
            "predicted_rank": predicted_rank,
            "predicted_as_run_rank": as_run_rank,
            "measured_rank_by_round": by_round,
        }
        cells.append(cell)
        print(f"\n### --ram {ram / 1e6:.0f} MB ({frac:.0%} of the experts), {args.rounds} real runs each\n")
        print(
            "| policy | measured tok/s (range) | predicted | predicted / measured | disk during run | predicted, that disk "
            "| / measured | stall measured | stall predicted, that disk | rest measured | rest predicted "
            "| MB read measured | MB read predicted |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            lo, hi = r["measured_range"]
            print(
                f"| {r['policy']} | {r['measured_tokens_per_s']:.2f} ({lo:.2f}-{hi:.2f}) | {r['predicted_tokens_per_s']:.2f} | "
                f"{r['ratio']:.2f} | {(r['disk_during_run'] or 0) / 1e9:.2f} GB/s | {r['predicted_as_run_tokens_per_s']:.2f} | "
                f"{r['ratio_as_run']:.2f} | {r['measured_io_stall_s']:.2f} s | {r['predicted_as_run_io_stall_s']:.2f} s | "
                f"{r['measured_rest_s']:.2f} s | {r['predicted_as_run_rest_s']:.2f} s | "
                f"{(r['measured_bytes_read'] or 0) / 1e6:.0f} | {(r['predicted_bytes_read'] or 0) / 1e6:.0f} |"
            )
        print("\nwhere the time went, measured -> predicted with the run's disk (s; the mock's code between")
        print("regions is its framework, route and sync regions):\n")
        for r in rows:
            print(f"- {r['policy']}: {regions_line(r['measured_regions'], r['predicted_as_run_regions'])}")
        print(f"\nranking measured: {', '.join(measured_rank)}\nranking predicted: {', '.join(predicted_rank)}")
        print(f"ranking predicted with the run's disk: {', '.join(as_run_rank)}")
        for i, rank in enumerate(by_round):
            print(f"ranking measured in round {i + 1}: {', '.join(rank)}")
    worst = max(abs(r["ratio"] - 1) for c in cells for r in c["rows"])
    worst_as_run = max(abs(r["ratio_as_run"] - 1) for c in cells for r in c["rows"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"profile": str(profile), "cells": cells}) + "\n")
    print(
        json.dumps(
            {
                "benchmark": "validate_mock",
                "new_tokens": n,
                "worst_error": round(worst, 3),
                "within_target": worst <= TARGET,
                "worst_error_disk_as_run": round(worst_as_run, 3),
                "within_target_disk_as_run": worst_as_run <= TARGET,
                "same_ranking": all(c["measured_rank"] == c["predicted_rank"] for c in cells),
                "same_ranking_disk_as_run": all(c["measured_rank"] == c["predicted_as_run_rank"] for c in cells),
                "measured_ranking_stable": all(
                    len({tuple(r) for r in c["measured_rank_by_round"]}) == 1 for c in cells
                ),
                "same_tokens": all(r["same_tokens"] for c in cells for r in c["rows"]),
                "ratios": {
                    f"{c['ram_fraction']}": {r["policy"]: round(r["ratio"], 3) for r in c["rows"]} for c in cells
                },
            }
        )
    )


def regions_line(measured: dict, predicted: dict) -> str:
    """'expert 1.47 -> 1.20 · attention ...': each kind of region's seconds both ways, the
    code between regions (the wall clock's uncovered time against the mock's glue) last.
    The mock's glue holds the compute thread's waking after a read ("wake"), which the wall
    clock's timer counts in its stall (it ends when the thread runs again): said apart."""
    wall, glue = between(measured, predicted)
    kinds = sorted((k for k in measured if k in predicted), key=lambda k: -measured[k][1])
    parts = [f"{k} {measured[k][1]:.2f} -> {predicted[k][1]:.2f}" for k in kinds if k != BETWEEN]
    wake = predicted.get("wake", [0, 0.0])[1]
    waking = f" (of which waking after a read {wake:.2f}: measured in the stall)" if wake else ""
    parts.append(f"between regions {wall:.2f} -> {glue:.2f}{waking}")
    return " · ".join(parts)


if __name__ == "__main__":
    main()
