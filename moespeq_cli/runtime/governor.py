"""The speculative governor: picks the draft depth k each cycle by the Amortization
Roofline Model (DESIGN.md §2, docs/governor.md).

    k_accept(k) = sum_{i=1..k} prod_{j<=i} p_j           expected accepted draft tokens
    T_cycle(0)  = T_target(1) + T_io(0)                 plain decoding, exposed copies
    T_cycle(k)  = max(T_draft(k), T_io(k)) + T_target(k+1)   copies overlap the draft
    Theta(k)    = (k_accept(k) + 1) / T_cycle(k)
    k*          = argmax Theta(k) over [0, k_max]

Every input is estimated online from what the cycles measure on the run's clock:
``p_j`` by an exponential moving average per draft position, ``T_draft(k) = k * t_draft``
(the per-token draft time), ``T_target(n)`` per number of verified tokens (missing n
interpolated linearly from measured ones), and ``T_io(k) = misses(k+1) * t_copy`` where
``misses(n)`` is the number of experts a verification over n tokens found not resident
(measured per n; for an unseen n it is scaled by the union growth of n tokens' experts
under independent routing, ``E (1 - (1 - K/E)^n)`` per layer). k = 0 is always a
candidate: where speculation cannot pay, the governor turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def union_size(n_tokens: int, num_experts: int, top_k: int) -> float:
    """Expected distinct experts chosen by n tokens in one layer, independent routing."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** n_tokens)


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

    def __post_init__(self):
        if not self.p:
            self.p = [0.8] * max(1, self.k_max)  # prior, replaced by measurements after warm-up
        self.tested = [0] * len(self.p)

    # -- the model ----------------------------------------------------------
    def acceptance(self, j: int) -> float:
        """p_j; a position never tested takes the lowest measured one (no optimism)."""
        if self.tested[j]:
            return self.p[j]
        measured = [p for p, n in zip(self.p, self.tested, strict=True) if n]
        return min(measured) if measured else self.p[j]

    def k_accept(self, k: int) -> float:
        total, run = 0.0, 1.0
        for j in range(k):
            run *= self.acceptance(j)
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

    def t_io(self, k: int) -> float:
        return self.expected_misses(k + 1) * self.t_copy

    def cycle_time(self, k: int) -> float:
        if k == 0:
            return self.target_time(1) + self.t_io(0)
        draft = k * (self.t_draft if self.t_draft is not None else self.target_time(1))
        return max(draft, self.t_io(k)) + self.target_time(k + 1)

    def theta(self, k: int) -> float:
        return (self.k_accept(k) + 1.0) / max(self.cycle_time(k), 1e-12)

    def best_k(self) -> int:
        return max(range(self.k_max + 1), key=lambda k: (self.theta(k), -k))

    # -- online estimates ---------------------------------------------------
    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe(self, k: int, accepted: int, draft_s: float, target_s: float, misses: int) -> None:
        """One cycle: k drafted, ``accepted`` of them accepted, the draft's and the target
        pass's compute time, and the experts the verification found not resident."""
        for j in range(min(k, accepted + 1)):  # positions that were actually tested
            self.p[j] = self._ema(self.p[j] if self.tested[j] else None, 1.0 if j < accepted else 0.0)
            self.tested[j] += 1
        if k:
            self.t_draft = self._ema(self.t_draft, draft_s / k)
        n = k + 1
        self.t_target[n] = self._ema(self.t_target.get(n), target_s)
        self.misses[n] = self._ema(self.misses.get(n), float(misses))


class Governor:
    """Chooses k: a fixed depth, or ``auto``: a short warm-up that measures both sides
    (k = 2, then 0), then argmax Theta. While it keeps choosing 0 it re-probes speculation
    (k = 2) after ``probe_every`` cycles, doubling the interval each time the probe
    confirms 0, so a model where speculation cannot pay loses little to probing."""

    def __init__(self, state: GovernorState, fixed: int | None = None, probe_every: int = 16):
        self.state, self.fixed, self.probe_every = state, fixed, probe_every
        self.warmup_ks = [min(2, state.k_max), 0] if state.k_max else []
        self.cycles = 0
        self.zero_run = 0
        self.history: list[int] = []

    def choose(self) -> int:
        if self.fixed is not None:
            k = self.fixed
        elif self.cycles < len(self.warmup_ks):
            k = self.warmup_ks[self.cycles]
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
        self.history.append(k)
        return k

    def observe(self, k: int, accepted: int, draft_s: float, target_s: float, misses: int) -> None:
        self.cycles += 1
        self.state.observe(k, accepted, draft_s, target_s, misses)
