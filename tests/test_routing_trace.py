"""RoutingTrace: the misses plain decoding would meet, from the routed tokens."""

import random
from collections import OrderedDict

import pytest

from moespeq_cli.runtime.scheduling.routing_trace import RoutingTrace

LAYERS, EXPERTS, TOP_K = [1, 3, 5], 8, 2


def lru_misses(accesses, slots, warm):
    """A plain LRU cache of ``slots`` keys, started with ``warm`` resident (oldest first)."""
    cache = OrderedDict((k, None) for k in warm[-slots:])
    misses = 0
    for key in accesses:
        if key in cache:
            cache.move_to_end(key)
        else:
            misses += 1
            cache[key] = None
            if len(cache) > slots:
                cache.popitem(last=False)
    return misses


def skewed_passes(seed, n_passes):
    """Passes of 1-5 tokens, routing skewed towards low expert ids."""
    rng = random.Random(seed)
    weights = [2.0**-e for e in range(EXPERTS)]
    passes = []
    for _ in range(n_passes):
        n = rng.randint(1, 5)
        passes.append(
            {
                layer: [
                    rng.sample(range(EXPERTS), TOP_K) if rng.random() < 0.3 else _top(rng, weights) for _ in range(n)
                ]
                for layer in LAYERS
            }
        )
    return passes


def _top(rng, weights):
    chosen = []
    while len(chosen) < TOP_K:
        e = rng.choices(range(EXPERTS), weights)[0]
        if e not in chosen:
            chosen.append(e)
    return chosen


@pytest.mark.parametrize("seed", [0, 1])
def test_stack_distances_give_lru_misses_for_every_cache_size(seed):
    """Replayed token by token, layer by layer, the trace's misses at every slot count up
    to its depth equal those of an LRU cache simulated for that slot count alone."""
    passes = skewed_passes(seed, 40)
    warm = [(layer, e) for layer in LAYERS for e in range(2)]
    depth = 18
    trace = RoutingTrace(LAYERS, EXPERTS, TOP_K, depth, warm)
    accesses = []
    for p in passes:
        n = len(p[LAYERS[0]])
        for t in range(n):
            accesses += [(layer, e) for layer in LAYERS for e in p[layer][t]]
        for layer in LAYERS:
            trace.record(layer, p[layer])
    tokens = sum(len(p[LAYERS[0]]) for p in passes)
    assert trace.tokens == tokens and trace.accesses == len(accesses)
    for slots in range(1, depth + 1):
        assert trace.lru_misses(slots) == pytest.approx(lru_misses(accesses, slots, warm) / tokens), slots
    misses = [trace.lru_misses(s) for s in range(1, depth + 1)]
    assert misses == sorted(misses, reverse=True) and misses[0] > misses[-1]
    # each token's misses at each layer, tallied at two sizes: they add up to the token
    # totals, and a layer never misses more with more slots (LRU's inclusion property)
    sized = RoutingTrace(LAYERS, EXPERTS, TOP_K, depth, warm, sizes=(6, depth))
    for p in passes:
        for layer in LAYERS:
            sized.record(layer, p[layer])
    tally = sized.layer_misses
    assert sum(tally.values()) == tokens * len(LAYERS)
    assert sum(a * n for (a, _), n in tally.items()) / tokens == pytest.approx(trace.lru_misses(6))
    assert sum(b * n for (_, b), n in tally.items()) / tokens == pytest.approx(trace.lru_misses(depth))
    assert all(b <= a <= TOP_K for a, b in tally) and any(b < a for a, b in tally)
    with pytest.raises(ValueError):
        trace.lru_misses(depth + 1)


def test_a_pass_is_replayed_once_its_last_moe_layer_is_recorded():
    trace = RoutingTrace(LAYERS, EXPERTS, TOP_K, depth=8)
    assert trace.lru_misses(4) is None
    trace.record(1, [[0, 1], [2, 3]])
    trace.record(3, [[0, 1], [2, 3]])
    assert trace.tokens == 0  # layer 5 not yet seen
    trace.record(5, [[0, 1], [2, 3]])
    assert trace.tokens == 2 and trace.counts[(3, 2)] == 1 and trace.counts[(5, 0)] == 1
    # token-major: token 0's six keys, then token 1's; a cold trace misses all twelve
    assert trace.far == 12 and trace.lru_misses(8) == pytest.approx(6.0)


def test_static_misses_and_the_most_routed_experts():
    """With CPU experts the resident set stays put: a token misses the routing rate of
    every expert outside it (one uniformly routed pseudo-token keeps unseen experts above
    zero); the slots gained at release take the most routed experts."""
    trace = RoutingTrace([0], 4, 2, depth=4)
    for rows in ([[0, 1]], [[0, 1]], [[0, 2]], [[0, 1]]):
        trace.record(0, rows)
    prior = 2 / 4
    rate = {e: (c + prior) / (4 + 1) for e, c in {0: 4, 1: 3, 2: 1, 3: 0}.items()}
    assert trace.rate((0, 3)) == pytest.approx(rate[3]) and rate[3] > 0
    assert trace.static_misses(set()) == pytest.approx(sum(rate.values()))
    assert sum(rate.values()) == pytest.approx(2.0)
    assert trace.static_misses({(0, 0), (0, 1)}) == pytest.approx(rate[2] + rate[3])
    assert trace.most_routed(2, exclude={(0, 0)}) == [(0, 1), (0, 2)]
    assert trace.most_routed(9, exclude=set()) == [(0, 0), (0, 1), (0, 2), (0, 3)]


def test_stack_distances_match_a_plain_lru_stack():
    """The Fenwick-tree distances equal a list-scanned LRU stack's, across renumberings."""
    import random

    from moespeq_cli.runtime.scheduling.routing_trace import _Recency

    rng = random.Random(0)
    recency, stack = _Recency(capacity=16), []
    for _ in range(5000):
        key = (rng.randrange(6), rng.randrange(30))
        expected = None
        if key in stack:
            i = stack.index(key)
            expected = len(stack) - i
            del stack[i]
        stack.append(key)
        assert recency.use(key) == expected
