"""Offloading policies: what is copied when, and what is kept (docs/design.md §4).

Every policy runs in the same engine with the same cost model; a policy only decides
copies and eviction.

Every policy that keeps experts starts warm: its slots are filled before generation (at
load time, as Mixtral-Offloading and llama.cpp do), the same number per layer, lowest ids
first -- no routing statistics are assumed.

- ``resident``: every expert on the device before generation starts (an upper bound).
- ``ondemand``: Hugging Face ``device_map`` style. Each needed expert is copied right
  before it is used, synchronously, and nothing is kept.
- ``lru``: Mixtral-Offloading's cache. A layer issues all its misses at once, computes the
  resident experts while those copies fly, then waits for each miss; least recently used
  slots are evicted.
- ``gate-prefetch``: ``lru`` plus Mixtral-Offloading's speculative loading: layer l+1's
  router applied to layer l's MoE input predicts l+1's experts, prefetched while layer
  l's experts compute.
- ``hybrid``: llama.cpp ``--n-cpu-moe`` / Fiddler: the slots are filled once and never
  change; whatever is not on the device is computed on the CPU from host memory (or
  copied, if the cost model says the copy is faster and the expert is already on its way
  -- never, for a static cache). No speculation.
- ``moespeq``: the 4-bit self-draft predicts the experts of the next k tokens and the ELB
  scheduler prefetches them while the draft runs (scheduling/elb.py); its cache evicts
  lookahead-aware. With k = 0 it decodes like ``gate-prefetch`` or like ``lru``,
  whichever the governor measures faster (governor.py). With CPU experts (the
  default) each expert not on the device when verification needs it is copied or
  computed on the CPU, whichever the cost model says is sooner.
"""

from __future__ import annotations

from dataclasses import dataclass

from moespeq_cli.errors import UsageError

POLICIES = ("moespeq", "resident", "ondemand", "lru", "gate-prefetch", "hybrid")


@dataclass(frozen=True)
class Policy:
    name: str
    preload: bool = True  # the slots are filled before generation (spread over the layers)
    issue_ahead: bool = True  # issue every miss of a layer before computing any
    keep: bool = True  # keep experts resident after use
    gate_prefetch: bool = False
    speculative: bool = False
    static: bool = False  # hybrid: the device cache is filled once and never changes
    host_compute: bool = False  # experts not on the device may run on the CPU


def make_policy(name: str, cpu_experts: bool | None = None) -> Policy:
    """``cpu_experts``: None takes the policy's default (on for hybrid and moespeq)."""
    if name == "hybrid":
        if cpu_experts is False:
            raise UsageError("--policy hybrid computes missing experts on the CPU; drop --no-cpu-experts")
        return Policy(name, issue_ahead=False, static=True, host_compute=True)
    if name == "resident":
        return Policy(name)
    if cpu_experts and name != "moespeq":
        raise UsageError(f"--cpu-experts applies to --policy moespeq and hybrid, not {name}")
    if name == "ondemand":
        return Policy(name, preload=False, issue_ahead=False, keep=False)
    if name == "lru":
        return Policy(name)
    if name == "gate-prefetch":
        return Policy(name, gate_prefetch=True)
    if name == "moespeq":
        return Policy(name, gate_prefetch=True, speculative=True, host_compute=cpu_experts is not False)
    raise UsageError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
