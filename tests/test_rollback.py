"""KV cache truncation: rolling back n positions and decoding again is a fresh run."""

import pytest
import torch

from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.loader import load_model
from moespeq_cli.runtime.executors.experts import InMemoryExperts


@pytest.mark.parametrize(
    "family,variant",
    [
        ("mixtral", "gqa"),
        ("deepseek_v2", "lite"),
        ("qwen3_moe", "base"),
        ("qwen3_next", "hybrid"),
        ("gpt_oss", "alternating"),
        ("gemma4", "kv_eq"),
    ],
)
@pytest.mark.parametrize("n", [1, 3, 7])
def test_truncate_then_decode_equals_fresh(tiny, family, variant, n):
    path, _ = tiny(family, variant)
    ck = Checkpoint(path)
    model = load_model(ck)
    model.set_experts(InMemoryExperts(ck, ck.config.dtype))
    g = torch.Generator().manual_seed(n)
    prompt = torch.randint(3, 200, (12,), generator=g)
    wrong = torch.randint(3, 200, (8,), generator=g)
    right = torch.randint(3, 200, (5,), generator=g)

    cache = model.new_cache()
    model(prompt, cache)
    cache.keep_from(12)  # as speculative decoding does at a cycle's start (linear attention's states)
    model(wrong[:4], cache)  # a verification-style pass over several tokens
    for t in wrong[4:]:
        model(t[None], cache)  # then single-token steps
    cache.truncate(12 + 8 - n)
    cache.truncate(12)  # truncation composes
    rolled = model(right, cache)

    fresh_cache = model.new_cache()
    model(prompt, fresh_cache)
    fresh_cache.keep_from(12)  # the same kind of pass (linear attention's steps, not a prompt's chunks)
    fresh = model(right, fresh_cache)
    assert torch.equal(rolled, fresh) or float((rolled - fresh).abs().max()) < 1e-5
    assert cache.length == fresh_cache.length == 17


def test_truncate_rejects_growth(tiny):
    from moespeq_cli.models.base import KVCache

    c = KVCache(2)
    c.length = 4
    with pytest.raises(ValueError):
        c.truncate(5)


def test_kv_cache_grows_to_the_planned_context_not_past_it():
    """Doubling stops at the context the plan reserved (a 100-token context: 64 -> 100,
    not 128); a write beyond it still gets exactly the room it needs."""
    from moespeq_cli.models.base import KVCache

    def append(c, n):
        k = torch.zeros(1, n, 4)
        c.write(0, k, k)
        c.length += n

    capped, free = KVCache(1, capacity=100), KVCache(1)
    for c in (capped, free):
        append(c, 60)
        append(c, 10)
    assert capped.k[0].shape[1] == 100 and free.k[0].shape[1] == 128
    append(capped, 35)
    assert capped.k[0].shape[1] == 105


def test_loaded_model_caps_its_cache_at_the_context(tiny):
    from moespeq_cli.models import build_model
    from moespeq_cli.models.checkpoint import Checkpoint

    ck = Checkpoint(tiny("mixtral", "top3")[0])
    assert build_model(ck.arch, ck.raw_config, 77).new_cache().capacity == 77


def test_linear_attention_keeps_only_what_a_rollback_can_reach(tiny):
    """Without keep_from, a linear-attention layer holds only its newest state (plain
    decoding never rolls back); with it, every state from that position on, and a
    truncation drops the states past its target."""
    path, _ = tiny("qwen3_next", "hybrid")
    ck = Checkpoint(path)
    model = load_model(ck)
    model.set_experts(InMemoryExperts(ck, ck.config.dtype))
    cache = model.new_cache()
    model(torch.arange(3, 13), cache)
    assert all(list(h) == [10] for h in cache.states.values()) and len(cache.states) == 2
    cache.keep_from(10)
    model(torch.arange(20, 24), cache)
    assert all(sorted(h) == [10, 11, 12, 13, 14] for h in cache.states.values())
    cache.truncate(12)
    assert all(sorted(h) == [10, 11, 12] for h in cache.states.values())
