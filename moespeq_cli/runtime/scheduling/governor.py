"""The speculative governor: picks the draft depth k each cycle by the Amortization
Roofline Model (docs/design.md §2, docs/governor.md).

    k_accept(k) = sum_{i=1..k} E[p^i]                    expected accepted draft tokens
    T_cycle(0)  = T_target(1) + T_io(0)                 plain decoding, exposed copies
    T_cycle(k)  = max(T_draft(k), T_io(k)) + T_target(k+1)   copies overlap the draft
    Theta(k)    = (k_accept(k) + 1) / T_cycle(k)
    k*          = argmax Theta(k) over [0, k_max]

With CPU experts (hybrid execution) a missing expert can also be computed on the CPU, but
only once verification has its activations: copies get the draft's time as a head start,
and what is left is served by the link and the CPU together,

    T_cycle(k)  = T_draft(k) + r / (1 / t_copy + 1 / t_host(n_e)) + T_target(k+1)
    r           = max(0, misses(k+1) - T_draft(k) / t_copy)

where ``t_host(n_e)`` is one expert on the CPU over the n_e = (k+1) top_k / union tokens
that share it (its weights are read once for all of them).

Every input is estimated online from what the cycles measure on the run's clock:
``p`` by a Beta posterior over every tested draft position (pooled; a weak prior of 0.8
that is never forgotten, older positions discounted), the expectation taken over it, so
two accepted drafts do not read as p = 1; ``T_draft(k) = k * t_draft``
(the per-token draft time), ``T_target(n)`` per number of verified tokens (missing n
interpolated linearly from measured ones), and ``T_io(k) = misses(k+1) * t_copy`` where
``misses(n)`` is the number of experts a verification over n tokens found not resident
(measured per n; for an unseen n it is scaled by the union growth of n tokens' experts
under independent routing, ``E (1 - (1 - K/E)^n)`` per layer). k = 0 is always a
candidate: where speculation cannot pay, the governor turns it off. Once cycles at a
depth have run, that depth is priced by what they measured: ``T_draft(k) + T_target(k+1)
+ stall(k+1)``, the stall being what the copies left exposed; k = 0 by its measured cycle.

k = 0 is plain decoding with the best non-speculative prefetch, and which one is best is
measured too: gate-prefetch hides copies but launches a router pass per layer, which a
small, launch-bound model does not earn back. Both arms run a few k = 0 cycles, then the
faster one (``Governor.choose_prefetch``).

Giving the draft's memory back: the draft's device memory could hold ``spare_slots``
more full-precision experts. Releasing it cannot be undone, so the comparison is made on
the steadiest evidence: k = 0 with those slots is the measured k = 0 cycle moved, by its
stall per miss, to the misses a token would meet with the extra slots (with a disk tier,
the draft's experts in host RAM go too: RAM then holds ``host_spare`` more experts, fewer
misses wait for a disk read, and the stall per miss shrinks as the miss's modelled cost,
``read_ratio``) -- counted on every token the target has routed so far
(``RoutingTrace``: LRU stack distances without CPU experts, routing rates outside the
resident set with them), not on the few k = 0 cycles
-- and every k >= 1 is priced with the acceptance of the whole run, not the discounted
window that picks k. When the released cycle beats every depth, the best depth has run at
least once, and the margin over the best depth that ran exceeds the noise of its few
cycles (``release_clear``; else that depth runs again, at most ``release_waits`` times),
the governor asks for the draft to be released; the run then decodes with k = 0 and the
bigger cache to the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


def queued_stall_ratio(tally: dict[tuple[int, int], int], per_miss: float, t_copy: float) -> float:
    """The stall per miss with the draft released over the stall per miss now, where a
    layer's copies queue on the link: a layer that misses m experts stalls ``max(0, m
    t_copy - hidden)``, ``hidden`` being the copy time its neighbours' compute covers (the
    same every layer), fit so that the layers as routed now (``tally``: (misses now,
    released) of one token at one layer -> how often) stall ``per_miss`` a miss. With
    fewer misses a layer, more of them hide: the ratio is below 1 (a fixed stall per miss
    is this with ``hidden`` = 0, what a stall per miss at or above ``t_copy`` means)."""
    now = sum(a * n for (a, _), n in tally.items())
    then = sum(b * n for (_, b), n in tally.items())
    if per_miss <= 0 or t_copy <= 0 or not now or not then or per_miss >= t_copy:
        return 1.0

    def stall_per_miss(hidden: float, i: int, misses: int) -> float:
        return sum(n * max(0.0, m[i] * t_copy - hidden) for m, n in tally.items()) / misses

    lo, hi = 0.0, max(a for a, _ in tally) * t_copy  # stall per miss now: t_copy at lo, 0 at hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if stall_per_miss(mid, 0, now) > per_miss else (lo, mid)
    return stall_per_miss(hi, 1, then) / per_miss


def off_ram_share(in_ram: int, total: int) -> float:
    """The share of experts host RAM does not hold: under uniform routing, of the misses
    that wait for a disk read first."""
    return max(0.0, 1.0 - in_ram / total) if total else 0.0


def union_size(n_tokens: int, num_experts: int, top_k: int) -> float:
    """Expected distinct experts chosen by n tokens in one layer, independent routing."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** n_tokens)


