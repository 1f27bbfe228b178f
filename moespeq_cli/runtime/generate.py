"""The plain decode loop: prefill the prompt, then one token per forward pass, streaming
a ``TokenEvent`` per token. It knows nothing about tokenization or where experts live;
the CLI, the profiler and the benchmark all consume the same events.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moespeq_cli.models.base import CausalLM, KVCache
from moespeq_cli.runtime.sampling import Sampler, SamplingParams


@dataclass
class TokenEvent:
    token: int
    index: int  # 0 for the first generated token
    seconds: float  # since generation started, on the run's clock
    from_draft: bool = False
    eos: bool = False


def generate(
    model: CausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams,
    eos_ids: set[int] = frozenset(),
    clock=time.perf_counter,
    cache: KVCache | None = None,
    since: float | None = None,
) -> Iterator[TokenEvent]:
    """``cache``: one that already holds the first ``cache.length`` prompt tokens (a
    conversation's earlier turns, ``Engine.generate(reuse=True)``); only the rest is
    prefilled. Default: a new, empty one. ``since``: the ``clock`` reading token times
    count from (a backend's clock counts from its reset, as its timeline does); default
    the prefill's start."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    sample = Sampler(sampling)
    cache = model.new_cache() if cache is None else cache
    if cache.length >= len(prompt_ids):
        raise ValueError("a reused cache must leave at least one prompt token to feed")
    t0 = clock() if since is None else since
    logits = model(torch.tensor(prompt_ids[cache.length :]), cache, last_only=True)[-1]
    for i in range(max_new_tokens):
        token = sample(logits, i)
        eos = token in eos_ids
        yield TokenEvent(token, i, clock() - t0, eos=eos)
        if eos or i == max_new_tokens - 1:
            return
        logits = model(torch.tensor([token]), cache, last_only=True)[-1]
