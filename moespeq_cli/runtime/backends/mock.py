"""MockBackend: a GPU simulated on a virtual clock, numerics really run on the CPU.

A discrete-event model with CUDA semantics: one compute stream and one copy stream, each
in order; a copy is issued at the compute stream's current time (the host enqueues it
when the program reaches that point), starts when the copy stream is free and the slot's
previous reader has finished, and takes ``link_latency + bytes / link_bandwidth``. A wait
moves the compute stream to the event's time; the gap is recorded as a stall. Compute
advances the compute stream by the roofline cost of the operation (planning/costs.py). The host
CPU is a third in-order stream: a host job's activations leave when the compute stream
reaches it (``link_latency + bytes / link_bandwidth``), the CPU computes the expert at its
host roofline cost once it is free, and the output comes back the same way. The disk is
a fourth: a read is issued at the compute stream's time, starts when the disk is free
and its host slot's readers are done, and takes ``disk_latency + bytes /
disk_bandwidth``; its bytes are really read (the numerics need them), at once. Device
memory is a counted budget whose slots are real buffers: a copy really copies. Everything
is deterministic: the same run gives the same timeline. docs/mock-backend.md has the
formulas and the limits.

What a region costs comes from the code that ran in it (planning/costs.py): during each
forward pass an ``OpCounter`` counts the aten ops the code dispatches, and each
``begin``/``end`` region is charged for the ops it launched; the ops no region claims
(residual adds, norms between blocks, routing, the grouping of tokens by expert) are
charged at the end of the pass, with the host syncs it made.
"""

from __future__ import annotations

import contextlib

import torch

from moespeq_cli.runtime.backends.base import BALANCED, Backend, Event, HostJob, as_events
from moespeq_cli.runtime.executors.opcount import OpCounter
from moespeq_cli.runtime.planning.costs import Cost, transfer_seconds
from moespeq_cli.runtime.planning.hardware import HardwareProfile
from moespeq_cli.runtime.timeline import Interval, region_kind


