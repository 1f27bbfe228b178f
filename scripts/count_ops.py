#!/usr/bin/env python3
"""Ops and host syncs per token on the GPU path's code, counted at the dispatcher (a
benchmark of the host's work, not of speed).

An eager GPU run pays a launch (5-8 us on the host) per aten op and a stall per host
sync, whatever the weights' size: on a model with many layers and experts that fixed cost,
not the GPU, can set the speed. This script builds tiny checkpoints with the layer and
expert topology of real models (their widths shrunk: what is counted does not depend on
width) and counts, per emitted token, what the code the cuda backend runs dispatches:

- ``ops``: aten ops that launch (views and in-place metadata ops counted apart), the
  runtime's own bookkeeping copies excluded (they are its copy engine's work), with the
  model computing in bf16 as the GPU does, its casts counted (they are launches there);
- ``syncs``: the host reads of device values: ``item()``, ``tolist()``, and
  ``torch.tensor(list, device=...)`` (a blocking copy from pageable memory), counted by
  ``executors/opcount.HostSyncCounter``.

It runs on the mock with the cuda backend's code path (``--backend mock``: the same
executors, scheduler and model code; only the clock is virtual), for plain decoding
(``gate-prefetch``, ``lru``) and for speculative decoding (``moespeq`` at a fixed depth:
verification passes and draft steps), on each ``--hardware`` profile's GPU path: torch
has a grouped GEMM kernel on Hopper and Blackwell (bf16) only, so there a layer's experts
are one call per projection and elsewhere (an RTX card) one expert at a time, whose ops
grow with top-k (torch's fallback elsewhere would read the group sizes back to the host,
a sync a layer, and still launch a product per group). The draft's layers go one of two
ways, by the cost model (executors/draft.py): one grouped call over its routed 4-bit
experts gathered and dequantized together, or expert by expert on the 4-bit kernel; at
these tiny widths the grouped call always wins, so each row also says which way the real
model's widths take. The last line is JSON.

    python scripts/count_ops.py [--shapes mixtral-8x7b,qwen3-30b-a3b] [--tokens 8] [--hardware rtx3060-12gb,h100-pcie]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# (transformers config class, model class, the real model's topology at a tiny width, spec depth)
SHAPES = {
    "mixtral-8x7b": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            num_hidden_layers=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            hidden_size=64,
            intermediate_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        2,
    ),
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_hidden_layers=48,
            num_experts=128,
            num_experts_per_tok=8,
            hidden_size=64,
            moe_intermediate_size=16,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        ),
        4,
    ),
}
# the real models' expert widths (hidden, intermediate): the draft's way of computing a
# layer is chosen by the cost model, and at a tiny width a grouped call always wins
REAL_WIDTHS = {"mixtral-8x7b": (4096, 14336), "qwen3-30b-a3b": (2048, 768)}
DTYPE = "bfloat16"  # what the checkpoints are saved in (``build``) and the GPU computes in
TARGETS = {"syncs_per_pass": "MoE layers + 1", "ops_per_moe_layer_per_pass": 40, "qwen3_ops_per_token": 1500}


def build(shape: str, out: Path) -> Path:
    import tiny_models
    import transformers

    cfg_cls, model_cls, topology, _ = SHAPES[shape]
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=tiny_models.VOCAB,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        **topology,
    )
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.0 if "embed" in name else 0.6 / p.shape[1] ** 0.5)
    model.to(getattr(torch, DTYPE)).save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.json").write_text(json.dumps(tiny_models.byte_tokenizer_json()))
    return out


def count(path: Path, policy: str, depth: int | None, tokens: int, hardware: str = "rtx3060-12gb") -> dict:
    """Per emitted token (after the prompt): ops, views, syncs; and per MoE layer per pass."""
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.runtime.executors.opcount import HostSyncCounter, OpCounter
    from moespeq_cli.runtime.sampling import SamplingParams

    # in the checkpoint's dtype (bf16), as the GPU runs it: the mock's float32 numerics
    # would take float32's branches and leave out the casts a bf16 GPU launches
    opts = EngineOptions(backend="mock", hardware=hardware, policy=policy, spec_depth=depth or "auto", dtype=DTYPE)
    eng = Engine(path, opts)
    prompt = list(range(5, 13))
    eng.load(len(prompt) + tokens + 8)
    try:
        stream = eng.generate(prompt, tokens + 1, SamplingParams())
        next(stream)  # the prompt's pass and the first token: not decoding
        b = eng.backend
        internal = b.counter.internal
        first = len(b.timeline.intervals)
        passes = [0]
        hook = eng.model.register_forward_pre_hook(lambda *a: passes.__setitem__(0, passes[0] + 1))
        with torch.inference_mode(), OpCounter() as ops, HostSyncCounter() as syncs:
            emitted = sum(1 for _ in stream)
        hook.remove()
        own = b.counter.internal - internal
        phases: dict[str, list[int]] = {}  # phase -> [ops its regions and glue were charged, passes]
        for iv in b.timeline.intervals[first:]:
            seen = phases.setdefault(iv.phase, [0, 0])
            seen[0] += iv.ops
            seen[1] += iv.name == "framework"  # the pass's glue: one interval a pass
    finally:
        eng.close()
    moe_layers = len(eng.ckpt.config.moe_layers)
    per_phase = {ph: round(ops / max(n, 1) / moe_layers, 1) for ph, (ops, n) in sorted(phases.items())}
    kinds = {"item": ops.syncs, **syncs.by_kind}
    total = sum(kinds.values())
    n = max(emitted, 1)
    grouped = eng.target_exec.grouped is not None
    draft = eng.draft_exec
    return {
        # the draft's layers: in one grouped call (executors/draft.py) or expert by expert
        "draft_experts": "-" if draft is None else "grouped" if draft.blocks else "expert by expert",
        "policy": policy + (f" k={depth}" if depth else ""),
        "hardware": hardware,
        "experts": "grouped" if grouped else "expert by expert",
        "tokens": emitted,
        "passes": passes[0],
        "ops_per_token": round((ops.ops - own) / n, 1),
        "views_per_token": round(ops.views / n, 1),
        "syncs_per_token": round(total / n, 2),
        "syncs_by_kind_per_token": {k: round(v / n, 2) for k, v in sorted(kinds.items())},
        "passes_per_token": round(passes[0] / n, 2),
        "syncs_per_pass": round(total / max(passes[0], 1), 2),
        "sync_limit_per_pass": moe_layers + 1,  # one per MoE layer (routing) and the sampler's
        "ops_per_moe_layer_per_pass": round((ops.ops - own) / max(passes[0], 1) / moe_layers, 1),
        # the target's passes (decoding, verification) and the draft's apart, from the
        # mock's charges (every op charged once: tests/test_calibrated_mock.py)
        "ops_per_moe_layer_per_pass_by_phase": per_phase,
        "passes_by_phase_per_token": {ph: round(n_ / n, 2) for ph, (_, n_) in sorted(phases.items())},
    }


def real_width_draft(shape: str, hardware: str) -> str:
    """How the draft computes a layer of the real model on ``hardware`` (the cost model's
    choice, ``draft_groups``)."""
    from moespeq_cli.models.expert_format import HF_EXPERTS
    from moespeq_cli.runtime.executors.draft import draft_groups
    from moespeq_cli.runtime.planning.hardware import load_profile

    hidden, inter = REAL_WIDTHS[shape]
    top_k = SHAPES[shape][2].get("num_experts_per_tok")
    hw = load_profile(hardware)
    dtype = getattr(torch, DTYPE)
    return "grouped" if draft_groups(hw, HF_EXPERTS, hidden, inter, top_k, 64, dtype) else "expert by expert"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--dir", type=Path, help="where to keep the checkpoints (default: a temporary directory)")
    ap.add_argument(
        "--hardware",
        default="rtx3060-12gb,h100-pcie",
        help="profiles whose GPU path to count: an RTX card computes a layer's experts one by one, a Hopper "
        "card in one grouped GEMM per projection (torch has that kernel there only)",
    )
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.dir or Path(tmp)
        for shape in args.shapes.split(","):
            if shape not in SHAPES:
                sys.exit(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
            path = build(shape, base / shape)
            depth = SHAPES[shape][3]
            for hardware in args.hardware.split(","):
                for policy, k in (("gate-prefetch", None), ("lru", None), ("moespeq", depth)):
                    r = count(path, policy, k, args.tokens, hardware)
                    r["shape"] = shape
                    if r["draft_experts"] != "-":
                        r["draft_experts_at_real_width"] = real_width_draft(shape, hardware)
                    rows.append(r)
    print(
        "| shape | GPU (its experts) | policy | passes / token | ops / token | ops / MoE layer / pass "
        "| target's / draft's | syncs / token | syncs / pass (limit) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ph = r["ops_per_moe_layer_per_pass_by_phase"]
        split = f"{ph.get('target', '-')} / {ph.get('draft', '-')}"
        if r["draft_experts"] != "-":
            split += f" ({r['draft_experts']}; at the real width {r['draft_experts_at_real_width']})"
        print(
            f"| {r['shape']} | {r['hardware']} ({r['experts']}) | {r['policy']} | {r['passes_per_token']} "
            f"| {r['ops_per_token']} "
            f"| {r['ops_per_moe_layer_per_pass']} | {split} | {r['syncs_per_token']} "
            f"| {r['syncs_per_pass']} ({r['sync_limit_per_pass']}) |"
        )
    print(json.dumps({"benchmark": "count_ops", "targets": TARGETS, "rows": rows}))


if __name__ == "__main__":
    main()
