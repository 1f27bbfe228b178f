"""Sliding-window layers (gpt-oss's every other layer, Gemma 4's local ones) hold only the
positions their window and a rollback can reach (models/base.py KVCache), however long
the context: the same logits as a cache that holds everything, rollbacks as before, a
long pass (a prefill) kept to its tail, and a plan that counts what is held.

``ROLLBACK`` (65 positions: the deepest speculation cycle) is lowered here so that tiny
models with windows of 3 and 4 drop positions within a few dozen tokens."""

import pytest
import torch

from moespeq_cli.models import base
from moespeq_cli.models.base import KVCache, window_keep
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.models.loader import load_model
from moespeq_cli.runtime.engine import Engine, EngineOptions
from moespeq_cli.runtime.executors.experts import InMemoryExperts
from moespeq_cli.runtime.generate import generate
from moespeq_cli.runtime.planning.planner import kv_cache_bytes
from moespeq_cli.runtime.sampling import SamplingParams

WINDOWED = [("gpt_oss", "alternating"), ("gemma4", "alternating")]


def loaded(path, cpu_kernels):
    if cpu_kernels:  # the cpu backend: its kernels, the weights as stored
        eng = Engine(path, EngineOptions(backend="cpu"))
        eng.load(512)
        return eng.model
    ck = Checkpoint(path)
    model = load_model(ck)
    model.set_experts(InMemoryExperts(ck, ck.config.dtype))
    return model


def whole(model, ids):
    """Every position's logits from one pass over a cache that drops nothing."""
    return model(ids, KVCache(len(model.model.layers)))


def close(a, b):
    return float((a - b).abs().max() / b.abs().max()) < 1e-5


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["torch", "kernels"])
@pytest.mark.parametrize("family,variant", WINDOWED)
def test_a_window_layer_holds_its_bound_and_gives_the_whole_cache_s_logits(
    tiny, monkeypatch, family, variant, cpu_kernels
):
    monkeypatch.setattr(base, "ROLLBACK", 2)
    path, _ = tiny(family, variant)
    model = loaded(path, cpu_kernels)
    windows = model.windows()
    assert windows and len(windows) < len(model.model.layers)  # some layers windowed, some not
    ids = torch.randint(3, 200, (60,), generator=torch.Generator().manual_seed(3))
    want = whole(model, ids)
    cache = model.new_cache()
    got = [model(ids[:14], cache)]  # a pass longer than a window layer keeps (a prefill)
    for i, w in windows.items():
        assert cache.k[i].shape[1] <= 2 * window_keep(w) and cache.offset(i) == 0
    n = 14
    while n < 60:
        T = 12 if n == 30 else 1 if n % 3 else 3  # single steps, verification-sized blocks, a long pass
        T = min(T, 60 - n)
        got.append(model(ids[n : n + T], cache))
        n += T
        for i, w in windows.items():
            assert cache.k[i].shape[1] <= 2 * window_keep(w), (i, n)
    for i, w in windows.items():
        assert cache.offset(i) > 0 and cache.offset(i) >= 60 - 2 * window_keep(w)
    for i in set(range(len(model.model.layers))) - set(windows):
        assert cache.offset(i) == 0 and cache.k[i].shape[1] >= 60
    assert close(torch.cat(got), want)