class MockBackend(Backend):
    name = "mock"
    clock_kind = "virtual"
    device = torch.device("cpu")

    def __init__(self, hw: HardwareProfile, capacity: int, reader=None):
        super().__init__(hw, capacity, reader)
        self.t_compute = 0.0
        self.t_copy = 0.0
        self.t_host = 0.0
        queue = hw.disk_queue_bandwidth
        lanes = min(len(queue), reader.threads if reader is not None else 1) if queue else 1
        self.disk_free = [0.0] * lanes  # when each of the disk's channels is free
        self.origin = 0.0  # generation starts here; earlier work (preloading) is complete
        self._read_cpu: list[tuple[float, float]] = []  # (a read's start, the CPU seconds it takes then)
        # a GPU computes in its own dtype: the casts of the CPU's float32 numerics are not its work
        self.counter = OpCounter(skip_casts=hw.kind != "cpu")
        self._regions: list[list[int]] = []  # open begin/end regions: [ops at begin, ops of nested regions]
        self._pass: list[int] | None = None  # [ops at the pass's start, syncs at its start, ops regions claimed]
        self._pass_layers: set[int] = set()  # the layers whose regions ran in this pass
        # the layers whose attention the cpu backend runs as one kernel call (the engine sets
        # it): a negative ``attention`` overhead, measured on such an attention, is not taken
        # from one that runs its ops
        self.one_call_attention: set[int] = set()

    def now(self) -> float:
        return self.t_compute - self.origin

    # -- what the code dispatched -------------------------------------------------
    def begin_pass(self) -> None:
        if self._pass is None:
            self.counter.__enter__()
            self._pass = [self.counter.ops, self.counter.syncs, 0]
            self._pass_layers.clear()

    def end_pass(self) -> None:
        if self._pass is None:
            return
        start_ops, start_syncs, claimed = self._pass
        self.counter.__exit__(None, None, None)
        self._pass = None
        glue = self.counter.ops - start_ops - claimed
        syncs = self.counter.syncs - start_syncs + 1  # and the sampler reads the logits back
        start = self.t_compute
        # the code between regions, measured (calibrate): per layer that ran (residual adds,
        # routing, the scheduler run once a layer), and per pass in profiles written before
        host = self.hw.between_regions(len(self._pass_layers))
        priced = glue * self.hw.launch_overhead + syncs * self.hw.sync_overhead
        self.t_compute = self._until(start, max(0.0, priced + host), kernels=False)
        self._record("compute", "compute", "framework", start, self.t_compute, ops=glue)

    def sync(self, n: int = 1, what: str = "sync") -> None:
        if n and self.hw.sync_overhead:
            start = self.t_compute
            self.t_compute = start + n * self.hw.sync_overhead
            self._record("compute", "compute", what, start, self.t_compute)

    def begin(self) -> float:
        self._regions.append([self.counter.ops, 0])
        return self.t_compute

    def end(self, token, cost: Cost, name: str, layer=None, expert=None, stream: str = "compute") -> None:
        start_ops, nested = self._regions.pop() if self._regions else (self.counter.ops, 0)
        counted = self._pass is not None
        ops = self.counter.ops - start_ops - nested
        if self._regions:
            self._regions[-1][1] += ops + nested
        if self._pass is not None and not self._regions:
            self._pass[2] += ops + nested
        if self._pass is not None and layer is not None:
            self._pass_layers.add(layer)
        start = self.t_compute
        busy = any(free > start for free in self.disk_free)  # the disk's reads share the CPU with it
        # its Python beyond its ops, measured (calibrate); below them where the real backend
        # dispatches fewer than the mock counts, never below the region's work itself
        extra = self.hw.host_overhead(region_kind(name), layer in self.one_call_attention)
        seconds = cost.charged(self.hw, extra, ops=ops if counted else None, busy=busy)
        # a curve measured with reads beside it (NAME@busy) prices what they do but take CPU
        # time (calibrate leaves that out of it): a read that starts meanwhile adds its own
        # (in a profile from before, the curve holds it: not charged again)
        self.t_compute = self._until(start, seconds, kernels=not (busy and cost.busy_priced(self.hw)))

        self._record(stream, "compute", name, start, self.t_compute, layer, expert, ops=ops if counted else cost.ops)

    def _until(self, start: float, seconds: float, kernels: bool = True) -> float:
        """When compute that starts at ``start`` and needs ``seconds`` ends, on a cpu
        profile with the CPU time of the reads that start meanwhile added: a read takes
        ``HardwareProfile.read_cpu`` seconds of CPU when it starts (the system call: O_DIRECT
        pins its pages and sets up the transfer), and kernels, which
        use every core and wait for their slowest thread, are delayed by as much (measured
        on a 2-core VM: an expert overlapping a 22 MB read's start took 1.9 ms against
        1.0 ms, and such a read costs 1.0 ms of CPU; in a decode of 2.4 MB experts, a
        kernel four reads started beside took 0.46 ms more than one none did, and such a
        read costs 0.11 ms). A kernel priced by a curve measured with reads beside it
        (``NAME@busy``) pays it too: calibrate leaves the reads' CPU time out of that curve.
        A read that starts while the compute stream waits, or runs the single-threaded host
        code between kernels, costs nothing more: a core is free for it; nor does one beside
        a kernel that a profile from before ``read_cpu_overhead`` prices by its busy curve,
        which holds it (both ``kernels=False``)."""
        end = start + seconds
        pending = self._read_cpu
        if not pending:
            return end
        keep = []
        for t, cpu in sorted(pending):
            if t < start:
                continue  # it started while the stream waited
            if t < end:
                end += cpu if kernels else 0.0
            else:
                keep.append((t, cpu))
        self._read_cpu = keep
        return end

    def _record(self, stream, kind, name, start, end, layer=None, expert=None, nbytes=0, ops=0) -> None:
        o = self.origin
        self.timeline.add(Interval(stream, kind, name, start - o, end - o, layer, expert, nbytes, self.phase, ops))

    @staticmethod
    def _after(after) -> float:
        return max((ev.time for ev in as_events(after)), default=0.0)

    def _copy_window(self, nbytes: int, after) -> tuple[float, float]:
        start = max(self.t_copy, self.t_compute, self._after(after))
        return start, start + transfer_seconds(nbytes, self.hw)

    def copy_eta(self, nbytes: int, after: Event | None = None) -> float:
        return self._copy_window(nbytes, after)[1]

    def copy(self, dst, src, nbytes, name, layer, expert, after=None) -> Event:
        start, self.t_copy = self._copy_window(nbytes, after)
        if dst is not None:
            self.counter.paused += 1  # the simulation's own work: a GPU's copy engine does it
            dst.copy_(src)
            self.counter.paused -= 1
        self.bytes_h2d += nbytes
        self._record("copy", "copy", name, start, self.t_copy, layer, expert, nbytes)
        return Event(self.t_copy)

    def _read_window(self, nbytes: int, after) -> tuple[int, float, float]:
        """(the channel, start, end) of a read issued now. The disk serves as many reads at
        once as the profile's queue curve has depths (the reader's threads): a read takes
        the channel free first, and runs at the bandwidth one read gets with that many in
        flight when it starts (later reads do not slow it down: an approximation). Without
        a queue curve the disk is one in-order stream at ``disk_bandwidth``."""
        channels = self.disk_free
        c = min(range(len(channels)), key=channels.__getitem__)
        start = max(channels[c], self.t_compute, self._after(after))
        if self.hw.disk_bandwidth is None:  # only when every expert fits in RAM: the reads at load
            return c, start, start
        busy = 1 + sum(1 for i, free in enumerate(channels) if i != c and free > start)
        return c, start, start + self.hw.disk_latency + nbytes / self.hw.disk_channel_bandwidth(busy)

    @property
    def t_disk(self) -> float:
        return max(self.disk_free)

    def read_eta(self, nbytes: int) -> float:
        return self._read_window(nbytes, None)[2]

    def read(self, dst, what, nbytes, name, layer, expert, after=None) -> Event:
        if self.hw.kind == "cpu" and self.hw.read_submit_overhead:  # the compute thread hands it over first
            t = self.t_compute
            self.t_compute = self._until(t, self.hw.read_submit_overhead, kernels=False)
            self._record("compute", "compute", "submit read", t, self.t_compute, layer, expert)
        c, start, end = self._read_window(nbytes, after)
        self.disk_free[c] = end
        cpu = self.hw.read_cpu(nbytes) if self.hw.kind == "cpu" else 0.0
        if cpu:
            self._read_cpu.append((start, cpu))
        self.counter.paused += 1
        try:
            self.reader.read(what, dst)
        finally:
            self.counter.paused -= 1
        self.bytes_read += nbytes
        self._record("disk", "read", name, start, end, layer, expert, nbytes)
        return Event(end)

    def _host_window(self, cost: Cost, act_bytes: int, after=None, ops=None) -> tuple[float, float, float]:
        """(CPU starts, CPU done, output back on the device). While the copy stream runs,
        the copies read host memory too: the CPU gets what the link leaves of it."""
        start = max(self.t_host, self.t_compute + transfer_seconds(act_bytes, self.hw), self._after(after))
        shared = self.hw.host_mem_bandwidth - self.hw.link_bandwidth if self.t_copy > start else None
        bandwidth = max(shared, 0.1 * self.hw.host_mem_bandwidth) if shared is not None else None
        done = start + cost.host_seconds(self.hw, ops=ops, bandwidth=bandwidth)
        return start, done, done + transfer_seconds(act_bytes, self.hw)

    def host_eta(self, cost: Cost, act_bytes: int) -> float:
        return self._host_window(cost, act_bytes)[2]

    def host_compute(
        self, x, fn, cost: Cost, act_bytes: int, name: str, layer=None, expert=None, after=None
    ) -> HostJob:
        before = self.counter.ops
        out = fn(x)  # on the CPU: its ops are host dispatches, not device launches
        ops = self.counter.ops - before if self._pass is not None else None
        if ops is not None:
            if self._regions:
                self._regions[-1][1] += ops
            else:
                self._pass[2] += ops
        start, self.t_host, back = self._host_window(cost, act_bytes, after, ops)
        self._record("host", "compute", name, start, self.t_host, layer, expert, ops=ops or 0)
        return HostJob(Event(back), out, layer=layer, expert=expert)

    def groups(self, act_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
        """As the simulated GPU would (its profile's ``grouped_gemm``), where this CPU can
        run the grouped call it stands in for."""
        from moespeq_cli.runtime.executors.grouped import profile_groups

        return profile_groups(self.hw, act_dtype) and super().groups(act_dtype, compute_dtype)

    def upload(self, values: list[int]) -> torch.Tensor:
        return super().upload(values).clone()  # the copy a GPU makes of it (one op, as there)

    @contextlib.contextmanager
    def uncounted(self):
        """The simulation's own work (widening a bf16 GPU's weights into the float32 the
        mock computes in), which no GPU runs: invisible to every op counter, the mock's
        and any a caller holds (``scripts/count_ops.py``, a test's), as it is to a GPU's
        launch count. Python dispatch is off inside: no mode sees these ops."""
        with torch._C._DisableTorchDispatch():
            yield

    def host_result(self, job: HostJob):
        self.wait(job.event, job.layer, job.expert, what=job.waiting)
        return job.output

    def now_event_time(self) -> float:
        return self.t_compute

    def wait(self, event: Event, layer=None, expert=None, what: str = "wait H2D") -> None:
        if event.time > self.t_compute:
            stall = what != BALANCED
            self._record("compute", "stall" if stall else "compute", what, self.t_compute, event.time, layer, expert)
            self.io_stall_s += event.time - self.t_compute if stall else 0.0
            blocked, self.t_compute = event.time - self.t_compute, event.time
            # a blocked thread wakes, then its kernels run cold: the longer it slept, the more
            wake = self.hw.read_wake(blocked) if self.hw.kind == "cpu" else 0.0
            if wake:
                self.t_compute = self._until(event.time, wake, kernels=False)
                self._record("compute", "compute", "wake", event.time, self.t_compute, layer, expert)

    def ready(self, event: Event) -> bool:
        return event.time <= self.t_compute

    def record_release(self) -> Event:
        return Event(self.t_compute)

    def reset_clock(self) -> None:
        super().reset_clock()
        start = max(self.t_compute, self.t_copy, self.t_host, self.t_disk)
        self.origin = self.t_compute = self.t_copy = self.t_host = start
        self.disk_free = [start] * len(self.disk_free)
        self._read_cpu.clear()
