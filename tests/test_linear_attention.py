"""Linear attention's two forms (models/qwen3_next.py): a prompt solved a chunk at a time,
every other pass token by token, the same recurrence."""

import pytest
import torch
import torch.nn.functional as F
from test_parity import ours, reference_and_ours, rel_err

from moespeq_cli.models import qwen3_next
from moespeq_cli.models.qwen3_next import CHUNK, delta_chunks, delta_steps


def delta_inputs(T: int, decay_scale: float, seed: int, nv=4, dk=16, dv=8):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(T, nv, dk, generator=g), dim=-1) / dk**0.5
    k = F.normalize(torch.randn(T, nv, dk, generator=g), dim=-1)
    v = torch.randn(T, nv, dv, generator=g)
    beta = torch.rand(T, nv, generator=g)
    log_decay = -torch.rand(T, nv, generator=g) * decay_scale
    S = torch.randn(nv, dk, dv, generator=g) * 0.3
    return q, k, v, beta, log_decay, S


@pytest.mark.parametrize("T", [2, CHUNK - 1, CHUNK, 2 * CHUNK + 22])
@pytest.mark.parametrize("decay_scale", [0.0, 0.5, 40.0], ids=["no-decay", "decay", "forgets"])
def test_the_chunked_form_is_the_token_by_token_recurrence(T, decay_scale):
    q, k, v, beta, log_decay, S = delta_inputs(T, decay_scale, seed=T)
    want, states = delta_steps(q, k, v, beta, log_decay.exp(), S, keep=lambda t: t == T - 1)
    got, last = delta_chunks(q, k, v, beta, log_decay, S)
    assert rel_err(got, want) < 1e-5
    assert rel_err(last, states[T - 1]) < 1e-5
    assert torch.isfinite(got).all() and torch.isfinite(last).all()


@pytest.mark.parametrize("family,variant", [("qwen3_next", "hybrid"), ("qwen3_5_moe", "text")])
def test_a_long_prompt_is_solved_in_chunks_and_matches_the_reference(tiny, monkeypatch, family, variant):
    """A 150-token prompt (three chunks, the last partial) in one pass, then tokens over the
    cache (those by steps): the reference's logits."""
    calls = []
    chunks = qwen3_next.delta_chunks
    monkeypatch.setattr(qwen3_next, "delta_chunks", lambda *a: calls.append(a[0].shape[0]) or chunks(*a))
    path, ref = tiny(family, variant)
    model = ours(path)
    ids = torch.randint(3, 200, (154,), generator=torch.Generator().manual_seed(4))
    expected, got = reference_and_ours(ref, model, ids, 150)
    assert rel_err(got, expected) < 1e-4
    linear = sum(isinstance(layer.attn, qwen3_next.GatedDeltaNet) for layer in model.model.layers)
    assert linear and calls == [150] * linear  # the prompt by chunks, each decoded token by steps


def test_a_pass_that_may_roll_back_goes_token_by_token(tiny, monkeypatch):
    """A speculative cycle's passes keep a state per token (any prefix may be accepted): the
    chunked form, which gives only the last, is not taken for them."""
    monkeypatch.setattr(qwen3_next, "delta_chunks", lambda *a: pytest.fail("chunked a pass that keeps its states"))
    path, _ = tiny("qwen3_next", "hybrid")
    model = ours(path)
    cache = model.new_cache()
    ids = torch.arange(3, 13)
    model(ids[:1], cache)
    cache.keep_from(1)
    model(ids[1:], cache)
    cache.truncate(5)  # a rejected tail rolled back: the state after token 5 was kept
    assert cache.length == 5


def test_an_infinite_decay_forgets_as_the_steps_do():
    """A log-decay of -inf (exp(A_log) overflowing in a damaged checkpoint): the steps
    forget the state (decay 0), the chunks made -inf - -inf, NaN."""
    q, k, v, beta, log_decay, S = delta_inputs(70, 0.5, seed=3)
    log_decay[5, 1] = log_decay[66, 0] = float("-inf")
    want, states = delta_steps(q, k, v, beta, log_decay.exp(), S, keep=lambda t: t == 69)
    got, last = delta_chunks(q, k, v, beta, log_decay, S)
    assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5 and rel_err(last, states[69]) < 1e-5
