"""Next-token selection: greedy at temperature 0, otherwise temperature, top-k and top-p
(nucleus) sampling from a seeded generator, so a run with ``--seed`` is reproducible.

``probabilities`` returns the distribution actually sampled from; speculative decoding's
rejection rule needs exactly that distribution for both the draft and the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> probabilities [..., V] after temperature, top-k and top-p."""
    x = logits.float() / p.temperature
    if p.top_k and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each entry
        sorted_p = sorted_p.masked_fill(before >= p.top_p, 0.0)  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.gen = torch.Generator()
        self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] -> the next token id."""
        if self.params.greedy:
            return int(torch.argmax(logits))
        # Sampled on the CPU with a CPU generator: the same seed gives the same tokens on
        # every backend.
        return int(torch.multinomial(probabilities(logits.float().cpu(), self.params), 1, generator=self.gen))
