#!/usr/bin/env python3
"""Evaluate the demo model's nf4 self-draft on held-out prompts: acceptance rate and
draft_routing_match (the share of (token, layer) pairs where the draft's top-k expert set
equals the target's), with k fixed at 4 on the mock backend. Held-out prompts are the
openings of the validation documents of scripts/train_demo.py (every 20th document).

    python scripts/eval_demo.py [--prompts 6] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--data-dir", type=Path, default=ROOT / "build" / "train_demo" / "data")
    args = ap.parse_args()
    import train_demo

    from moespeq_cli.model_ref import DEMO_DIR
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.runtime.sampling import SamplingParams

    docs = train_demo.load_documents(args.data_dir)
    held_out = [d for i, d in enumerate(docs) if i % 20 == 7][: args.prompts]
    rows, drafted, accepted, pairs, equal = [], 0, 0, 0, 0
    for doc in held_out:
        eng = Engine(DEMO_DIR, EngineOptions(backend="mock", spec_depth="4", vram="64MiB"))
        ids = eng.tokenizer.encode(doc)[:48]
        eng.load(len(ids) + args.new_tokens)
        out = [ev.token for ev in eng.generate(ids, args.new_tokens, SamplingParams())]
        s, sched = eng.spec_stats, eng.scheduler
        drafted += s.drafted
        accepted += s.accepted
        pairs += sched.match_pairs
        equal += sched.match_equal
        rows.append(
            {
                "prompt": eng.tokenizer.decode(ids)[:60],
                "acceptance_rate": s.acceptance_rate,
                "draft_routing_match": sched.draft_routing_match,
                "text": eng.tokenizer.decode(out)[:120],
            }
        )
    result = {
        "prompts": len(rows),
        "acceptance_rate": accepted / drafted,
        "draft_routing_match": equal / pairs,
        "rows": rows,
    }
    for r in rows:
        print(f"{r['acceptance_rate']:.2f}  {r['draft_routing_match']:.3f}  {r['prompt']!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
