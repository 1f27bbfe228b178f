#!/usr/bin/env python3
"""Write a Mixtral- or Qwen3-MoE-shaped checkpoint with random weights in the real Hugging
Face layout (config.json, model.safetensors, a byte-level tokenizer.json). Needs
transformers (dev).

    python scripts/make_checkpoint.py OUT [--hidden 512 --intermediate 1792 --layers 4] [--dtype float32]

    # many small experts, top-8 (Qwen3-30B-A3B's kind; --intermediate is an expert's):
    python scripts/make_checkpoint.py OUT --family qwen3_moe --hidden 1024 --intermediate 384 \
        --layers 8 --experts 64 --top-k 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--family", choices=("mixtral", "qwen3_moe"), default="mixtral")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1792)  # Mixtral's 14336 / 4096 ratio
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the saved weights' dtype")
    args = ap.parse_args()
    import transformers

    if (args.out / "config.json").exists():
        print(args.out)
        return
    torch.manual_seed(args.seed)
    common = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    if args.family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=args.experts, **common))
    else:  # every layer sparse, q/k norms, head_dim 128 as Qwen3's
        cfg = transformers.Qwen3MoeConfig(
            num_experts=args.experts,
            moe_intermediate_size=args.intermediate,
            head_dim=128,
            norm_topk_prob=True,
            **common,
        )
        model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # wider than the default init, so routing and logits are not degenerate
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                # a fused expert tensor is [E, out, in]: Mixtral's scaled by its dim 1 as the
                # benchmarks' checkpoints always were (their published figures), Qwen3's by fan-in
                fan = p.shape[1] if args.family == "mixtral" else p.shape[-1]
                p.normal_(0, 1.0 if "embed" in name else 0.6 / fan**0.5)
    model.to(getattr(torch, args.dtype)).save_pretrained(args.out, safe_serialization=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_models

    (args.out / "tokenizer.json").write_text(json.dumps(tiny_models.byte_tokenizer_json()))
    print(args.out)


if __name__ == "__main__":
    main()
