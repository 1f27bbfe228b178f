"""KV cache truncation: rolling back n positions and decoding again is a fresh run."""

import pytest
import torch

from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.loader import load_model
from moespeq_cli.runtime.executors.experts import InMemoryExperts


@pytest.mark.parametrize("family,variant", [("mixtral", "gqa"), ("deepseek_v2", "lite"), ("qwen3_moe", "base")])
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
    model(wrong[:4], cache)  # a verification-style pass over several tokens
    for t in wrong[4:]:
        model(t[None], cache)  # then single-token steps
    cache.truncate(12 + 8 - n)
    cache.truncate(12)  # truncation composes
    rolled = model(right, cache)

    fresh_cache = model.new_cache()
    model(prompt, fresh_cache)
    fresh = model(right, fresh_cache)
    assert torch.equal(rolled, fresh) or float((rolled - fresh).abs().max()) < 1e-5
    assert cache.length == fresh_cache.length == 17


def test_truncate_rejects_growth(tiny):
    from moespeq_cli.models.base import KVCache

    c = KVCache(2)
    c.length = 4
    with pytest.raises(ValueError):
        c.truncate(5)
