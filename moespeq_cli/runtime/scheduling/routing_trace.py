"""RoutingTrace: what the target's routers chose so far, and the misses plain decoding
would meet with more expert slots.

Whether to give the draft's device memory to expert slots (docs/design.md §2, docs/governor.md)
turns on one number: how many experts a token decoded without speculation would find
missing with ``spare_slots`` more slots. Measuring it takes k = 0 cycles, one token each,
and a handful of them is a noisy count (on a uniform router a token's misses vary by a
third from one token to the next). Every token the target has routed -- the prompt's,
and every verified one -- says something about it, so this class keeps them:

* **per-expert counts** -- with CPU experts a miss is computed on the CPU and never
  copied, so the resident set stays what was placed; a token's expected misses are the
  routing rates of the experts outside it (smoothed towards uniform routing by one
  pseudo-token per layer);
* **an LRU stack** -- without them every miss is copied into the least recently used
  slot. Replaying each token's choices in decoding order (layer by layer, one token
  after the other, as k = 0 decodes them) through one LRU stack shared by all layers,
  as the cache is, gives each access its stack distance: it misses with C slots exactly
  when its distance exceeds C (Mattson et al., 1970: one pass yields the misses for every
  cache size). Routing skew, locality and the cyclic walk over the layers are in the
  distances; a rate-based model sees only the first.

With ``sizes`` (the slots now and with the draft released) the trace also tallies how
many of each token's experts one layer misses at each size: the stall a layer's copies
leave depends on how many queue on the link at once, not on the token's total alone
(``governor.queued_stall_ratio``).

Distances beyond ``depth`` (the most slots the governor asks about) count as far. A
distance is the number of distinct keys used since the key's last use, plus one: a
Fenwick tree over access times, holding a 1 at each key's latest access, gives it in
O(log n) per routed expert (a list scan of the stack cost O(depth): at Qwen3's slot
counts, hundreds of thousands of comparisons per token).
"""

from __future__ import annotations

from collections import Counter

Key = tuple[int, int]  # (layer, expert)


