"""The offloading runtime: one model generating on a backend, with its experts spread
over memory tiers and moved by a policy. Read it from the top down:

- ``engine.py``: ``Engine`` puts a checkpoint on a backend under a memory plan and hands
  out what the decode loops need; it decides nothing itself;
- ``generate.py`` (plain decoding) and ``speculative.py`` (draft k tokens with the 4-bit
  self-draft, verify them in one target pass, accept, roll back);
- ``planning/``: hardware profiles, the memory plan (slots, RAM, draft, scratch) and the
  roofline cost model that prices both the plan and the mock's clock;
- ``scheduling/``: the offloading policies, the ELB scheduler that prefetches what the
  draft's routers predict, and the governor that picks k (0 included);
- ``tiers/``: where experts live -- disk, host RAM, device slots, each a cache of the one
  below;
- ``executors/``: how a MoE layer gets its experts' outputs (resident, copied, computed by
  the CPU, grouped in one call, the draft's 4-bit path);
- ``backends/``: where compute runs and how time is measured (cpu and cuda on the wall
  clock, mock on a virtual one);
- ``stats.py``, ``timeline.py``, ``bench.py``, ``sampling.py``: what a run reports and how
  it picks tokens.

docs/design.md §3 draws the data flow.
"""
