"""The 4-bit self-draft: the target's routed experts quantized with bitsandbytes."""