@pytest.mark.parametrize("family,variant", WINDOWED)
def test_a_rollback_within_reach_decodes_as_if_the_tokens_never_came(tiny, monkeypatch, family, variant):
    monkeypatch.setattr(base, "ROLLBACK", 4)
    path, _ = tiny(family, variant)
    model = loaded(path, False)
    ids = torch.randint(3, 200, (50,), generator=torch.Generator().manual_seed(4))
    wrong = torch.randint(3, 200, (5,), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache()
    model(ids[:10], cache)
    rows = []
    for n in range(10, 50):
        for t in wrong:  # a draft of five tokens, one at a time: the last written ROLLBACK past n
            model(t[None], cache)
        assert cache.can_truncate(n)
        cache.truncate(n)
        model(wrong[:3], cache)  # then a verification pass from n, all rejected
        cache.truncate(n)
        rows.append(model(ids[n : n + 1], cache))
    assert any(cache.offset(i) > 0 for i in model.windows())
    assert close(torch.cat(rows), whole(model, ids)[10:])


def test_a_cache_refuses_a_rollback_past_what_its_windows_hold(tiny, monkeypatch):
    monkeypatch.setattr(base, "ROLLBACK", 2)
    path, _ = tiny("gpt_oss", "alternating")
    model = loaded(path, False)
    cache = model.new_cache()
    model(torch.randint(3, 200, (40,), generator=torch.Generator().manual_seed(6)), cache)
    model(torch.tensor([7]), cache)  # the write that drops what the window passed
    assert not cache.can_truncate(5)
    with pytest.raises(ValueError, match="sliding-window"):
        cache.truncate(5)
    assert cache.can_truncate(0) and cache.can_truncate(41)
    cache.truncate(0)  # everything: the buffers start over at position 0
    assert all(cache.offset(i) == 0 for i in range(len(cache.base)))
    ids = torch.randint(3, 200, (12,), generator=torch.Generator().manual_seed(7))
    assert close(model(ids, cache), whole(model, ids))


def test_a_conversation_s_cache_is_reused_only_where_its_windows_hold_the_prefix(tiny, monkeypatch):
    """chat and serve reuse the previous turn's cache from the prompt's shared prefix;
    where a sliding-window layer has dropped positions a query there would see, they start
    over from a new cache (and the answer is the same)."""
    monkeypatch.setattr(base, "ROLLBACK", 2)
    path, _ = tiny("gpt_oss", "alternating")
    eng = Engine(path, EngineOptions(backend="cpu"))
    eng.load(256)
    first = list(range(3, 43))
    answer = [ev.token for ev in eng.generate(first, 6, SamplingParams(), reuse=True)]
    longer = first + answer + [9, 10]
    cache = eng.reusable_cache(longer)
    assert cache.length == len(first) + len(answer) - 1  # all it holds but the last answer token's
    eng._kept = (cache, longer[: cache.length])
    edited = first[:5] + [99] + first[6:]  # an early message edited: a prefix the windows passed
    assert eng.reusable_cache(edited).length == 0
    fresh = [ev.token for ev in generate(eng.model, edited, 6, SamplingParams())]
    again = [ev.token for ev in eng.generate(edited, 6, SamplingParams(), reuse=True)]
    assert again == fresh


def test_the_plan_counts_what_a_window_layer_holds(tiny):
    """`plan`'s KV cache is what the cache comes to hold: decoded to 300 tokens in single
    steps and verification-sized blocks, the buffers hold no more than it counts and the
    windowed ones no less than their bound's worth less a pass (they drop when past it)."""
    path, _ = tiny("gpt_oss", "alternating")
    model = loaded(path, False)
    model.context = 300  # the context a run plans and loads for: the cache's cap
    windows = model.windows()
    ids = torch.randint(3, 200, (300,), generator=torch.Generator().manual_seed(11))
    cache = model.new_cache()
    model(ids[:40], cache)
    n = 40
    while n < 300:
        T = 1 if n % 5 else 5
        model(ids[n : n + T], cache)
        n += T
    elem = cache.k[0].element_size()
    held = {i: cache.k[i].numel() + cache.v[i].numel() for i in range(len(model.model.layers))}
    per = {i: held[i] // cache.k[i].shape[1] for i in held}  # elements a position
    assert sum(held.values()) * elem <= kv_cache_bytes(model, elem, 300)
    for i, w in windows.items():
        assert 2 * window_keep(w) - 5 <= cache.k[i].shape[1] <= 2 * window_keep(w)
    for i in set(held) - set(windows):
        assert cache.k[i].shape[1] >= 300
    everything = sum(per.values()) * 300 * elem
    assert kv_cache_bytes(model, elem, 300) < everything


def test_the_mock_prices_a_window_layer_s_attention_over_what_it_holds(tiny):
    from moespeq_cli.runtime.executors.instrument import charges

    path, _ = tiny("gpt_oss", "alternating")
    model = loaded(path, False)
    windows = model.windows()
    seen = set()
    for _module, _name, layer, cost, reads_cache in charges(model, 4):
        if not reads_cache:
            continue
        seen.add(layer)
        held = 2 * window_keep(windows.get(layer, 1))
        if layer in windows:
            assert cost(1, 100_000).flops == cost(1, held).flops
        else:
            assert cost(1, 100_000).flops > cost(1, held).flops
    assert seen & set(windows) and seen - set(windows)


def test_a_buffer_still_growing_keeps_the_bound_when_a_pass_would_pass_it(tiny):
    """With the real ROLLBACK (a bound of 136 positions for a window of 4): passes of 60
    grow the buffer 64 -> 128; the third would have grown it to 180 past the bound (it
    dropped positions only once the buffer had reached it)."""
    path, _ = tiny("gpt_oss", "alternating")
    model = loaded(path, False)
    ids = torch.randint(3, 200, (180,), generator=torch.Generator().manual_seed(10))
    cache = model.new_cache()
    got = [model(ids[i : i + 60], cache) for i in range(0, 180, 60)]
    for i, w in model.windows().items():
        assert cache.k[i].shape[1] <= 2 * window_keep(w) and cache.offset(i) > 0
    assert close(torch.cat(got), whole(model, ids))


def test_a_window_as_long_as_the_context_is_held_as_any_layer(tiny):
    """A window whose bound reaches the context the model was loaded for drops nothing:
    such a layer is no sliding-window layer to the cache (the one-call pass of the cpu
    backend stays on for it)."""
    path, _ = tiny("gpt_oss", "alternating")
    short = Engine(path, EngineOptions(backend="cpu"))
    short.load(100)  # 2 * (4 - 1 + 65) = 136 >= 100
    assert short.model.windows() == {} and short.model.new_cache().windows == {}
    long = Engine(path, EngineOptions(backend="cpu"))
    long.load(512)
    assert long.model.windows()


def test_gpt_oss_attends_a_prompt_in_tiles_of_query_rows_with_the_same_logits(tiny, monkeypatch):
    """gpt-oss's attention (its sinks: the torch path of mock and cuda) held a prompt's
    scores whole, [heads, T, L]: 34 GiB for gpt-oss-20b at 16K tokens. In tiles of query
    rows (each group's heads as one head's rows, no copy of the cache per head), over the
    whole-cache and the windowed layers, the logits are the same."""
    from moespeq_cli.models import gpt_oss

    path, _ = tiny("gpt_oss", "alternating")
    model = loaded(path, False)
    ids = torch.randint(3, 200, (40,), generator=torch.Generator().manual_seed(5))
    want = whole(model, ids)
    heads = model.model.layers[0].attn.s.heads
    monkeypatch.setattr(base, "MASK_ELEMS", heads * 40 * 3)  # tiles of three rows
    tiles = []
    real = gpt_oss.causal_mask
    monkeypatch.setattr(gpt_oss, "causal_mask", lambda start, T, *a: tiles.append((start, T)) or real(start, T, *a))
    got = whole(model, ids)
    assert (0, 3) in tiles and (39, 1) in tiles  # the prompt's rows went in tiles, the last alone
    assert close(got, want)