@dataclass
class Sums:
    """Compute, stall and misses summed over cycles (k = 0 cycles of an arm; a depth's
    verifications), and the cycles (their weights, and the weights' squares); ``fade``
    discounts them as later cycles come."""

    compute: float = 0.0
    stall: float = 0.0
    misses: float = 0.0
    cycles: float = 0.0
    squares: float = 0.0

    def add(self, compute: float, stall: float, misses: float) -> None:
        self.compute, self.stall, self.misses = self.compute + compute, self.stall + stall, self.misses + misses
        self.cycles += 1
        self.squares += 1

    def fade(self, factor: float) -> None:
        self.compute, self.stall, self.misses, self.cycles = (
            v * factor for v in (self.compute, self.stall, self.misses, self.cycles)
        )
        self.squares *= factor * factor

    @property
    def worth(self) -> float:
        """How many equally weighted cycles these discounted ones are worth: (sum of the
        weights)^2 / (sum of their squares), the count whose plain mean has the same
        variance. n for a few cycles; faded by d per later cycle, at most (1 + d) / (1 - d),
        39 at 0.95, however many ran."""
        return self.cycles * self.cycles / self.squares if self.squares else 0.0


@dataclass
class Arm:
    """k = 0 cycles of one prefetch arm: sums over all of them (``total``), the same sums
    discounted by the k = 0 cycles run since (``recent``), and the same again over its
    settled cycles only (``settled``: those right after a k = 0 cycle of the same arm, for
    ``GovernorState.arm_time``)."""

    total: Sums = field(default_factory=Sums)
    recent: Sums = field(default_factory=Sums)
    settled: Sums = field(default_factory=Sums)

    def add(self, compute: float, stall: float, misses: int, settled: bool = False) -> None:
        self.total.add(compute, stall, misses)
        self.recent.add(compute, stall, misses)
        if settled:
            self.settled.add(compute, stall, misses)

    @property
    def judged(self) -> Sums:
        """The cycles the arm is judged by: its settled ones once it has any."""
        return self.settled if self.settled.cycles else self.recent

    @property
    def mean_time(self) -> float:
        """Seconds per cycle (compute + stall), the mean of the judged cycles."""
        s = self.judged
        return (s.compute + s.stall) / s.cycles


