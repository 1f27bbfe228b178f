"""Speculative decoding with a self-draft: draft k tokens, verify k+1 positions in one
target pass, accept, roll back.

State between cycles: the KV cache holds positions [0, n), all written by the target;
``pending`` is the newest token, not yet in the cache. One cycle:

1. draft: the draft (the same model with 4-bit routed experts) runs ``pending`` and its own
   guesses d_1..d_{k-1}, one token at a time, writing draft KV at [n, n+k);
2. roll back to n, then verify: the target runs [pending, d_1..d_k] in one pass -> logits
   for k+1 positions, writing target KV at [n, n+k+1);
3. accept (greedy: the longest prefix where the target's argmax equals the draft, plus the
   target's own next token; sampling: accept d_i with probability min(1, p(d_i)/q(d_i)),
   on rejection sample from max(0, p - q) renormalised, which leaves the output
   distributed exactly as the target's), emit the accepted tokens and the target token;
4. roll back the cache to n + accepted + 1.

k = 0 is plain decoding. ``hooks`` lets the offloading runtime watch the phases (the ELB
scheduler, the governor's measurements); the loop itself knows nothing about devices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from moespeq_cli.models.base import CausalLM, ExpertExecutor
from moespeq_cli.runtime.generate import TokenEvent
from moespeq_cli.runtime.sampling import Sampler, SamplingParams, checked_probabilities, greedy_tokens, probabilities


class SpecHooks:
    """Phase callbacks; the defaults do nothing."""

    def begin_prefill(self) -> None: ...
    def begin_cycle(self, k: int) -> None: ...
    def begin_verify(self, k: int) -> None: ...
    def end_cycle(self, k: int, accepted: int, recomputed: bool = False) -> None: ...


@dataclass
class SpecStats:
    cycles: int = 0
    drafted: int = 0
    accepted: int = 0
    spec_cycles: int = 0
    depth_sum: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted(self) -> float | None:
        return self.accepted / self.spec_cycles if self.spec_cycles else None

    @property
    def spec_depth_mean(self) -> float | None:
        return self.depth_sum / self.cycles if self.cycles else None


def accept_greedy(target_logits: torch.Tensor, drafted: list[int]) -> tuple[int, int]:
    """-> (accepted count m, next token). target_logits: [k+1, V]."""
    best = greedy_tokens(target_logits)  # [k+1], the logits checked in the same read
    m = 0
    while m < len(drafted) and best[m] == drafted[m]:
        m += 1
    return m, best[m]


def accept_coupled(p: torch.Tensor, drafted: list[int], sampler: Sampler, first: int) -> tuple[int, int]:
    """Verification with a seed (sampling.py): the target's token at each position is the
    race of its probabilities ``p`` [k+1, V] with that position's noise (``first``: the
    position of the first drafted token); a drafted token is kept exactly when it is that
    token. -> (accepted count m, next token)."""
    for i, d in enumerate(drafted):
        t = sampler.pick(p[i], first + i)
        if t != d:
            return i, t
    return len(drafted), sampler.pick(p[len(drafted)], first + len(drafted))


def accept_sampling(p: torch.Tensor, q: torch.Tensor, drafted: list[int], gen: torch.Generator) -> tuple[int, int]:
    """Rejection sampling. p: target probabilities [k+1, V]; q: draft probabilities [k, V]
    (both after temperature/top-k/top-p). -> (accepted count m, next token)."""
    for i, d in enumerate(drafted):
        r = float(torch.rand((), generator=gen))
        if r * float(q[i, d]) < float(p[i, d]):  # r < p/q, without dividing by zero
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        total = float(residual.sum())
        nxt = int(torch.multinomial(residual / total, 1, generator=gen)) if total > 0 else int(torch.argmax(p[i]))
        return i, nxt
    return len(drafted), int(torch.multinomial(p[len(drafted)], 1, generator=gen))


def speculative_generate(
    model: CausalLM,
    target: ExpertExecutor,
    draft: ExpertExecutor | None,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams,
    eos_ids: set[int],
    clock: Callable[[], float],
    choose_k: Callable[[], int],
    hooks: SpecHooks | None = None,
    stats: SpecStats | None = None,
    cache=None,
    since: float | None = None,
) -> Iterator[TokenEvent]:
    """``generate``'s contract (generate.py: ``cache``, ``since``), decoding k tokens a
    cycle with the draft (``choose_k`` picks k) and verifying them in one target pass."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    hooks = hooks or SpecHooks()
    stats = stats if stats is not None else SpecStats()
    sampler = Sampler(sampling)
    gen = sampler.gen
    cache = model.new_cache() if cache is None else cache  # a reused one holds a prefix (generate.py)
    if cache.length >= len(prompt_ids):
        raise ValueError("a reused cache must leave at least one prompt token to feed")
    t0 = clock() if since is None else since
    model.set_experts(target)
    hooks.begin_prefill()
    logits = model(torch.tensor(prompt_ids[cache.length :]), cache, last_only=True)[-1]
    pending = sampler(logits, 0)
    emitted = 0

    def emit(tok: int, from_draft: bool) -> TokenEvent:
        nonlocal emitted
        ev = TokenEvent(tok, emitted, clock() - t0, from_draft=from_draft, eos=tok in eos_ids)
        emitted += 1
        return ev

    ev = emit(pending, False)
    yield ev
    while not ev.eos and emitted < max_new_tokens:
        k = choose_k()  # with no draft still asked: k = 0 has its own choices (the prefetch)
        k = 0 if draft is None else max(0, min(k, max_new_tokens - emitted - 1))
        span = model.rope_span(cache)  # a pass never spans a LongRoPE switch (models/rope.py)
        k = k if span is None else min(k, span - 1)
        n = cache.length
        cache.keep_from(n)  # linear-attention states from n on: the cycle may roll back to any of them
        stats.cycles += 1
        stats.depth_sum += k
        hooks.begin_cycle(k)
        drafted: list[int] = []
        qs = []
        if k:
            model.set_experts(draft)
            x = pending
            for j in range(k):
                dl = model(torch.tensor([x]), cache, last_only=True)[-1]
                if sampling.greedy:
                    x = int(torch.argmax(dl))
                else:
                    q = probabilities(dl.float().cpu(), sampling)
                    x = sampler.pick(q, emitted + j)  # with a seed: the race the target's choice there runs
                    qs.append(q)
                drafted.append(x)
            cache.truncate(n)
            model.set_experts(target)
        hooks.begin_verify(k)
        recomputed = model.recomputes(cache, k + 1)  # LongRoPE's one-off pass over the whole sequence
        vl = model(torch.tensor([pending] + drafted), cache, last_only=not k)  # [k+1, V] (or [1, V])
        if not k:  # every path checks the logits for NaN/inf (sampling.py)
            m, nxt = 0, sampler(vl[-1], emitted)
        elif sampling.greedy:
            m, nxt = accept_greedy(vl, drafted)
        elif sampler.coupled:
            m, nxt = accept_coupled(checked_probabilities(vl, sampling), drafted, sampler, emitted)
        else:
            m, nxt = accept_sampling(checked_probabilities(vl, sampling), torch.stack(qs), drafted, gen)
        cache.truncate(n + m + 1)
        hooks.end_cycle(k, m, recomputed)
        if k:
            stats.spec_cycles += 1
            stats.drafted += k
            stats.accepted += m
        for tok in drafted[:m]:
            ev = emit(tok, True)
            yield ev
            if ev.eos or emitted >= max_new_tokens:
                return
        ev = emit(nxt, False)
        yield ev
        pending = nxt
