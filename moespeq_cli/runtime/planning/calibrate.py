"""Calibration: measure this machine and write a hardware profile (``moespeq calibrate``).

The mock prices the code that runs; calibration measures that code here. Every figure
it writes is a measurement of this machine, stamped with the date and the method:

- the host CPU: memory bandwidth (a reduction over a buffer larger than the last-level
  cache), FLOP/s (a large float32 matmul), the framework's cost per dispatched op, the
  cost of reading a value back (a sync);
- kernel curves: seconds per call by batch size (1 to 16 tokens) at two weight sizes, in
  steady state (after ``WARM_S`` of calls, the weights cycled beyond the last-level cache,
  on a ``cpu`` profile with the threads as the cpu backend sets them), for each kernel
  the runtime calls: ``linear:<weights>[:<activations>]`` (a non-expert
  layer as the device computes it: on a CPU through moespeq's kernels where they apply),
  ``expert:<weights>:<activations>`` (a routed expert exactly as the executor computes
  it, widening included), ``draft:kernel`` / ``draft:packed`` / ``draft:reference`` (the 4-bit draft's
  expert on the path ``quant/draft.py`` takes here), each with the ops one call
  dispatches;
- the disk where models live: O_DIRECT read bandwidth with 1 to 4 reads in flight (the
  reader's threads), the latency of a small read, the CPU time a read costs per byte, and
  what a read costs the compute thread (submitting it, waking after waiting for it);
- the host time the op count misses per kind of region, from a checkpoint decoded for
  real and on the mock (``--model CKPT``, else the bundled demo model; on a GPU decoded
  there; planning/overheads.py);
- on CUDA also the GPU (its kernel curves, launch overhead, pinned host-to-device
  bandwidth and latency, sync cost), written as a ``gpu`` profile.

Without a GPU the profile is a ``cpu`` one: the device *is* this CPU, RAM the compute
tier and the disk the link, which is what ``--backend mock --hardware PROFILE --ram X``
then simulates (and ``scripts/validate_mock.py`` checks against ``--backend cpu``).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from moespeq_cli.runtime.executors.opcount import OpCounter
from moespeq_cli.runtime.planning.costs import dtype_name, expert_kernel
from moespeq_cli.runtime.planning.hardware import GROUPED_DTYPES

TOKENS = (1, 2, 3, 4, 6, 8, 12, 16)
# kernels that dequantize a whole expert a call (FP8 blocks, the draft's reference path):
# their time hardly depends on the batch, so fewer batch sizes, interpolated between
DEQUANT_TOKENS = (1, 4, 16)
SHAPES = ((512, 1536), (1024, 3584))  # (hidden, intermediate): a small expert and a Mixtral-class one at 1/4 width
DISK_FILE_BYTES = 256 * 2**20  # (calibrate --help and its no-room error say 256 MiB)
# a kernel's timing: the median of at most CURVE_REPS calls, fewer (3 at least) once a
# batch size has taken CURVE_BUDGET_S (a call of 16 tokens at the larger shape takes
# 10-90 ms on a 2-core machine: three are as steady as fifteen, and 5x quicker)
CURVE_REPS, CURVE_BUDGET_S = 9, 0.15
# the weights a kernel timing cycles through: beyond any last-level cache. 96 MiB was not
# on this 2-vCPU VM (its host's L3 reported as 480 MiB): a 22 MB bf16 expert cycled
# through 96 MiB took 0.81 ms a call, through 192 MiB 1.00 and 384 MiB 1.04 (a 4.7 MB one
# 0.245, 0.249, 0.254), and a decode reads 150-350 MB of experts a token
COLD_BYTES = 256 * 2**20
# seconds of calls before a kernel's timing: after other work (copying its weights, another
# kernel's timing, waiting for reads to land) the first 10-14 calls of a 4.7 MB expert took
# 1.5-4x its steady time (the pool's workers and an idle vCPU coming back), where a
# decode's kernels follow one another: its median of nine calls right after its weights
# were copied was 0.25-0.32 ms, after 20 ms of calls 0.22-0.27
WARM_S = 0.02
DISK_EXTENT = 22 * 2**20  # a whole number of pages, like a span the runtime reads
WAIT_S = 30.0  # the longest the background reads of a busy kernel timing may take to land or stop


def timed(fn: Callable[[], object], reps: int = 9, warmup: int = 2, budget_s: float = 0.5) -> float:
    """The median of ``reps`` timings (fewer when one call is slow), after a warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + budget_s
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() > t_end:
            break
    return statistics.median(times)


def mean_over(
    fn: Callable[[], object], span_s: float, least: int = 3, taken: Callable[[], float] | None = None
) -> float:
    """Seconds per call, the mean over calls that span at least ``span_s`` (and ``least``
    calls), after one warm-up call: for a kernel timed while reads run, whose cost falls
    on the few calls that meet a read's submission or landing, which a median of a few
    calls (shorter together than one read) catches or misses by chance. ``taken()``: CPU
    seconds other threads have used so far (the reads' own), left out of the calls' time."""
    fn()
    n, t0 = 0, time.perf_counter()
    c0 = taken() if taken else 0.0
    while n < least or time.perf_counter() - t0 < span_s:
        fn()
        n += 1
    elapsed = time.perf_counter() - t0
    other = min(max(0.0, taken() - c0), elapsed) if taken else 0.0
    return (elapsed - other) / n


def at_most_larger(rows: list[list[float]], sizes: list[int]) -> list[list[float]]:
    """Rows of timings for weights of ``sizes`` bytes (ascending): a smaller weight never
    costs more than a larger one at the same token count, and a figure that does is a
    measurement the machine interrupted (a calibration beside a busy process put a 1.6 MB
    weight at 6.95 ms and a 7.3 MB one at 0.40: every policy that runs small products, a
    router, was priced 13x slower). Such a figure becomes the larger weight's scaled to its
    bytes, so the curve still grows with the weight (equal figures would price every
    weight beyond the larger one, a real expert, at the larger one's time)."""
    out = [list(r) for r in rows]
    for k in range(len(out) - 2, -1, -1):
        ratio = sizes[k] / sizes[k + 1]
        out[k] = [a if a <= b else b * ratio for a, b in zip(out[k], out[k + 1], strict=True)]
    return out


def non_decreasing(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators):
    a run of values that dips is replaced by its mean."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    return [s / n for s, n in blocks for _ in range(n)]