class RoutingTrace:
    def __init__(
        self,
        layers: list[int],
        num_experts: int,
        top_k: int,
        depth: int,
        resident: list[Key] = (),
        sizes: tuple[int, int] | None = None,
    ):
        self.layers, self.num_experts, self.top_k, self.depth = list(layers), num_experts, top_k, depth
        self.sizes = sizes
        # (misses with sizes[0] slots, with sizes[1]) of one token at one layer -> how often
        self.layer_misses: Counter[tuple[int, int]] = Counter()
        self.counts: Counter[Key] = Counter()
        self.tokens = 0  # tokens routed through every MoE layer
        self.accesses = 0  # replayed (layer, expert) accesses
        self.far = 0  # ... whose stack distance exceeds ``depth`` (first uses included)
        self.distance: Counter[int] = Counter()  # stack distance -> accesses
        # What is resident at the start, oldest first: a warm cache is no cold miss.
        self._recency = _Recency()
        for key in list(resident)[-depth:] if depth else []:
            self._recency.use(key)
        self._pass: dict[int, list[list[int]]] = {}
        # gate-prefetch's guesses (the next layer's router on this layer's input): layer ->
        # the experts guessed for it, and how many of the experts routed there were guessed
        self._guess: dict[int, set[int]] = {}
        self.guessed = 0
        self.guess_lookups = 0

    # -- recording ---------------------------------------------------------------
    def record(self, layer: int, rows: list[list[int]]) -> None:
        """One MoE layer of a target pass: each token's chosen experts. A pass is
        replayed token-major once its last MoE layer has been recorded."""
        self._pass[layer] = rows
        guess = self._guess.pop(layer, None)
        if guess is not None:
            routed = {e for row in rows for e in row}
            self.guessed += len(routed & guess)
            self.guess_lookups += len(routed)
        if layer == self.layers[-1]:
            self._replay()

    def guess(self, layer: int, experts: list[int]) -> None:
        """Gate-prefetch's guess of ``layer``'s experts, made before it routes."""
        self._guess[layer] = set(experts)

    def guess_recall(self) -> float | None:
        """The share of routed experts gate-prefetch guessed a layer early (None before
        any guess met its layer)."""
        return self.guessed / self.guess_lookups if self.guess_lookups else None

    def _replay(self) -> None:
        per_layer = [(layer, self._pass[layer]) for layer in self.layers if layer in self._pass]
        self._pass = {}
        if not per_layer:
            return
        n = min(len(rows) for _, rows in per_layer)
        for t in range(n):
            for layer, rows in per_layer:
                missed = [0, 0]
                for e in rows[t]:
                    self.counts[(layer, e)] += 1
                    d = self._access((layer, e))
                    if self.sizes is not None:
                        for i, size in enumerate(self.sizes):
                            missed[i] += d is None or d > size
                if self.sizes is not None:
                    self.layer_misses[(missed[0], missed[1])] += 1
        self.tokens += n

    def _access(self, key: Key) -> int | None:
        """Replay one access; its stack distance (None: first use)."""
        self.accesses += 1
        d = self._recency.use(key)
        if d is None or d > self.depth:
            self.far += 1
        else:
            self.distance[d] += 1
        return d

    # -- the models -----------------------------------------------------------------
    def lru_misses(self, slots: int) -> float | None:
        """Expected misses per token decoded one at a time with ``slots`` LRU slots
        (at most ``depth``); None before any token."""
        if not self.tokens:
            return None
        if slots > self.depth:
            raise ValueError(f"the trace keeps stack distances up to {self.depth}, not {slots}")
        beyond = self.far + sum(n for d, n in self.distance.items() if d > slots)
        return beyond / self.tokens

    def rate(self, key: Key) -> float:
        """Tokens choosing this expert per token, with one pseudo-token per layer routed
        uniformly (an expert never seen yet is not taken as never used)."""
        prior = self.top_k / self.num_experts
        return (self.counts[key] + prior) / (self.tokens + 1)

    def static_misses(self, resident: set[Key]) -> float:
        """Expected misses per token when exactly ``resident`` stays on the device."""
        return sum(self.rate((layer, e)) for layer in self.layers for e in range(self.num_experts)) - sum(
            self.rate(k) for k in resident if k[0] in self.layers
        )

    def most_routed(self, n: int, exclude: set[Key]) -> list[Key]:
        """The ``n`` experts chosen most often so far, outside ``exclude`` (ties: lower
        layer, then lower expert id)."""
        keys = [(layer, e) for layer in self.layers for e in range(self.num_experts) if (layer, e) not in exclude]
        keys.sort(key=lambda k: (-self.counts[k], k))
        return keys[:n]


class _Recency:
    """LRU stack distances in O(log n): ``use(key)`` returns how many distinct keys were
    used since ``key``'s last use, plus one (1: it was the last one used), or None on its
    first use. Access times index a Fenwick tree holding a 1 at each key's latest use;
    when the times run out the latest uses are renumbered in order into a fresh tree."""

    def __init__(self, capacity: int = 1024):
        self.last: dict[Key, int] = {}
        self.now = 0
        self.tree = [0] * (capacity + 1)

    def _add(self, i: int, v: int) -> None:
        i += 1
        while i < len(self.tree):
            self.tree[i] += v
            i += i & -i

    def _prefix(self, i: int) -> int:
        """The sum over times [0, i)."""
        total = 0
        while i > 0:
            total += self.tree[i]
            i -= i & -i
        return total

    def use(self, key: Key) -> int | None:
        if self.now + 1 >= len(self.tree):
            self._compact()
        prev = self.last.get(key)
        distance = None
        if prev is not None:
            distance = self._prefix(self.now) - self._prefix(prev + 1) + 1
            self._add(prev, -1)
        self.last[key] = self.now
        self._add(self.now, 1)
        self.now += 1
        return distance

    def _compact(self) -> None:
        order = sorted(self.last, key=self.last.__getitem__)
        self.tree = [0] * (max(1024, 4 * len(order)) + 1)
        self.last, self.now = {}, 0
        for key in order:
            self.last[key] = self.now
            self._add(self.now, 1)
            self.now += 1
