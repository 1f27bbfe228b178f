"""Sampling: the filters keep the right tokens, seeds reproduce, frequencies match."""

import numpy as np
import pytest
import torch

from moespeq_cli.errors import CheckpointError
from moespeq_cli.runtime.sampling import Sampler, SamplingParams, check_logits, greedy_tokens, probabilities


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert Sampler(SamplingParams())(logits, 0) == 1


def test_top_k_keeps_k_best():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p > 0).tolist() == [False, True, True, False, False]
    assert torch.allclose(p.sum(), torch.tensor(1.0))


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p = probabilities(probs.log(), SamplingParams(temperature=1.0, top_p=0.8))
    assert (p > 0).tolist() == [True, True, False, False]
    assert torch.allclose(p[:2], torch.tensor([0.625, 0.375]))
    p = probabilities(probs.log(), SamplingParams(temperature=1.0, top_p=0.81))
    assert (p > 0).tolist() == [True, True, True, False]


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 2.0])
    hot = probabilities(logits, SamplingParams(temperature=2.0))
    cold = probabilities(logits, SamplingParams(temperature=0.5))
    assert cold[1] > hot[1] > 0.5


def test_seed_reproduces_and_frequencies_match():
    logits = torch.tensor([0.0, 1.0, 2.0, 0.5])
    params = SamplingParams(temperature=1.0, seed=7)
    a = [Sampler(params)(logits, 0) for _ in range(1)]
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1(logits, i) for i in range(50)]
    seq2 = [s2(logits, i) for i in range(50)]
    assert seq1 == seq2 and a[0] == seq1[0]
    assert s2(logits, 7) == seq1[7]  # a position's token is its own: asked again, or out of order
    want = torch.softmax(logits.double(), -1)
    n = 20000
    for sampler in (Sampler(SamplingParams(temperature=1.0, seed=3)), Sampler(SamplingParams(temperature=1.0))):
        counts = torch.bincount(torch.tensor([sampler(logits, i) for i in range(n)]), minlength=4).double() / n
        assert float((counts - want).abs().sum()) / 2 < 0.02  # total variation
    # over seeds at one position too (each seed's noise is its own)
    counts = torch.bincount(
        torch.tensor([Sampler(SamplingParams(temperature=1.0, seed=s))(logits, 0) for s in range(n)]), minlength=4
    )
    assert float((counts.double() / n - want).abs().sum()) / 2 < 0.02


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_any_non_finite_logit_is_caught(bad):
    logits = torch.randn(1000)
    logits[637] = bad
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        check_logits(logits)
    logits[637], logits[12] = float("inf"), float("-inf")  # together: a NaN sum
    with pytest.raises(CheckpointError):
        check_logits(logits)


def test_finite_logits_whose_float32_sum_overflows_pass():
    check_logits(torch.full((8,), 3e38))  # beyond float32, not float64
    check_logits(torch.randn(32000))
    assert greedy_tokens(torch.tensor([[1.0, 3e38, 3e38], [3e38, 2.0, -3e38]])) == [1, 0]


def test_greedy_tokens_check_every_row():
    logits = torch.randn(3, 50)
    assert greedy_tokens(logits) == torch.argmax(logits, dim=-1).tolist()
    logits[1, 7] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        greedy_tokens(logits)


def test_a_temperature_too_small_to_divide_by_is_greedy():
    """Below 0.0001, logits / T overflows float32 and the softmax is the argmax anyway: such
    a temperature decodes greedily (an OpenAI client's 1e-5 is valid) instead of failing."""
    from moespeq_cli.errors import UsageError

    p = SamplingParams(temperature=1e-5, seed=0)
    assert p.greedy and Sampler(p)(torch.tensor([1.0, 3.0, 2.0]), 0) == 1
    assert not SamplingParams(temperature=1e-4).greedy
    with pytest.raises(UsageError, match="0 \\(greedy\\) to 100"):
        SamplingParams(temperature=101)


def test_seeds_and_positions_draw_their_own_noise():
    """Every bit of a 64-bit seed counts (a generator seeded per position takes 32 of
    them, so seeds s and s + 2**32 drew alike and positions of one run could share noise),
    and a token's draw is the same whether the race runs over the vocabulary or a nucleus."""
    from moespeq_cli.runtime.sampling import exp_noise, position_key, race

    logits = torch.zeros(1000)  # uniform: the noise alone decides
    params = [SamplingParams(temperature=1.0, seed=s) for s in (5, 5 + 2**32)]
    a, b = ([Sampler(p)(logits, i) for i in range(50)] for p in params)
    assert a != b
    keys = {position_key(0, i) for i in range(100_000)}
    assert len(keys) == 100_000
    draws = exp_noise(position_key(3, 7), np.arange(1000))
    assert abs(draws.mean() - 1.0) < 0.1 and draws.min() > 0
    nucleus = torch.zeros(1000)
    nucleus[[3, 500, 999]] = torch.tensor([0.2, 0.3, 0.5])
    winner = race(nucleus, position_key(3, 7))
    others = [3, 500, 999]
    want = others[int(np.argmax(nucleus.numpy()[others] / draws[others]))]
    assert winner == want