@dataclass
class GovernorState:
    k_max: int
    num_experts: int
    top_k: int
    t_copy: float  # seconds to copy one full-precision expert (latency + bytes / bandwidth)
    alpha: float = 0.3  # EMA weight of a new observation
    p: list[float] = field(default_factory=list)  # acceptance per draft position (1-based -> index 0)
    tested: list[int] = field(default_factory=list)  # observations per position
    t_draft: float | None = None  # per drafted token
    t_target: dict[int, float] = field(default_factory=dict)  # n verified tokens -> compute seconds
    misses: dict[int, float] = field(default_factory=dict)  # n verified tokens -> experts not resident
    t_host: Callable[[float], float] | None = None  # one expert on the CPU over n tokens; None: no CPU path
    prior: float = 0.8  # acceptance assumed before any draft is tested ...
    prior_strength: float = 2.0  # ... worth this many tested positions
    decay: float = 0.99  # weight an older tested position keeps per newer one
    tested_accepted: float | None = None  # tested draft positions, discounted: accepted ...
    tested_rejected: float = 0.0  # ... and rejected (None: no draft tested yet)
    run_accepted: int = 0  # every tested draft position of the run, undiscounted: accepted ...
    run_rejected: int = 0  # ... and rejected
    slots: int = 0  # full-precision slots now
    spare_slots: int = 0  # slots the draft's device memory would add
    # with a disk tier: experts host RAM would hold more with the draft's host experts given
    # back (0: no gain), RAM's experts now, and a miss's two parts: the copy over the link
    # and the disk read it waits for when RAM does not hold the expert
    host_spare: int = 0
    host_slots: int = 0
    t_link: float = 0.0
    t_read: float = 0.0
    # disk reads per k = 0 token (now, with the draft released) from every routed token
    # (RoutingTrace); None: unknown (uniform routing is assumed)
    release_reads: Callable[[], tuple[float, float] | None] | None = None
    total_experts: int = 0
    arms: dict[bool, Arm] = field(default_factory=dict)  # k = 0 with (True) or without gate-prefetch
    stall: dict[int, float] = field(default_factory=dict)  # n verified tokens (n >= 2) -> stall per cycle
    release_misses: Callable[[], tuple[float, float] | None] | None = None  # k = 0 misses per token: now, released
    # (misses now, released) of one token at one MoE layer -> how often (RoutingTrace.layer_misses); None: unknown
    release_layers: Callable[[], dict[tuple[int, int], int] | None] | None = None
    # the share of routed experts gate-prefetch guessed a layer early (RoutingTrace); None: unknown
    release_recall: Callable[[], float | None] | None = None
    model_cycles: float = 8.0  # k = 0 cycles the miss model is worth beside the measured ones
    # seconds of each cycle after the run's first, per (k, prefetch arm of k = 0): how much
    # the same cycle varies from one to the next (``cycle_noise``)
    cycle_times: dict[tuple[int, bool], list[float]] = field(default_factory=dict)
    observed: int = 0  # cycles observed
    # experts the device's slots can take ahead of a verification (``moespeq plan``: its
    # slots); None: every predicted copy fits (the run measures what did not)
    prefetch_room: float | None = None
    last_arm: bool | None = None  # the prefetch arm of the last cycle if it was k = 0
    # per n >= 2 verified tokens: its cycles' compute and stall, discounted by ``arm_decay``
    # per later cycle of the same n (``_depth_mean``)
    depth_sums: dict[int, Sums] = field(default_factory=dict)
    # weight an arm's k = 0 cycle keeps per later k = 0 cycle (``arm_time``), and a depth's
    # cycle per later cycle at that depth (``_depth_mean``)
    arm_decay: float = 0.95

    def __post_init__(self):
        if not self.p:
            self.p = [self.prior] * max(1, self.k_max)  # prior, replaced by measurements after warm-up
        self.tested = [0] * len(self.p)

    # -- the model ----------------------------------------------------------
    def acceptance(self, j: int) -> float:
        """p_j: the pooled acceptance once drafts have been tested (iid acceptance, as in
        the speculative decoding literature: it is far steadier than per-position
        averages, where one rejection at a deep position swung k by half); before that
        the prior, or for synthetic inputs the per-position values (a position never
        tested takes the lowest tested one: no optimism)."""
        post = self.posterior()
        if post is not None:
            return post[0] / (post[0] + post[1])
        if self.tested[j]:
            return self.p[j]
        measured = [p for p, n in zip(self.p, self.tested, strict=True) if n]
        return min(measured) if measured else self.p[j]

    def posterior(self, whole_run: bool = False) -> tuple[float, float] | None:
        """Beta(a, b) of the pooled acceptance: the prior, worth ``prior_strength``
        positions, plus the tested positions (older ones discounted by ``decay``, so the
        estimate follows a changing text; the prior is not discounted, so no run of
        accepted drafts makes a rejection impossible). ``whole_run``: every tested
        position of the run, undiscounted."""
        if self.tested_accepted is None:
            return None
        accepted, rejected = (
            (self.run_accepted, self.run_rejected) if whole_run else (self.tested_accepted, self.tested_rejected)
        )
        return self.prior * self.prior_strength + accepted, (1.0 - self.prior) * self.prior_strength + rejected

    def k_accept(self, k: int, whole_run: bool = False) -> float:
        """Expected accepted draft tokens. Once drafts have been tested, the expectation
        is over the Beta posterior of the pooled acceptance, E[p^i] = prod_{j<i} (a + j) /
        (a + b + j): a few accepted drafts do not yet prove an acceptance near 1, on which
        a deep k would be staked. ``whole_run``: the posterior over every tested position,
        undiscounted (``release_pays``)."""
        total, run = 0.0, 1.0
        post = self.posterior(whole_run)
        for j in range(k):
            run *= self.acceptance(j) if post is None else (post[0] + j) / (post[0] + post[1] + j)
            total += run
        return total

    def target_time(self, n: int) -> float:
        if n in self.t_target:
            return self.t_target[n]
        if n == 1 and self.t_draft is not None:
            return self.t_draft  # the draft is the same model: one pass over one token
        if not self.t_target:
            return 1.0
        pts = sorted(self.t_target.items())
        if len(pts) == 1:
            return pts[0][1]  # memory-bound: a pass costs about the same for a few tokens
        lo = max((p for p in pts if p[0] < n), default=pts[0])
        hi = min((p for p in pts if p[0] > n), default=pts[-1])
        if lo[0] == hi[0]:
            (n0, t0), (n1, t1) = pts[-2], pts[-1]
            return max(t1 + (t1 - t0) / (n1 - n0) * (n - n1), 0.0)
        return lo[1] + (hi[1] - lo[1]) * (n - lo[0]) / (hi[0] - lo[0])

    def expected_misses(self, n: int) -> float:
        if n in self.misses:
            return self.misses[n]
        if not self.misses:
            return 0.0
        ref_n, ref = min(self.misses.items(), key=lambda kv: abs(kv[0] - n))
        return ref * union_size(n, self.num_experts, self.top_k) / union_size(ref_n, self.num_experts, self.top_k)

    def measured_stall(self, n: int) -> float | None:
        """Stall a verification over n tokens showed (scaled by union growth from the
        nearest measured n); None before any speculative cycle."""
        if n in self.stall:
            return self.stall[n]
        if not self.stall:
            return None
        ref_n, ref = min(self.stall.items(), key=lambda kv: abs(kv[0] - n))
        return ref * union_size(n, self.num_experts, self.top_k) / union_size(ref_n, self.num_experts, self.top_k)

    def cycle_time(self, k: int, measured: bool = False) -> float:
        """The model's cycle time; ``measured``: what cycles at this depth showed instead
        (their stall rather than the overlap assumption), where they have run."""
        draft = k * (self.t_draft if self.t_draft is not None else self.target_time(1)) if k else 0.0
        if measured and k == 0 and self.zero_time is not None:
            return self.zero_time
        stall = self.measured_stall(k + 1) if measured and k else None
        if stall is not None:
            return draft + self.target_time(k + 1) + stall
        n = k + 1
        m = self.expected_misses(n)
        # the slots hold at most ``prefetch_room`` of the verification's experts ahead of it:
        # the rest are copied when it needs them, exposed
        room = math.inf if self.prefetch_room is None else self.prefetch_room
        if self.t_host is None:
            ahead = min(m, room)
            return max(draft, ahead * self.t_copy) + (m - ahead) * self.t_copy + self.target_time(n)
        per_expert = n * self.top_k / union_size(n, self.num_experts, self.top_k)
        rest = max(0.0, m - min(draft / self.t_copy, room))
        exposed = rest / (1.0 / self.t_copy + 1.0 / self.t_host(per_expert))
        return draft + exposed + self.target_time(n)

    def theta(self, k: int, measured: bool = False, whole_run: bool = False) -> float:
        return (self.k_accept(k, whole_run) + 1.0) / max(self.cycle_time(k, measured), 1e-12)

    def best_k(self, lowest: int = 0) -> int:
        """argmax Theta over [lowest, k_max] (the shallower depth on a tie): a depth whose
        cycles have run is priced by what they measured (their stall instead of the
        overlap assumption), unseen depths by the model."""
        return max(range(lowest, self.k_max + 1), key=lambda k: (self.theta(k, measured=True), -k))

    def arm_time(self, prefetch: bool) -> float | None:
        """Seconds per k = 0 cycle with (True) or without gate-prefetch: the arm's mean
        compute plus its stall per miss times the misses per k = 0 cycle of both arms (the
        misses a cycle meets depend on routing, not on the arm: pooling them compares the
        arms on the same cycles rather than on their few, noisy samples). Every sum is
        discounted by ``arm_decay`` per later k = 0 cycle: an arm that runs only in probes
        was otherwise judged by its warm-up cycles, the run's first and coldest (on the
        Mixtral-shaped checkpoint with 9 of 32 slots that chose lru over a gate-prefetch
        10% faster)."""
        if prefetch not in self.arms:
            return None
        # A cycle right after the other arm's is not the arm's own: gate-prefetch copies the
        # next token's first layers while this token's last ones compute, so after an lru
        # cycle it starts without them, and lru after gate-prefetch inherits them (on the
        # Mixtral-shaped checkpoint, RTX 3060, 0.23 ms of stall a miss in gate-prefetch's
        # switch cycles against 0.08 settled). So an arm is judged by its settled cycles
        # once it has any (``Governor.choose_prefetch`` probes two cycles in a row).
        arm = self.arms[prefetch].judged
        all_misses = sum(a.recent.misses for a in self.arms.values()) / sum(a.recent.cycles for a in self.arms.values())
        per_miss = arm.stall / arm.misses if arm.misses else arm.stall / arm.cycles / max(all_misses, 1.0)
        return arm.compute / arm.cycles + per_miss * all_misses

    def faster_arm(self) -> bool:
        """The prefetch arm with the shorter ``arm_time`` (gate-prefetch on a tie or
        before any k = 0 cycle)."""
        times = {arm: self.arm_time(arm) for arm in self.arms}
        if len(times) < 2:
            return next(iter(times), True)
        return times[True] <= times[False]

    @property
    def zero_time(self) -> float | None:
        """Seconds per k = 0 cycle, stall included: the mean of the faster arm's cycles,
        older ones discounted as a depth's are (None before any k = 0 cycle). A moving
        average weighting the last cycle 0.3 is as noisy as about three cycles, and k = 0
        priced by it lost to speculation whenever two slow cycles came together: on the
        Mixtral-shaped checkpoint (H100, same cache) auto left k = 0 for the run's last
        dozen cycles, at 0.92 of its speed."""
        return self.arms[self.faster_arm()].mean_time if self.arms else None

    def arms_clear(self) -> bool:
        """Whether the slower k = 0 arm's settled cycles show it slower than the faster
        arm by more than twice the noise of the difference of their means
        (``cycle_noise`` over the cycles each mean is worth): a probe of that arm would
        only confirm it (``Governor.choose_prefetch``). Never before the slower arm has
        run settled: its cycles right after the other arm's are not its own."""
        if len(self.arms) < 2:
            return False
        fast = self.faster_arm()
        slow = self.arms[not fast]
        if not slow.settled.cycles:
            return False
        t_fast, t_slow = self.arm_time(fast), self.arm_time(not fast)
        noise = self.cycle_noise()
        spread = noise * math.hypot(t_fast / self.arms[fast].judged.worth ** 0.5, t_slow / slow.settled.worth**0.5)
        return t_slow - t_fast > 2.0 * spread

    def misses_per_token(self) -> tuple[float, float]:
        """(now, with the draft released): a k = 0 token's expected misses, from
        ``release_misses`` (every routed token, ``RoutingTrace``) where the run supplies
        it, else uniform routing (a miss rate of 1 - slots / experts)."""
        found = self.release_misses() if self.release_misses is not None else None
        if found is not None:
            return found
        lookups = self.top_k * self.total_experts / self.num_experts  # per token, every MoE layer
        now = lookups * max(0.0, 1.0 - self.slots / self.total_experts)
        return now, lookups * max(0.0, 1.0 - (self.slots + self.spare_slots) / self.total_experts)

    def theta_released(self) -> float | None:
        """Tokens/s of k = 0 with the draft's memory as expert slots. The faster arm's
        measured k = 0 cycles give a cycle time at their mean misses and the stall per
        miss; the cycle moves by that stall per miss to the misses expected with the
        extra slots. Those come from the model (``misses_per_token``), scaled by how the
        measured k = 0 misses compare with the model's now, the model worth
        ``model_cycles`` cycles: the few measured cycles are far noisier than the routed
        tokens (the failure this avoids: one lucky cycle with 4 misses where 6.25 are
        typical made releasing look 15% faster than it was)."""
        if not (self.spare_slots or self.host_spare) or not self.arms or not self.total_experts:
            return None
        now, then = self.misses_per_token()
        cycles = sum(a.total.cycles for a in self.arms.values())
        measured = sum(a.total.misses for a in self.arms.values())
        scale = (measured + self.model_cycles * now) / ((cycles + self.model_cycles) * now) if now > 0 else 1.0
        arm = self.arms[self.faster_arm()].total
        time = (arm.compute + arm.stall) / arm.cycles
        per_miss = arm.stall / arm.misses if arm.misses else 0.0
        tally = self.release_layers() if self.release_layers is not None else None
        per_miss_then = per_miss * queued_stall_ratio(tally, per_miss, self.t_copy) if tally else per_miss
        per_miss_then *= 1.0 - self.guessed_hidden(arm) if self.faster_arm() else 1.0
        per_miss_then *= self.read_ratio(now, then)
        return 1.0 / max(time - per_miss * arm.misses / arm.cycles + per_miss_then * then * scale, 1e-12)

    def read_ratio(self, now: float, then: float) -> float:
        """A miss's cost with the draft's host experts given back over its cost now, with
        a disk tier: ``t_link + p t_read``, ``p`` the share of misses RAM does not hold --
        from the routed tokens' disk reads per token over their misses (``release_reads``,
        ``now``/``then``: misses per token), else a share of the experts outside RAM."""
        if not self.host_spare or self.t_read <= 0 or not self.total_experts:
            return 1.0
        reads = self.release_reads() if self.release_reads is not None else None
        if reads is not None and now > 0 and then > 0:
            p_now, p_then = min(1.0, reads[0] / now), min(1.0, reads[1] / then)
        else:
            p_now = off_ram_share(self.host_slots, self.total_experts)
            p_then = off_ram_share(self.host_slots + self.host_spare, self.total_experts)
        cost_now = self.t_link + p_now * self.t_read
        return (self.t_link + p_then * self.t_read) / cost_now if cost_now > 0 else 1.0

    def guessed_hidden(self, arm: Sums) -> float:
        """With gate-prefetch, the share of a released miss's stall its guess hides: the
        experts it guessed a layer early (``release_recall``) are copied while that layer
        computes, a layer's compute covering at most its top-k copies. With few slots the
        guesses are evicted before use (measured on the Mixtral-shaped checkpoint, RTX 4090,
        7 slots for 16 lookups a token: gate-prefetch 458 tok/s; with the draft's 9 more,
        630-670, where the stall per miss measured at 7 slots put it at 540), so the
        measured stall per miss says little of them; nothing without a tally (CPU experts)
        or before a guess met its layer."""
        recall = self.release_recall() if self.release_recall is not None else None
        layers = self.total_experts / self.num_experts if self.num_experts else 0
        if not recall or not layers or not arm.cycles:
            return 0.0
        layer_compute = arm.compute / arm.cycles / layers
        return recall * min(1.0, layer_compute / (self.top_k * self.t_copy))

    def release_pays(self) -> bool:
        released = self.theta_released()
        if released is None or not self.k_max:
            return False
        # Releasing decides the rest of the run, so speculation is judged by the run's
        # acceptance, not by the discounted window that picks k (early in a run, where
        # the decision is made, one rejection there outweighs many accepted positions).
        return all(released > self.theta(k, measured=True, whole_run=True) for k in range(1, self.k_max + 1))

    def cycle_noise(self) -> float:
        """How much a cycle's time varies from one cycle to the next like it, relative to
        their mean: the pooled sample deviation over every (depth, arm) that has run twice
        or more, the run's first cycle left out (it starts cold, after the prompt). 0 until
        some cycle has repeated. On the mock clock only routing varies; on a wall clock a
        disk read varies by half from one second to the next."""
        squares, freedom = 0.0, 0
        for times in self.cycle_times.values():
            if len(times) > 1:
                mean = sum(times) / len(times)
                squares += sum((t / mean - 1.0) ** 2 for t in times)
                freedom += len(times) - 1
        return (squares / freedom) ** 0.5 if freedom else 0.0

    def release_clear(self, k: int) -> bool:
        """Whether releasing beats depth ``k`` by more than the noise of its measurement:
        ``k`` has run, and the released cycle's rate exceeds ``k``'s measured one by more
        than one standard error of the mean its estimate is (``cycle_noise`` / sqrt(the
        cycles that mean is worth, ``Sums.worth``)). Releasing cannot be undone, and
        one slow cycle (a disk read twice as slow as the next) must not decide it."""
        released = self.theta_released()
        if k + 1 not in self.stall or released is None:
            return False
        runs = max(1, len(self.cycle_times.get((k, True), [])))  # the run's first cycle is not kept
        worth = self.depth_sums[k + 1].worth if k + 1 in self.depth_sums else runs
        margin = self.cycle_noise() / min(runs, worth) ** 0.5
        return released > (1.0 + margin) * self.theta(k, measured=True, whole_run=True)

    # -- online estimates ---------------------------------------------------
    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def _depth_mean(self, n: int, target_s: float, stall_s: float) -> None:
        """A verification over n tokens: its compute and stall estimates are the means of
        the cycles at that depth, older ones discounted by ``arm_decay`` per newer one.
        A moving average weighting the last cycle 0.3 left each depth's estimate as noisy
        as three cycles (a stall varies 5x from one to the next with routing), and the
        argmax over depths then chased that noise: on the Mixtral-shaped checkpoint with CPU
        experts (RTX 4090) auto switched depth nearly every cycle and fell 6-8% below
        every fixed depth from 2 to 4."""
        s = self.depth_sums.setdefault(n, Sums())
        s.fade(self.arm_decay)
        s.add(target_s, stall_s, 0)
        self.t_target[n], self.stall[n] = s.compute / s.cycles, s.stall / s.cycles

    def observe(
        self,
        k: int,
        accepted: int,
        draft_s: float,
        target_s: float,
        misses: int,
        stall_s: float = 0.0,
        prefetch: bool = True,
    ) -> None:
        """One cycle: k drafted, ``accepted`` of them accepted, the draft's and the target
        pass's compute time, the experts the verification found not resident, its stall;
        ``prefetch``: whether a k = 0 cycle ran with gate-prefetch."""
        if self.observed:
            self.cycle_times.setdefault((k, prefetch or k > 0), []).append(draft_s + target_s + stall_s)
        self.observed += 1
        if k == 0:
            for arm in self.arms.values():  # an arm's old cycles count less: the first ones ran on a cold cache
                arm.recent.fade(self.arm_decay)
                arm.settled.fade(self.arm_decay)
            settled = self.last_arm == prefetch
            self.arms.setdefault(prefetch, Arm()).add(target_s, stall_s, misses, settled)
            self.t_target[1] = self._ema(self.t_target.get(1), target_s)
        else:
            self._depth_mean(k + 1, target_s, stall_s)
            self.t_draft = self._ema(self.t_draft, draft_s / k)
        self.last_arm = prefetch if k == 0 else None
        for j in range(min(k, accepted + 1)):  # positions that were actually tested
            self.p[j] = self._ema(self.p[j] if self.tested[j] else None, 1.0 if j < accepted else 0.0)
            self.tested[j] += 1
            hit = 1.0 if j < accepted else 0.0
            self.tested_accepted = self.decay * (self.tested_accepted or 0.0) + hit
            self.tested_rejected = self.decay * self.tested_rejected + 1.0 - hit
            self.run_accepted += j < accepted
            self.run_rejected += j >= accepted
        self.misses[k + 1] = self._ema(self.misses.get(k + 1), float(misses))


