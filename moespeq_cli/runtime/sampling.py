"""Next-token selection: greedy at temperature 0, otherwise temperature, top-k and top-p
(nucleus) sampling.

``probabilities`` returns the distribution actually sampled from; speculative decoding
needs exactly that distribution for both the draft and the target.

With a seed, each position's token is decided by that position's own noise in an
exponential race, ``race``: argmax p / e over the tokens of nonzero probability, e an
Exp(1) draw per token -- the Gumbel-max trick (log p - log e), so a sample of p. The draws
are a counter-based hash (splitmix64's output function) of a 64-bit key made of the seed
and the position (``position_key``) and the token id: any token's draw at any position is
computed on its own, so a race over a top-p nucleus costs the nucleus, not the vocabulary,
and no two positions share a stream (a generator seeded per position would: mt19937 takes
32 bits of its seed). The draft's proposal for a
position races with the same noise as the target's choice there, and verification keeps
a drafted token exactly when the target's race picks it too (``accept_coupled``). The
tokens are then those plain decoding picks with the same seed, whatever the draft
proposed, the depth the governor chose or the policy (as far as the logits are the same:
a pass over several tokens, or another backend's kernels, may round a near-tie the other
way, as in greedy decoding): a seeded request is
reproducible on a wall clock (where the governor's choices follow timings) and in a
server whose governor carries over from earlier requests. (This is drafter-invariant
speculative sampling; it accepts a little less often than rejection sampling where draft
and target differ: P(accept) >= (1 - TV) / (1 + TV) against 1 - TV.) Without a seed,
speculative decoding uses rejection sampling (speculative.py ``accept_sampling``), whose
tokens depend on the drafts, from a randomly seeded generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moespeq_cli import kernels
from moespeq_cli.errors import CheckpointError, UsageError

# Below it logits / T overflows float32, and the softmax is the argmax anyway: a smaller
# positive temperature decodes greedily (as vLLM does below 1e-5), so an OpenAI client's
# 1e-5 is a valid request, not an error.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 100.0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        """Values the sampler cannot use are usage errors naming the option."""
        t, p = self.temperature, self.top_p
        if not (math.isfinite(t) and 0 <= t <= MAX_TEMPERATURE):
            raise UsageError(f"--temperature {t} is out of range; use 0 (greedy) to {MAX_TEMPERATURE:g}")
        if not (math.isfinite(p) and 0 <= p <= 1):  # 0: only the most likely token
            raise UsageError(f"--top-p {p} is out of range; use 0 to 1 (1 = off, 0 = the most likely token only)")
        if self.top_k < 0:
            raise UsageError(f"--top-k {self.top_k} is out of range; use 0 (off) or a positive number")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise UsageError(f"--seed {self.seed} does not fit in 64 bits; use {-(2**63)} to {2**64 - 1}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


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
        drop = before >= p.top_p  # keep the smallest set reaching top_p, and always the most likely token
        drop[..., 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def logits_total(logits: torch.Tensor) -> torch.Tensor:
    """The logits' sum in float64: finite exactly when every logit is (NaN or an infinity
    anywhere makes it NaN or infinite, and float32 logits cannot overflow it). One
    reduction, where ``isfinite(...).all()`` takes four passes over the vocabulary (0.2 ms
    a token on a 32k vocabulary here) and a read of its own."""
    return logits.sum(dtype=torch.float64)


def refuse_total(total: float) -> None:
    """NaN or infinite logits mean corrupt weights (or figures in config.json that overflow):
    stop with that, rather than emit whatever argmax makes of NaN."""
    if not math.isfinite(total):
        raise CheckpointError(
            "the model produced NaN or infinite logits: its weights hold NaN/inf values, or config.json has "
            "figures that overflow (rope_theta, routed_scaling_factor, clip_qkv, rms_norm_eps); check the checkpoint"
        )


def check_logits(logits: torch.Tensor) -> None:
    """``refuse_total`` of logits already on the host (reading a device's is a sync)."""
    refuse_total(float(logits_total(logits)))


def checked_probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """``probabilities`` of ``logits`` brought to the host as float32 (sampling runs on the
    CPU with a CPU generator: the same seed gives the same tokens on every backend),
    checked there for NaN/inf first."""
    host = logits.float().cpu()
    check_logits(host)
    return probabilities(host, p)


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's most likely token, checked: the argmaxes and the logits' total come to
    the host in one read (on a GPU, one sync a pass)."""
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.device.type == "cpu" and rows.dtype == torch.float32:
        best = kernels.argmax(rows)  # the check and the choice in one call, where the kernels run
        if best is not None:
            return best
        # numpy's argmax, the same answer (the first maximum; a NaN first of all) in 10 us
        # where torch's takes 50-75 over a 32k vocabulary on one thread
        refuse_total(float(logits_total(rows)))
        return rows.detach().numpy().argmax(-1).tolist()
    *best, total = torch.cat((torch.argmax(rows, dim=-1).double(), logits_total(rows).view(1))).tolist()
    refuse_total(total)
    return [int(b) for b in best]


GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's


def mix64(x: int) -> int:
    """splitmix64's output function: a 64-bit value to an unrelated one."""
    x = ((x ^ (x >> 30)) * MIX1) % 2**64
    x = ((x ^ (x >> 27)) * MIX2) % 2**64
    return x ^ (x >> 31)


def position_key(seed: int, position: int) -> int:
    """The 64-bit key of ``position``'s noise in a run seeded with ``seed``."""
    return mix64((seed % 2**64) ^ mix64((position + 1) * GOLDEN % 2**64))


def exp_noise(key: int, ids: np.ndarray) -> np.ndarray:
    """An Exp(1) draw for each token id in ``ids`` under ``key``: splitmix64's output of
    the counter key + id * golden, its top 53 bits a uniform u in (0, 1), -log u."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as splitmix64's does
        x = ids.astype(np.uint64) * np.uint64(GOLDEN) + np.uint64(key)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(MIX1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(MIX2)
        x ^= x >> np.uint64(31)
    return -np.log(((x >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53)


def race(probs: torch.Tensor, key: int) -> int:
    """The token whose probability over its Exp(1) draw under ``key`` is largest: argmax
    p / e among tokens of nonzero probability (the Gumbel-max trick), distributed as
    ``probs`` [V] (on the host)."""
    p = probs.detach().numpy()
    ids = np.flatnonzero(p)
    return int(ids[np.argmax(p[ids] / exp_noise(key, ids))])


class Sampler:
    """Chooses each next token; with a seed, by ``race`` with each position's own noise
    (module docstring), else from one randomly seeded generator (``gen``)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.gen = torch.Generator()
        self.gen.manual_seed(params.seed % 2**64 if params.seed is not None else torch.seed())
        self.coupled = params.seed is not None  # tokens decided by each position's noise

    def key(self, position: int) -> int:
        """The key of the noise at ``position`` (0: the first generated token): the same
        for the draft's proposal and the target's choice there."""
        return position_key(self.params.seed, position)

    def pick(self, probs: torch.Tensor, position: int) -> int:
        """A token of ``probs`` [V] for ``position``."""
        if self.coupled:
            return race(probs, self.key(position))
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def __call__(self, logits: torch.Tensor, position: int) -> int:
        """logits [V] -> the token at ``position`` (0: the first generated one)."""
        if self.params.greedy:
            return greedy_tokens(logits)[0]
        return self.pick(checked_probabilities(logits, self.params), position)