def spikes(row: list[float], factor: float = 1.5) -> list[int]:
    """Where a curve over batch sizes costs more than ``factor`` times a larger batch's:
    one slow moment of the machine (a median of three when calls are slow), which
    ``non_decreasing`` would otherwise carry to every larger batch."""
    return [j for j in range(len(row) - 1) if row[j] > factor * min(row[j + 1 :])]


def copies(made: dict, key, make: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
    """Fresh copies of the tensors ``make()`` draws, drawn once per ``key``: the copies a
    timing cycles through cost a memory copy each, not a random draw (seconds a curve)."""
    if key not in made:
        made[key] = make()
    return [t.clone() for t in made[key]]


def cold_count(nbytes: int) -> int:
    """How many copies of ``nbytes`` of weights a timing cycles through so that each call
    reads its weights from memory (together beyond any last-level cache), as a decode's
    experts are."""
    return max(1, -(-COLD_BYTES // nbytes))


def warm(fn: Callable[[], object], seconds: float = WARM_S) -> None:
    """Call ``fn`` for ``seconds`` (once at least): a kernel's steady state before timing it."""
    t_end = time.perf_counter() + seconds
    fn()
    while time.perf_counter() < t_end:
        fn()


def ops_of(fn: Callable[[], object]) -> int:
    with torch.inference_mode(), OpCounter() as c:
        fn()
    return c.ops


# -- the host CPU --------------------------------------------------------------------
def host_figures(say: Callable[[str], None]) -> dict:
    say("host memory bandwidth")
    buf = torch.ones(128 * 2**20)  # 512 MiB of float32: beyond any last-level cache
    bw = buf.numel() * 4 / timed(buf.sum, reps=5, warmup=1)
    del buf
    say("host FLOP/s")
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    flops = 2 * 1024**3 / timed(lambda: a @ b, reps=5)
    say("host op and sync overhead")
    x, y = torch.ones(16), torch.ones(16)
    n = 2000

    def many_adds():
        for _ in range(n):
            torch.add(x, y)

    op = timed(many_adds, reps=5) / n
    one = torch.ones(1)
    sync = timed(lambda: [one.item() for _ in range(n)], reps=5) / n
    return {"host_mem_bandwidth": bw, "host_flops": flops, "host_op_overhead": op, "sync_overhead": sync}


def kernel_curves(
    device: torch.device,
    say: Callable[[str], None],
    busy_file: tuple[str, int] | None = None,
    busy_span_s: float = 0.05,
) -> dict:
    """Seconds per call by batch size at the two shapes, for every kernel the runtime calls
    on ``device``, with the ops one call dispatches. As in a decode step, the weights come
    from memory rather than a warm cache: the calls cycle through copies of them that
    together outgrow any last-level cache. With ``busy_file`` (path, size) each CPU kernel
    is timed again while reads of that file run in the background, as the disk tier's
    reads do during decoding: ``NAME@busy``, each figure the mean over ``busy_span_s`` of
    calls (``mean_over``; two reads' time: a median of nine calls at one token, 11 ms of a
    1024 x 3584 expert against 18 ms a read, put a calibration's busy expert at 1.9x its
    quiet time, where the mean of 40 calls beside the same reads gave 1.05-1.2x), once
    the reads are under way, less the CPU time the reads' own threads took meanwhile: the
    mock charges that to the kernel a read starts beside (``disk_read_cpu``,
    ``read_cpu_overhead``: on a machine with few cores the reader's threads take it from
    the kernels' own), so the curve prices what reads in flight do besides (their memory
    traffic, the interrupts). Until the forty-seventh session the curve held both, and the
    mock charged no read's CPU to a kernel it priced by it: in a disk-tier decode of 2.4 MB
    experts, reads submitted just before a kernel made it busy-priced at 1.03x while a
    kernel four such reads started beside took 4x its quiet time (0.61 against 0.15 ms)."""
    from moespeq_cli.runtime.executors.experts import expert_forward, expert_mlp

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    curves: dict = {}

    def curve(
        name: str,
        bind,
        x_dtype: torch.dtype,
        weight_bytes: Callable[[int, int], int],
        tokens=TOKENS,
        held_bytes: Callable[[int, int], int] | None = None,
    ) -> None:
        """``bind(h, i, made)`` makes one copy of the weights (``copies(made, ...)``: drawn once
        a shape) and returns ``fn(x)`` computing with it. ``weight_bytes``: what a call
        streams (the curve's sizes); ``held_bytes``: what a copy holds, by which the copies
        are counted (the same unless said: a draft's reference path streams bf16 weights it
        dequantizes each call, its copies hold the 4-bit parts)."""
        held_bytes = held_bytes or weight_bytes
        variants = [(name, None)]
        if busy_file is not None and device.type == "cpu":
            variants.append((f"{name}@busy", busy_file))
        weights = {}  # made once per shape for both variants (quantizing a draft's takes seconds)
        made: dict = {}  # each shape's draw, which the copies are copies of
        quiet: dict = {}  # each shape's quiet row: a busy figure is never below it
        for label, background in variants:
            say(f"kernel {label}")
            rows, sizes, ops = [], [], 1
            for h, i in SHAPES:
                if (h, i) not in weights:
                    weights[h, i] = [bind(h, i, made) for _ in range(cold_count(held_bytes(h, i)))]
                copies = weights[h, i]
                calls = []
                for t in tokens:
                    x = torch.randn(t, h, device=device).to(x_dtype)
                    turn = iter(range(10**9))

                    def call(x=x, turn=turn, copies=copies):
                        copies[next(turn) % len(copies)](x)
                        sync()

                    calls.append(call)
                with reading(background) as taken:
                    warm(calls[0])  # (the batch sizes after the first follow the same kernel)
                    if background is not None:
                        # (buffered reads, where O_DIRECT is refused, keep their threads on the
                        # CPU nearly throughout: less their time, calls came out at 0.05x quiet)
                        busy = [mean_over(call, busy_span_s, taken=taken) for call in calls]
                        row = [max(q, b) for q, b in zip(quiet[h, i], busy, strict=True)]
                    else:
                        row = [timed(call, CURVE_REPS, 1, CURVE_BUDGET_S) for call in calls]
                        for j in spikes(row):  # timed again: the lower median is kept
                            row[j] = min(row[j], timed(calls[j], CURVE_REPS, 1, CURVE_BUDGET_S))
                        quiet[h, i] = row
                x1 = torch.randn(1, h, device=device).to(x_dtype)
                ops = ops_of(lambda x1=x1, fn=copies[0]: fn(x1))
                rows.append(non_decreasing(row))  # more tokens never cost less: a dip is noise, pooled
                sizes.append(weight_bytes(h, i))
            curves[label] = {"tokens": list(tokens), "sizes": sizes, "seconds": at_most_larger(rows, sizes), "ops": ops}
        weights.clear()

    linears = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
    if device.type == "cuda":
        linears = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
    for wd, xd in linears:

        def bind_linear(h, i, made, wd=wd):
            from moespeq_cli.kernels.modules import dense

            (w,) = copies(made, (h, i), lambda h=h, i=i, wd=wd: [torch.randn(i, h, device=device).to(wd)])
            return (lambda x: dense(x, w)) if device.type == "cpu" else (lambda x: F.linear(x, w))  # as it runs

        elem = torch.empty(0, dtype=wd).element_size()
        name = "linear:" + dtype_name(wd) + ("" if wd == xd else ":" + dtype_name(xd))
        curve(name, bind_linear, xd, lambda h, i, e=elem: h * i * e)
    pairs = [(torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
    if device.type == "cuda":
        pairs = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]
    for wd, xd in pairs:

        def bind_expert(h, i, made, wd=wd):
            def draw(h=h, i=i, wd=wd):
                return [torch.randn(*s, device=device).to(wd) for s in ((i, h), (i, h), (h, i))]

            g, u, d = copies(made, (h, i), draw)
            return lambda x: expert_mlp(x, g, u, d, fast=device.type == "cpu")  # as the CPU computes it

        elem = torch.empty(0, dtype=wd).element_size()
        name = f"expert:{dtype_name(wd)}:{dtype_name(xd)}"
        curve(name, bind_expert, xd, lambda h, i, e=elem: 3 * h * i * e)
    if device.type == "cpu":  # the kernels of the other expert layouts (models/expert_format.py)
        from moespeq_cli.models.expert_format import FP8

        for fmt in other_formats():

            def bind_format(h, i, made, fmt=fmt):
                parts = copies(made, (h, i), lambda h=h, i=i, fmt=fmt: random_parts(fmt, h, i))
                return lambda x: expert_forward(fmt, x, parts, fast=True)

            curve(
                expert_kernel(fmt, torch.bfloat16, torch.float32),
                bind_format,
                torch.float32,
                lambda h, i, fmt=fmt: fmt.nbytes(h, i, torch.bfloat16),
                DEQUANT_TOKENS if fmt.quant == FP8 else TOKENS,
            )
    for path in ("cuda",) if device.type == "cuda" else ("kernel", "packed", "reference"):
        q = _draft(path, device)
        if q is None:
            continue

        def bind_draft(h, i, made, path=path):  # one quantized expert a shape; copies of its bytes
            if (h, i) not in made:
                made[h, i] = _draft(path, device, h, i)
            qe = copy.deepcopy(made[h, i])
            return lambda x: qe.forward(0, 0, x)

        curve(
            f"draft:{path}",
            bind_draft,
            torch.float32,
            lambda h, i, q=q, path=path: int(3 * h * i * q.bytes_per_weight(path)),
            DEQUANT_TOKENS if path == "reference" else TOKENS,
            lambda h, i, q=q: int(3 * h * i * q.bytes_per_weight("kernel")),  # the codes and scales
        )
    return curves


def other_formats() -> list:
    """The expert layouts with kernels of their own on the CPU: gpt-oss's transposed bf16
    experts, its MXFP4 experts, block FP8 (Gemma 4's GELU experts run the SwiGLU kernel)."""
    from moespeq_cli.models.expert_format import HF_EXPERTS, MXFP4, fp8_experts, gpt_oss_experts

    return [gpt_oss_experts(1.702, 7.0), gpt_oss_experts(1.702, 7.0, MXFP4), fp8_experts(HF_EXPERTS, (128, 128))]


def random_parts(fmt, h: int, i: int) -> list[torch.Tensor]:
    """An expert of ``fmt`` with random weights as the format stores them (compact codes
    drawn so that no value is infinite or NaN): what a kernel timing needs."""
    g = torch.Generator().manual_seed(h + i)
    parts = []
    for shape, dtype in zip(fmt.shapes(h, i), fmt.part_dtypes(torch.bfloat16), strict=True):
        if dtype == torch.uint8:  # MXFP4 codes; scales near 2^-6
            top = 256 if len(shape) == 3 else 1
            t = torch.randint(0, top, shape, dtype=torch.uint8, generator=g)
            parts.append(t if top == 256 else t + 121)
        elif dtype == torch.float8_e4m3fn:  # every byte but the two NaNs
            codes = torch.randint(0, 126, shape, dtype=torch.uint8, generator=g)
            signs = torch.randint(0, 2, shape, dtype=torch.uint8, generator=g) << 7
            parts.append((codes | signs).view(dtype))
        else:
            parts.append((torch.randn(shape, generator=g) * 0.02).to(dtype))
    return parts


def landing(n: int) -> list[torch.Tensor]:
    """``n`` page-aligned buffers of a span's size for reads to land in, each written once
    first, as the tier's RAM slots are before reads land in them again: a read into pages
    never touched pays their faults (and the huge pages' allocation) in the read, which
    measured this VM's disk at 1.12-1.22 GB/s with two reads in flight where the same
    reads into written buffers gave 1.48-1.57 (the median of 8 alternating passes each)."""
    from moespeq_cli.runtime.tiers.disk import aligned_bytes

    out = [aligned_bytes(DISK_EXTENT)[0] for _ in range(n)]
    for t in out:
        t.fill_(1)
    return out


def spans_of(source: tuple[str, int], extent: int = DISK_EXTENT) -> list:
    """The spans calibration reads in ``source`` (path, size): ``DISK_FILE_BYTES`` in spans
    of ``extent`` (a whole number of pages), spread evenly over the whole file
    (page-aligned), as a model's experts lie across its files and the runtime reads them
    there, not the file's first 256 MiB in a row (on this VM's disk, adjacent spans at the
    file's start read slower than spans spread over the disk-tier benchmark's checkpoint in
    8 of 9 interleaved rounds of one probe, and alike in another: a drive may not serve
    every region alike)."""
    from moespeq_cli.runtime.tiers.disk import BLOCK, Extent, Placement

    name, size = source
    n = max(2, min(DISK_FILE_BYTES // extent, size // extent))
    step = (size - extent) / (n - 1)
    offsets = sorted({int(j * step) // BLOCK * BLOCK for j in range(n)})
    return [Placement(Extent(name, off, extent), 0, [Extent(name, off, extent)]) for off in offsets]


@contextlib.contextmanager
def reading(source: tuple[str, int] | None, in_flight: int = 2):
    """While the block runs, O_DIRECT reads of ``source`` (path, size) go on in the
    background, ``in_flight`` at a time (nothing when None). The block starts once the
    first reads have landed: what it times is reads in flight, not the reader starting
    (its threads and landing buffers: timed from the start, 50 ms of a 2.4 MB expert's
    calls came out at 1.59x their quiet mean, 200 ms at 1.24x). It is given a function
    returning the CPU seconds the reads have taken so far (their threads' own time). A
    read that fails, or reads that do not land within ``WAIT_S``, fail the block: a busy
    figure timed without reads beside it would pass for one."""
    if source is None:
        yield lambda: 0.0
        return
    from moespeq_cli.runtime.tiers.disk import DiskReader

    spans = spans_of(source)
    stop, ready = threading.Event(), threading.Event()
    readers: list = []
    failed: list[BaseException] = []

    def loop() -> None:
        dests = landing(in_flight)
        try:
            with DiskReader(threads=in_flight) as reader:
                readers.append(reader)
                k = 0
                while not stop.is_set():
                    reads = [reader.submit(spans[(k + j) % len(spans)], dests[j]) for j in range(in_flight)]
                    for r in reads:
                        r.wait()
                    ready.set()
                    k += in_flight
        except BaseException as e:  # noqa: BLE001 - handed to the block's thread, raised there
            failed.append(e)
        finally:
            ready.set()  # the block is not kept waiting

    def taken() -> float:
        return readers[0].cpu_seconds() if readers else 0.0

    def check() -> None:
        if failed:
            raise RuntimeError(f"the reads beside the kernel timings failed: {failed[0]}") from failed[0]

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        if not ready.wait(timeout=WAIT_S):
            raise RuntimeError(f"the reads beside the kernel timings did not land within {WAIT_S:g} s")
        check()
        yield taken
    finally:
        stop.set()
        thread.join(timeout=WAIT_S)
    if thread.is_alive():
        raise RuntimeError(f"the reads beside the kernel timings did not stop within {WAIT_S:g} s")
    check()


@contextlib.contextmanager
def disk_source(directory: Path, model_file: Path | None, say: Callable[[str], None]):
    """(path, bytes) of a file to time reads with: ``model_file`` (read only), or a scratch
    file written in ``directory`` and removed when the block ends (named with this
    process's pid: one a killed calibration left is removed by the next)."""
    from moespeq_cli.fs import remove_stale
    from moespeq_cli.runtime.tiers.disk import writable

    if model_file is not None:
        size = os.path.getsize(model_file)
        if size < 2 * DISK_EXTENT:
            raise OSError(22, f"{model_file} is too small to time reads with (under {2 * DISK_EXTENT} bytes)")
        yield str(model_file), size
        return
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale(directory, ".moespeq-calibrate-")
    fd, name = tempfile.mkstemp(prefix=f".moespeq-calibrate-{os.getpid()}.", dir=directory)
    try:
        say("disk: writing a scratch file")
        chunk = torch.randint(0, 256, (64 * 2**20,), dtype=torch.uint8)
        with os.fdopen(fd, "wb") as f:
            for _ in range(DISK_FILE_BYTES // chunk.numel()):
                f.write(writable(chunk))
            f.flush()
            os.fsync(f.fileno())
        yield name, DISK_FILE_BYTES
    finally:
        try:
            os.unlink(name)  # the scratch file this function made, nothing else
        except OSError:
            pass


def _draft(path: str, device: torch.device, h: int = 64, i: int = 128):
    """One 4-bit expert on ``path`` (None where the path cannot run here)."""
    from moespeq_cli.quant.draft import QuantizedExperts, _bnb

    bnb = _bnb()  # imported quietly (bitsandbytes logs a line about an optional package)

    parts = [
        bnb.quantize_4bit((torch.randn(*s) * 0.05).to(torch.bfloat16).contiguous(), blocksize=64, quant_type="nf4")
        for s in ((i, h), (i, h), (h, i))
    ]
    q = QuantizedExperts({(0, 0): parts}, "nf4", 64, torch.float32, h, i)
    if device.type == "cuda":
        return q.to(device)
    if path == "kernel":
        return q if q.kernel_ready() else None
    q.use_kernel = False
    if path == "packed" and not q.pack_cpu():
        return None
    return q


# -- the disk --------------------------------------------------------------------------
def disk_figures(source: tuple[str, int], threads: int, say: Callable[[str], None], rounds: int = 5) -> dict:
    """O_DIRECT reads of ``source`` (path, size), as the runtime reads an expert (one
    aligned span, in place into a page-aligned slot): B/s with 1 .. ``threads`` reads in
    flight, and the latency of a small read.

    A disk behind a VM's host drifts by tens of percent within a minute, so the depths
    are measured in ``rounds`` interleaved passes (1, 2, .., n, 1, 2, ..), each figure is
    the median of its rounds, and the curve is made non-decreasing (adjacent depths that
    dip are pooled to their mean: more reads in flight never serve fewer bytes in total;
    a dip is the drive drifting between measurements, not a property of the queue).

    A depth's figure is what the disk served while that many reads were in flight, from
    the reads' own intervals in the I/O threads (``bench.queue_curve``, the measure a run's
    "disk during run" takes, and the depth the mock's disk channels use): not bytes over a
    pass's wall time, which also held the pass's last reads with fewer in flight (on the
    same reads on this VM, 4 in flight came out at 0.84x their rate, one in flight alike)
    and each read's hand-over and wake, which the mock prices apart
    (``read_submit_overhead``, ``read_wake_curve``)."""
    from moespeq_cli.runtime.bench import queue_curve
    from moespeq_cli.runtime.tiers.disk import BLOCK, DiskReader, Extent
    from moespeq_cli.runtime.timeline import Interval

    name, size = source
    spans = spans_of(source)
    seen: dict[int, list[float]] = {q: [] for q in range(1, threads + 1)}
    direct = None
    buffers = landing(threads)
    for r in range(rounds):
        for q in range(1, threads + 1):
            say(f"disk: {q} read(s) in flight, round {r + 1} of {rounds}")
            with DiskReader(threads=q) as reader:
                dests = buffers[:q]
                shift = r * len(spans) // rounds
                order = spans[shift:] + spans[:shift]
                ivs: list[Interval] = []

                def landed(start: float, end: float, ivs=ivs) -> None:
                    ivs.append(Interval("disk", "read", "", start, end, bytes=DISK_EXTENT))

                # untimed first: each I/O thread's first read, after the pause between passes,
                # ran 11% below the rest on this VM (the median of 8 passes, 7 of them slower),
                # and a run's reader is warm for all but its first
                for rd in [reader.submit(p, dests[i]) for i, p in enumerate(order[-q:])]:
                    rd.wait()
                reads = [reader.submit(p, dests[i % q], done=landed) for i, p in enumerate(order)]
                for rd in reads:
                    rd.wait()
                seen[q].append(queue_curve(ivs, q)[q - 1])
                direct = reader.direct
    queue = non_decreasing([statistics.median(seen[q]) for q in range(1, threads + 1)])
    say("disk: latency")
    with DiskReader(threads=1) as reader:
        small = torch.empty(BLOCK, dtype=torch.uint8)
        lat = []
        for k in range(64):
            off = (k * 7919 * BLOCK) % (size - BLOCK)
            t0 = time.perf_counter()
            reader.read_into([Extent(name, off - off % BLOCK, BLOCK)], small)
            lat.append(time.perf_counter() - t0)
    return {
        "disk_bandwidth": max(queue),
        "disk_queue_bandwidth": queue,
        "disk_latency": statistics.median(lat),
        "direct": direct,
    }


def read_host_figures(source: tuple[str, int], threads: int, say: Callable[[str], None], reads: int = 24) -> dict:
    """What a read costs the compute thread, as the cpu backend issues and waits for it:
    ``read_submit_overhead`` (handing it to the I/O threads, timed on ``reads`` reads),
    ``read_wake_curve`` (``wake_curve``), and the CPU time of its I/O thread, a line over
    reads of 0.5-64 MiB (``read_cpu_overhead`` a read, ``disk_read_cpu`` a byte:
    ``read_cpu_points``, ``cpu_line``)."""
    from moespeq_cli.runtime.tiers.disk import DiskReader, aligned_bytes

    say("disk: what a read costs the compute thread")
    spans = spans_of(source)
    # the sizes the file holds twice (it holds DISK_EXTENT twice: four sizes at least), all
    # read into one buffer, its pages touched once first, as a RAM slot's are
    sizes = [b for b in WAKE_READ_BYTES if 2 * b <= source[1]]
    dest = aligned_bytes(max(sizes))[0]
    dest.fill_(1)
    submit = []
    with DiskReader(threads=threads) as reader:
        for k in range(reads):
            t0 = time.perf_counter()
            rd = reader.submit(spans[(k * 7) % len(spans)], dest)
            submit.append(time.perf_counter() - t0)
            rd.wait()
        cpu = read_cpu_points(source, reader, sizes, dest)
        curve = wake_curve(source, reader, sizes, dest)
    # read_cpu_overhead is written by every calibration: a profile without it is one from
    # before, priced the old way
    read_cpu_overhead, disk_read_cpu = cpu_line(cpu)
    return {
        "read_submit_overhead": statistics.median(submit),
        "read_wake_curve": curve,
        "read_cpu_overhead": read_cpu_overhead,
        "disk_read_cpu": disk_read_cpu,
    }


def read_cpu_points(
    source: tuple[str, int], reader, sizes: list[int], dest: torch.Tensor, reps: int = 12
) -> dict[int, float]:
    """{bytes: the I/O thread's CPU seconds a read (``thread_time``)} for reads of each of
    ``sizes`` into ``dest``, one after another with the CPU otherwise idle: the time a read
    takes from a kernel it starts beside is the thread's running time. (Timed between the
    wake curve's kernel calls, the pool's workers spinning through each wait, the same
    reads took 0.16-0.19 ms of CPU at 0.5 and 2 MiB, against 0.06 and 0.11 ms one after
    another; in a decode, four 2.4 MB reads starting beside a kernel delayed it 0.46 ms,
    0.115 ms a read.)"""
    out = {}
    for nbytes in sizes:
        spans = spans_of(source, nbytes)
        reader.submit(spans[-1], dest).wait()  # untimed: the thread's first read of a size
        cpu0 = reader.cpu_seconds()
        for k in range(reps):
            reader.submit(spans[(k * 7) % len(spans)], dest).wait()
        out[nbytes] = (reader.cpu_seconds() - cpu0) / reps
    return out


def cpu_line(per_read: dict[int, float]) -> tuple[float, float]:
    """(seconds a read, seconds a byte): the line through {bytes: CPU seconds a read} of
    least relative squared error (a machine's noise scales with what it times: unweighted,
    the 64 MiB reads' swings of 1.8-2.7 ms moved the part a read from 0 to 0.1 ms between
    three fits, which a 2 MiB read's 0.1 ms cannot then hold), neither part below zero."""
    pts = [(x, y, 1.0 / max(y, 1e-12) ** 2) for x, y in per_read.items()]
    sw = sum(w for _, _, w in pts)
    mx, my = sum(w * x for x, _, w in pts) / sw, sum(w * y for _, y, w in pts) / sw
    var = sum(w * (x - mx) ** 2 for x, _, w in pts)
    slope = sum(w * (x - mx) * (y - my) for x, y, w in pts) / var if var else 0.0
    if slope <= 0:
        return max(0.0, my), 0.0
    if my - slope * mx < 0:  # through the origin
        return 0.0, sum(w * x * y for x, y, w in pts) / sum(w * x * x for x, _, w in pts)
    return my - slope * mx, slope


# reads that block the compute thread from about 0.25 ms (a small expert's) to 30 ms (a
# queue of large ones) at 2 GB/s
WAKE_READ_BYTES = (512 * 2**10, 2 * 2**20, 6 * 2**20, DISK_EXTENT, 64 * 2**20)


def wake_curve(
    source: tuple[str, int], reader, sizes: list[int], dest: torch.Tensor, reps: int = 16
) -> list[tuple[float, float]]:
    """What the compute thread loses after blocking on a read, by how long it blocked: for
    reads of each of ``sizes`` into ``dest``, issued and waited for as the cpu backend
    does (``kernels.held``: the pool's workers awake), the time
    from the read landing to the thread running again, plus how much slower its next
    expert kernel is than the same kernel called back to back with the weights cycled
    beyond the last-level cache (the kernel curves' measure: the curve prices only what
    the wait adds). Each point: the median time blocked (from the wait's start to the
    read landing) and the median time lost, of ``reps`` reads; the times lost made
    non-decreasing. A CPU left idle comes back colder the longer it waited: on this 2-core
    VM 0.04-0.11 ms after up to 3 ms, 0.13-0.18 ms after 10-15 ms, 0.4-0.65 ms after
    30-37 ms. The one figure this replaces was measured after 22 MB reads (10 ms blocked)
    against the kernel with its weights still cached, so it also held the weights' cache
    misses the kernel curves price already: 0.51 ms, charged for every wait, several
    times a model's whose 2.4 MB reads block about 1 ms."""
    from moespeq_cli import kernels
    from moespeq_cli.runtime.executors.experts import expert_mlp

    h, i = SHAPES[1]

    def draw() -> list[torch.Tensor]:
        return [torch.randn(*s).to(torch.bfloat16) for s in ((i, h), (i, h), (h, i))]

    made: dict = {}
    experts = [copies(made, (h, i), draw) for _ in range(cold_count(3 * h * i * 2))]
    x = torch.randn(1, h)
    turn = [0]

    def kernel() -> float:
        g, u, d = experts[turn[0] % len(experts)]
        turn[0] += 1
        t0 = time.perf_counter()
        expert_mlp(x, g, u, d, fast=True)
        return time.perf_counter() - t0

    for _ in experts:
        kernel()
    back_to_back = statistics.median(kernel() for _ in range(3 * len(experts)))
    points = []
    for nbytes in sizes:
        spans = spans_of(source, nbytes)
        blocked, lost = [], []
        for k in range(reps):
            landed: list[float] = []
            rd = reader.submit(
                spans[(k * 7) % len(spans)], dest, done=lambda start, end, landed=landed: landed.append(end)
            )
            t_wait = time.perf_counter()
            with kernels.held():  # as the cpu backend waits
                rd.future.result()
            back = time.perf_counter()
            if landed[0] > t_wait:  # it did block
                blocked.append(landed[0] - t_wait)
                lost.append(back - landed[0] + kernel() - back_to_back)
        if blocked:
            points.append((statistics.median(blocked), statistics.median(lost)))
    points.sort()
    xs = [b for b, _ in points]
    if not points or len(set(xs)) < len(xs):
        return []  # (a disk too fast to block on: no curve, no wake charged)
    return list(zip(xs, non_decreasing([max(0.0, s) for _, s in points]), strict=True))


# -- the GPU -------------------------------------------------------------------------
def cuda_figures(say: Callable[[str], None]) -> dict:
    from moespeq_cli.runtime.backends.cuda import blas_workspace_bytes
    from moespeq_cli.runtime.executors.grouped import supported

    dev = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(dev)
    free, total = torch.cuda.mem_get_info(dev)
    say("GPU: launch and sync overhead")
    x = torch.ones(16, device=dev)
    n = 2000

    def launches():
        for _ in range(n):
            torch.add(x, x)
        torch.cuda.synchronize()

    launch = timed(launches, reps=5) / n
    sync = timed(lambda: [x[0].item() for _ in range(200)], reps=5) / 200
    say("GPU: pinned host-to-device copies")
    host = torch.empty(256 * 2**20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(host, device=dev)

    def copy(n=host.numel()):
        dst[:n].copy_(host[:n], non_blocking=True)
        torch.cuda.synchronize()

    bw = host.numel() / timed(copy, reps=5)
    latency = timed(lambda: copy(4096), reps=20)
    say("GPU: memory bandwidth and FLOP/s")
    big = torch.ones(256 * 2**20, device=dev)
    mem_bw = big.numel() * 4 / timed(lambda: (big.sum(), torch.cuda.synchronize()), reps=5)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    flops = 2 * 8192**3 / timed(lambda: (a @ a, torch.cuda.synchronize()), reps=5)
    return {
        "description": f"{props.name} (calibrated)",
        "device_memory": total,
        "reserved_memory": total - free,
        "link_bandwidth": bw,
        "link_latency": latency,
        "peak_flops": flops,
        "mem_bandwidth": mem_bw,
        "launch_overhead": launch,
        "sync_overhead": sync,
        "grouped_gemm": [d for d in GROUPED_DTYPES if supported(dev, getattr(torch, d))],
        "blas_workspace": blas_workspace_bytes(dev),
        "kernels": kernel_curves(dev, say),
    }


# -- the profile -----------------------------------------------------------------------
class OtherLoad:
    """The share of this machine's CPU time that other processes (and, in a VM, the
    hypervisor: steal) took while calibration ran: measured on a busy machine, every figure
    is low (a user's run of pytest beside it halved memory bandwidth). From /proc/stat's
    busy time less this process's own; None where the system does not say."""

    BUSY = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (not idle, not iowait)

    def __init__(self):
        self.start = self._sample()

    @classmethod
    def _sample(cls) -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()[1:]
            busy = sum(int(fields[i]) for i in cls.BUSY if i < len(fields)) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
        own = os.times()  # and its children's (the C compiler building the CPU kernels)
        return busy, own.user + own.system + own.children_user + own.children_system, time.monotonic()

    def share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[2] - self.start[2] < 1:
            return None
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        cpus = os.cpu_count() or 1  # /proc/stat counts every CPU, whatever this process may use
        return min(1.0, max(0.0, other / ((end[2] - self.start[2]) * cpus)))


BUSY_SHARE = 0.1  # other processes' share of the CPU above which a calibration is said to be unreliable


def busy(figures: dict) -> bool:
    """Whether other processes took enough of the CPU while ``figures`` were measured
    for them to be likely low (``OtherLoad``)."""
    return (figures.get("_other_load") or 0) > BUSY_SHARE


def calibrate(
    disk_dir: Path,
    threads: int = 4,
    cuda: bool | None = None,
    say: Callable[[str], None] = print,
    model_file: Path | None = None,
    checkpoint: Path | None = None,
    overheads: bool = True,
) -> dict:
    """Every figure of a profile for this machine (a dict in the profile's fields).
    ``overheads``: measure the host time the op count misses, decoding ``checkpoint`` (the
    bundled demo model without one) for real and on the mock."""
    from moespeq_cli.runtime.planning.planner import memory_info

    cuda = torch.cuda.is_available() if cuda is None else cuda
    load = OtherLoad()
    host = host_figures(say)  # (torch's threads: the machine's figures)
    with disk_source(disk_dir, model_file, say) as source:
        disk = disk_figures(source, threads, say)
        if not cuda:
            from moespeq_cli import kernels

            # the kernels' timings as the cpu backend decodes (runtime/engine.py): its pool
            # takes the cores and torch steps down to one thread. Two pools on 2 cores: a
            # 4.7 MB expert's figure after torch's work came out at 0.24-0.48 ms, 0.25-0.32
            # with one. (The disk is timed before, as it always was: in fresh processes on
            # this VM it read 1.77-2.03 GB/s four in flight that way, 1.69-1.79 after.)
            kernels.claim_threads()
        disk.update(read_host_figures(source, threads, say))
        # a busy figure spans two reads of the background's (2 in flight) at the disk's speed
        span = 2 * DISK_EXTENT / disk["disk_queue_bandwidth"][min(1, len(disk["disk_queue_bandwidth"]) - 1)]
        host_curves = kernel_curves(torch.device("cpu"), say, busy_file=source, busy_span_s=span)
    disk["disk_source"] = str(model_file) if model_file else "a scratch file"
    info = memory_info()
    total = info[0] if info else 16 * 2**30
    figures = {
        "name": "calibrated-gpu" if cuda else "calibrated-cpu",
        "kind": "gpu" if cuda else "cpu",
        "description": f"this machine's CPU ({os.cpu_count()} threads), calibrated",
        "device_memory": total,
        "reserved_memory": max(2**30, total // 10),
        **{k: host[k] for k in ("host_mem_bandwidth", "host_flops", "host_op_overhead")},
        "disk_bandwidth": disk["disk_bandwidth"],
        "disk_latency": disk["disk_latency"],
        "disk_queue_bandwidth": disk["disk_queue_bandwidth"],
        "disk_read_cpu": disk["disk_read_cpu"],
        "read_cpu_overhead": disk["read_cpu_overhead"],
        "read_submit_overhead": disk["read_submit_overhead"],
        "read_wake_curve": disk["read_wake_curve"],
        "_direct": disk["direct"],
        "_disk_source": disk["disk_source"],
    }
    if cuda:
        figures.update(cuda_figures(say))
        figures["host_kernels"] = host_curves
        backend = "cuda"
    else:
        # the device is this CPU: its figures are the host's, and its link is the disk
        figures.update(
            peak_flops=host["host_flops"],
            mem_bandwidth=host["host_mem_bandwidth"],
            launch_overhead=host["host_op_overhead"],
            sync_overhead=host["sync_overhead"],
            link_bandwidth=disk["disk_bandwidth"],
            link_latency=disk["disk_latency"],
            kernels=host_curves,
        )
        backend = "cpu"
    if overheads:
        from moespeq_cli.errors import debug, one_line
        from moespeq_cli.model_ref import DEMO_DIR
        from moespeq_cli.runtime.planning.overheads import region_overheads

        model = checkpoint or DEMO_DIR
        try:
            figures["region_overhead"] = region_overheads(model, figures, say, backend=backend)
            figures["_overhead_model"] = str(model) if checkpoint else "the bundled demo model"
        except Exception as e:  # noqa: BLE001 - the demo's decode is optional: its failure is noted, not fatal
            # a checkpoint the user named must decode; the demo is only a stand-in, and a
            # GPU's cached calibration (every cuda run without --hardware) must not fail on it
            if checkpoint is not None or debug():
                raise
            figures["_overhead_error"] = one_line(e)
            say(f"host time: not measured ({figures['_overhead_error']})")
    figures["_other_load"] = load.share()
    return figures


# how each figure was measured; a pair: (on a GPU, on a CPU, whose device is itself); one
# beginning with SET is chosen, not measured
SET = "set: "
METHODS = {
    "device_memory": ("the GPU's total memory (cudaMemGetInfo)", "total memory (MemTotal)"),
    "reserved_memory": (
        "what the CUDA context held at start",
        SET + "a tenth of the memory, at least 1 GiB (the system's and other programs' margin)",
    ),
    "link_bandwidth": ("pinned 256 MiB host-to-device copies", "the disk's O_DIRECT bandwidth (disk_bandwidth)"),
    "link_latency": ("a 4 KiB copy", "a 4 KiB O_DIRECT read (disk_latency)"),
    "peak_flops": ("8192^2 bf16 matmul", "1024^3 float32 matmul (host_flops)"),
    "mem_bandwidth": ("a reduction over 1 GiB", "a reduction over 512 MiB of float32 (host_mem_bandwidth)"),
    "launch_overhead": ("2000 tiny adds, per op", "2000 tiny adds on the CPU, per op (host_op_overhead)"),
    "host_flops": "1024^3 float32 matmul",
    "host_mem_bandwidth": "a reduction over 512 MiB of float32",
    "host_op_overhead": "2000 tiny adds on the CPU, per op",
    "sync_overhead": "reading a one-element tensor back, per read",
    "grouped_gemm": "the dtypes torch._grouped_mm has a real kernel for here (bf16 on compute capability 9, 10) and runs in",
    "blas_workspace": "what the allocator holds more after the compute stream's first bf16 matmuls (cuBLAS, cuBLASLt)",
    "disk_bandwidth": "O_DIRECT reads of 22 MiB spread over the file, the best of 1 to 4 in flight",
    "disk_latency": "median of 64 O_DIRECT 4 KiB reads",
    "disk_read_cpu": "CPU time of the reading thread per byte (thread_time): with read_cpu_overhead, a line through O_DIRECT reads of 0.5 to 64 MiB one after another, 12 a size (without it: reads of 22 MiB, the median pass)",
    "read_cpu_overhead": "CPU time of the reading thread per read (thread_time): with disk_read_cpu, a line through O_DIRECT reads of 0.5 to 64 MiB one after another, 12 a size",
    "read_submit_overhead": "the compute thread's time in DiskReader.submit, median of 24 reads of 22 MiB",
    "read_wake_curve": (
        "seconds (s) a thread waiting for an O_DIRECT read as the cpu backend does loses by the time it was blocked "
        "(blocked, s): from the read landing to the thread running, plus its next expert kernel's time beyond "
        "back-to-back calls; reads of 0.5 to 64 MiB, the median of 16 a point"
    ),
    "disk_queue_bandwidth": (
        "O_DIRECT reads of 22 MiB spread over the file with 1, 2, 3, 4 in flight, the median of 5 interleaved rounds, made non-decreasing"
    ),
}


def _num(v: float) -> str:
    """A float as YAML reads it back as one (PyYAML wants a dot: ``1e+09`` is a string)."""
    text = f"{v:.6g}"
    mantissa, _, exponent = text.partition("e")
    if "." not in mantissa and mantissa.lstrip("-").isdigit():
        mantissa += ".0"
    return mantissa + (f"e{exponent}" if exponent else "")


def profile_yaml(figures: dict) -> str:
    """The profile as YAML, each figure marked as measured, with the date and the method."""
    import json

    today = datetime.date.today().isoformat()
    out = [
        f"# {figures['description']}: written by `moespeq calibrate` on {today}.",
        "# Every figure below was measured on this machine (but those marked set); re-run calibrate after a hardware change.",
        "# Kernel curves: seconds per call for 1..16 tokens at two weight sizes, and the ops one call dispatches.",
    ]
    buffered = figures.get("_direct") is False

    def method(key: str) -> str | None:
        """How ``key`` was measured on this kind of machine; reads said as they were
        (buffered where O_DIRECT was refused)."""
        text = METHODS.get(key)
        if isinstance(text, tuple):
            text = text[0] if figures["kind"] == "gpu" else text[1]
        return text.replace("O_DIRECT", "buffered (no O_DIRECT there)") if text and buffered else text

    kind = "buffered reads" if buffered else "O_DIRECT reads"
    out.append(f"# The disk's figures: {kind} of {figures.get('_disk_source', 'a scratch file')}.")
    if buffered:
        out.append(
            "# Its file system refused O_DIRECT (tmpfs does): the figures are buffered reads dropped from the page"
            " cache after each, as the runtime reads there -- on tmpfs, memory's speed, not a disk's."
        )
    if busy(figures):
        out.append(
            f"# Other processes took {figures['_other_load']:.0%} of the CPU meanwhile: these figures are likely"
            " low, some far off; calibrate again on an idle machine."
        )
    if figures.get("_overhead_error"):
        reason = "".join(c for c in figures["_overhead_error"] if c.isprintable())
        out.append(f"# The host time per region was not measured: decoding the demo model failed ({reason}).")
    for key in (
        "name",
        "description",
        "kind",
        "device_memory",
        "reserved_memory",
        "link_bandwidth",
        "link_latency",
        "peak_flops",
        "mem_bandwidth",
        "launch_overhead",
        "host_flops",
        "host_mem_bandwidth",
        "host_op_overhead",
        "sync_overhead",
        "grouped_gemm",
        "blas_workspace",
        "disk_bandwidth",
        "disk_latency",
        "disk_read_cpu",
        "read_cpu_overhead",
        "read_submit_overhead",
    ):
        if figures.get(key) is None and key in (
            "disk_read_cpu",
            "read_cpu_overhead",
            "read_submit_overhead",
            "grouped_gemm",
            "blas_workspace",
        ):
            continue  # optional: a profile without them does not price reads' host time (a CPU's: no GPU kernel)
        v = figures[key]
        text = json.dumps(v) if isinstance(v, str | list | tuple) else (str(v) if isinstance(v, int) else _num(v))
        how = method(key)
        verb, how = ("set", how.removeprefix(SET)) if how and how.startswith(SET) else ("measured", how)
        out.append(f"{key}: {text}" + (f"  # {verb} {today}: {how}" if how else ""))
    q = ", ".join(_num(x) for x in figures["disk_queue_bandwidth"])
    out.append(f"disk_queue_bandwidth: [{q}]  # measured {today}: {method('disk_queue_bandwidth')}")
    if figures.get("read_wake_curve"):
        blocked, lost = zip(*figures["read_wake_curve"], strict=True)
        out.append(f"read_wake_curve:  # measured {today}: {method('read_wake_curve')}")
        out.append(f"  blocked: [{', '.join(_num(b) for b in blocked)}]")
        out.append(f"  seconds: [{', '.join(_num(s) for s in lost)}]")
    if figures.get("region_overhead"):
        model = figures.get("_overhead_model", "a checkpoint")
        out.append(
            f"region_overhead:  # measured {today}: host seconds a call beyond (negative: below) its priced work, decoding {model} "
            "for real and on the mock (layer: the code between regions, per layer of a forward pass)"
        )
        for name, s in figures["region_overhead"].items():
            out.append(f"  {json.dumps(name)}: {_num(s)}")
    for table in ("kernels", "host_kernels"):
        if not figures.get(table):
            continue
        out.append(
            f"{table}:  # measured {today}: the median of up to {CURVE_REPS} calls a point after "
            f"{WARM_S * 1e3:.0f} ms of calls, weights cycled through {COLD_BYTES // 2**20} MiB (beyond the last-level "
            "cache), on a cpu profile the threads as the cpu backend sets them; NAME@busy: the mean over two reads' "
            "time of calls, O_DIRECT reads running beside"
        )
        for name, c in figures[table].items():
            rows = ", ".join("[" + ", ".join(_num(x) for x in row) + "]" for row in c["seconds"])
            out.append(f"  {json.dumps(name)}:")
            out.append(f"    tokens: {c['tokens']}")
            out.append(f"    sizes: [{_num(c['sizes'][0])}, {_num(c['sizes'][1])}]")
            out.append(f"    seconds: [{rows}]")
            out.append(f"    ops: {c['ops']}")
    return "\n".join(out) + "\n"


def cached_gpu_profile(say: Callable[[str], None] = lambda step: None, measure=None):
    """This GPU's calibrated profile, from moespeq's cache; calibrated (and cached) first
    when there is none, so that a run without --hardware prices this GPU, not a guess.
    ``measure``: the calibration to run (tests)."""
    import re

    from moespeq_cli.fs import atomic_write_text, cache_dir
    from moespeq_cli.runtime.planning.hardware import load_profile

    name = torch.cuda.get_device_properties(torch.cuda.current_device()).name
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
    path = cache_dir() / "profiles" / f"calibrated-{slug}.yaml"
    if not path.exists():
        figures = (measure or calibrate)(cache_dir(), cuda=True, say=say)
        if busy(figures):
            # likely low figures: this run's only, not every later run's
            import sys

            print(
                f"note: other processes took {figures['_other_load']:.0%} of the CPU while calibrating this GPU: its "
                "figures price this run only and are not cached; the next run calibrates again",
                file=sys.stderr,
            )
            with tempfile.TemporaryDirectory() as tmp:
                once = Path(tmp) / f"calibrated-{slug}.yaml"
                once.write_text(profile_yaml(figures))
                return load_profile(str(once))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, profile_yaml(figures))
    return load_profile(str(path))