class Governor:
    """Chooses k: a fixed depth, or ``auto``: a short warm-up that measures both sides
    (k = 2, then 0), then argmax Theta. While it keeps choosing 0 it re-probes speculation
    (k = 2) after ``probe_every`` cycles, doubling the interval each time the probe
    confirms 0, so a model where speculation cannot pay loses little to probing. When
    ``release_pays`` it sets ``release_requested`` and stays at k = 0."""

    def __init__(
        self,
        state: GovernorState,
        fixed: int | None = None,
        probe_every: int = 16,
        arm_samples: int = 3,
        arm_probe_every: int = 8,
        release_waits: int = 3,
        arm_skips: int = 1,
    ):
        self.state, self.fixed, self.probe_every, self.arm_samples = state, fixed, probe_every, arm_samples
        self.arm_probe_every = arm_probe_every
        self.arm_since_probe = 0
        # probes skipped in a row at most (``GovernorState.arms_clear``): the next one runs
        # whatever the verdict, so a slower arm is re-measured at least every other due
        # probe and its sums, faded a k = 0 cycle at a time, keep a weight a float holds
        self.arm_skips, self.skipped = arm_skips, 0
        self.probing: bool | None = None  # the arm a probe's second cycle runs
        self.prefetch = True  # whether this k = 0 cycle runs gate-prefetch
        self.warmup_ks = [min(2, state.k_max), 0] if state.k_max else []
        if (state.spare_slots or state.host_spare) and state.k_max:
            # releasing the draft is judged on k = 0 cycles: measure a few, not one
            self.warmup_ks += [min(2, state.k_max), 0, 0]

        self.cycles = 0
        self.zero_run = 0
        self.release_requested = False
        self.tried_before_release = False
        self.release_waits, self.waited = release_waits, 0
        self.history: list[int] = []

    def choose(self) -> int:
        if self.fixed is not None:
            k = self.fixed
        elif self.cycles < len(self.warmup_ks):
            k = self.warmup_ks[self.cycles]
        elif self.state.release_pays():
            # Releasing cannot be undone: the best depth runs once first if it never has, so
            # that what releasing gives up is measured, not modelled; then the best depth
            # that has run runs again while the margin is within the noise of its few cycles
            # (``release_clear``); after ``release_waits`` such cycles the estimate decides.
            k = self.state.best_k(lowest=1)
            if k + 1 not in self.state.stall and not self.tried_before_release:
                self.tried_before_release = True
            else:
                ran = [j for j in range(1, self.state.k_max + 1) if j + 1 in self.state.stall]
                k = max(ran, key=lambda j: self.state.theta(j, measured=True, whole_run=True), default=k)
                if self.state.release_clear(k) or self.waited >= self.release_waits:
                    self.release_requested = True
                    self.fixed = k = 0
                else:
                    self.waited += 1
        else:
            k = self.state.best_k()
            if k == 0:
                self.zero_run += 1
                if self.zero_run >= self.probe_every:
                    k = min(2, self.state.k_max)  # keep the acceptance estimate alive
                    self.zero_run = 0
                    self.probe_every *= 2
            else:
                self.zero_run = 0
        if k == 0:
            self.prefetch = self.choose_prefetch()
        self.history.append(k)
        return k

    def choose_prefetch(self) -> bool:
        """k = 0 is plain decoding with the best non-speculative prefetch: gate-prefetch
        (the next layer's router on this layer's input) hides copies, but a wrong guess
        evicts a useful expert, and where routers are not paired (``pair_routers``) it
        launches a router pass per layer, which a small, launch-bound model does not
        earn back. Each arm is measured ``arm_samples`` times (alternating,
        gate-prefetch first), then the one with the shorter ``arm_time`` runs. On a wall
        clock a few cycles are noisy (a disk read varies by half from one to the next),
        so the other arm runs again after ``arm_probe_every`` k = 0 cycles, the interval
        doubling each time: an early verdict that noise got wrong is corrected, at a
        cost that shrinks as the run goes on. A probe lasts until the probed arm has run
        right after its own k = 0 cycle (two cycles in a row, more if a speculative
        cycle comes between): the first, right after the other arm, is not the probed
        arm's own (``GovernorState.arm_time``)."""
        if self.probing is not None:
            probed = self.probing
            if self.state.last_arm == probed:  # right after the probed arm's own k = 0 cycle
                self.probing = None  # this one is settled: the probe's last
            return probed
        arms = self.state.arms
        counts = {arm: arms[arm].total.cycles if arm in arms else 0 for arm in (True, False)}
        if min(counts.values()) < self.arm_samples:
            return counts[True] <= counts[False]
        best = self.state.faster_arm()
        self.arm_since_probe += 1
        if self.arm_since_probe > self.arm_probe_every:
            self.arm_since_probe = 0
            # doubling, up to 256 k = 0 cycles: the losing arm's sums, discounted by
            # ``arm_decay`` a cycle, keep a weight a float holds
            self.arm_probe_every = min(2 * self.arm_probe_every, 256)
            if self.skipped < self.arm_skips and self.state.arms_clear():  # its settled cycles already tell
                self.skipped += 1
                return best
            self.skipped = 0
            self.probing = not best
            return not best
        return best

    def observe(
        self, k: int, accepted: int, draft_s: float, target_s: float, misses: int, stall_s: float = 0.0
    ) -> None:
        self.cycles += 1
        self.state.observe(k, accepted, draft_s, target_s, misses, stall_s, prefetch=self.prefetch)


def explain(
    governor: Governor, released: bool, plan_note: str | None = None, slots_in: str = "on the device"
) -> str | None:
    """One line a newcomer understands when the governor turned speculation off (most
    cycles at k = 0) or released the draft; None while it speculates, or with a fixed
    --spec-depth. ``plan_note``: why the plan left the draft out, when it did;
    ``slots_in``: where the expert slots are ("in RAM" where the CPU computes them)."""
    s, hist = governor.state, governor.history
    if not hist:  # no decoding step yet (one token: the prefill's): the plan's reason, if any
        return plan_note
    arms = s.arms
    if min(arms[a].total.cycles if a in arms else 0 for a in (True, False)) < governor.arm_samples:
        arm = "gate-prefetch and no prefetch in turn (too few tokens yet to measure which is faster)"
    else:  # the one measured faster (not the other, if the run ended while probing it again)
        arm = "gate-prefetch" if s.faster_arm() else "no prefetch"
    if plan_note:
        return f"{plan_note}; decoding with {arm}"
    if released:
        ram = f", {s.host_slots} in RAM" if s.host_slots else ""
        return (
            "draft released: plain decoding with the draft's memory as more full-precision expert slots "
            f"(now {s.slots} of {s.total_experts} {slots_in}{ram}) is faster here than speculating; "
            f"decoding with {arm}"
        )
    zeros = sum(1 for k in hist if k == 0) / len(hist)
    if zeros < 0.75:
        return None
    why = []
    if s.t_draft is not None and 1 in s.t_target and s.t_target[1] > 0:
        why.append(f"a draft token costs {s.t_draft / s.t_target[1]:.2f} of a target step")
    tested = s.run_accepted + s.run_rejected
    if tested:
        why.append(f"{s.run_accepted / tested:.0%} of drafted tokens were accepted")
    reason = f" ({' and '.join(why)})" if why else ""
    return f"speculation mostly off: it does not pay on this model and hardware{reason}; decoding with {arm}"
