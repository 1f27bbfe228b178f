"""The disk tier: routed experts read straight from the checkpoint's safetensors files.

This is the bottom of the memory hierarchy (docs/design.md §9: disk -> host RAM -> device).
A safetensors file is an 8-byte header length, a JSON header naming each tensor's byte
range, then the raw bytes, so every expert is a known extent of a file and, in the
files Hugging Face writes (tensors sorted by name), its gate, up and down projections are
adjacent: one expert is usually *one* read.

Reads must mean what a RAM budget says, so they bypass the page cache: the file is
opened with ``O_DIRECT`` and read in whole aligned blocks (offset, length and buffer all
multiples of the block size). An expert that is one extent is read *in place*: the
aligned blocks around it land straight in its page-aligned RAM slot and the expert's
bytes start a few hundred bytes in (``Placement.shift``), so no CPU time is spent
copying (on a two-core machine, four I/O threads copying out of bounce buffers slowed
the compute thread several-fold). Other reads go through a page-aligned bounce buffer.
Where the file system refuses ``O_DIRECT`` (tmpfs, some network file systems) the
reader falls back to ordinary reads followed by ``posix_fadvise(DONTNEED)`` on the
range, and says so in ``DiskReader.direct``.

The checkpoint's files are held open from the moment it is opened (``TensorFile``), and
the reader reopens *those* files (``/proc/self/fd/N``, with its own flags), not their
names: a download or ``save_pretrained`` that renames a new file over a shard mid-run
is not read as if it were the old one. Where there is no ``/proc`` the name is opened
and must still be the held file, else the read stops with an error.

Reads run on a small pool of threads (``os.preadv`` releases the GIL), so a read
overlaps compute; ``submit`` returns a ``DiskRead`` whose ``wait()`` blocks only until
that read has landed, like a copy's event on a stream.
"""

from __future__ import annotations

import ctypes
import errno
import math
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import torch

from moespeq_cli.errors import CheckpointError
from moespeq_cli.models.checkpoint import STORED_DTYPES
from moespeq_cli.models.expert_format import aligned, views_at
from moespeq_cli.models.tensor_file import Extent, pread_into, truncated

BLOCK = 4096  # O_DIRECT alignment: the page size covers every common logical block size
PROC_FD = "/proc/self/fd/{}"  # a held descriptor's file, reopened with other flags (Linux)


def coalesce(extents: list[Extent]) -> list[Extent]:
    """Adjacent extents of one file merged, in file order: an expert's three projections
    are usually one read."""
    merged: list[Extent] = []
    for e in sorted(extents, key=lambda e: (e.file, e.offset)):
        last = merged[-1] if merged else None
        if last is not None and last.file == e.file and last.offset + last.length == e.offset:
            merged[-1] = Extent(e.file, last.offset, last.length + e.length)
        else:
            merged.append(e)
    return merged


@dataclass(frozen=True)
class Placement:
    """How one expert's bytes land in a RAM slot: read ``span`` (aligned blocks around
    the expert, one extent) to the slot's start, the expert then starting ``shift`` bytes
    in; or, with ``span`` None, ``extents`` packed back to back from the start."""

    span: Extent | None
    shift: int
    extents: list[Extent]


def ram_slot_bytes(expert_bytes: int) -> int:
    """The RAM one expert's slot takes: whole pages that hold the aligned blocks around it,
    wherever it starts in its file (at most one page more than the expert, rounded up)."""
    return -(-expert_bytes // BLOCK) * BLOCK + BLOCK


def writable(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (for ``os.preadv``)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


class PageMapping(mmap.mmap):
    """An anonymous mapping whose ``on_free`` callbacks run when it is collected, after
    the last tensor viewing it is gone and *before* the memory is unmapped (a weakref
    callback on an mmap runs after the unmap): the GPU's registration of the memory is
    undone there (backends/host_registry.py)."""

    def __del__(self) -> None:
        for fn in getattr(self, "on_free", ()):
            try:
                fn()
            except Exception:  # noqa: BLE001 - at exit CUDA may be gone; the process's end releases it anyway
                pass


def aligned_bytes(n: int) -> tuple[torch.Tensor, PageMapping]:
    """``n`` zero-filled bytes at a page boundary, as a uint8 tensor, and the mapping that
    holds them (keep it alive as long as the tensor)."""
    m = PageMapping(-1, max(n, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.on_free = []
    return torch.frombuffer(m, dtype=torch.uint8, count=n), m


class Held(NamedTuple):
    """A checkpoint file the reader reads through: its own copy of the descriptor held
    open, the file's (device, inode), and its (size, mtime) when its header was read."""

    fd: int
    ident: tuple[int, int]
    stamp: tuple[int, int]


class DiskRead:
    """A read in flight; ``wait()`` returns once its bytes are in the destination."""

    __slots__ = ("future", "nbytes")

    def __init__(self, future: Future, nbytes: int):
        self.future, self.nbytes = future, nbytes

    def done(self) -> bool:
        return self.future.done()

    def wait(self) -> None:
        self.future.result()


class DiskReader:
    """Reads extents into destination byte tensors on ``threads`` I/O threads, bypassing
    the page cache (``O_DIRECT``, else read + ``posix_fadvise(DONTNEED)``).

    ``delay_s`` slows every read by that much (tests: reads that are really asynchronous
    keep their tokens and overlap compute)."""

    def __init__(self, threads: int = 4, direct: bool = True, delay_s: float = 0.0, bounce_bytes: int = 8 << 20):
        self.want_direct = direct
        self.threads = threads
        self.delay_s = delay_s
        self.bounce_bytes = bounce_bytes
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moespeq-disk")
        self.local = threading.local()
        self.fds: dict[tuple[str, bool], int] = {}
        self.held: dict[str, Held] = {}  # path -> the file held open: read it, and only as it was
        self.lock = threading.Lock()
        self.direct: bool | None = None  # known after the first open: True, or False (fallback)
        self.bytes_read = 0
        self.cpu_s = 0.0  # CPU time the reading threads spent in reads (the kernel's share: pinning, I/O setup)
        self.busy_s = 0.0  # time with at least one read in flight
        self._active = 0
        self._busy_since = 0.0
        self._inflight: set[Future] = set()

    # -- files --------------------------------------------------------------------
    def hold(self, files: dict[str, tuple[int, tuple[int, int]]]) -> None:
        """Read the files named in extents (path -> (a descriptor held open on it, its
        (size, mtime) when its header was read)) from those descriptors' files, whatever
        their names come to point at, and only as they were then. The reader keeps a copy
        of each descriptor (closed with it): the checkpoint's may close first."""
        with self.lock:
            for path, (fd, stamp) in files.items():
                if path in self.held:
                    continue
                own = os.dup(fd)
                st = os.fstat(own)
                self.held[path] = Held(own, (st.st_dev, st.st_ino), stamp)

    @staticmethod
    def _written(fd: int, held: Held) -> bool:
        """Whether the file open at ``fd`` is no longer as ``held`` found it (its size or
        time changed, or it cannot be looked at)."""
        try:
            st = os.fstat(fd)
        except OSError:
            return True
        return (st.st_size, st.st_mtime_ns) != held.stamp

    def changed(self) -> list[str]:
        """The held files written since they were held (the check each read makes)."""
        with self.lock:
            held = list(self.held.items())
        return [path for path, h in held if self._written(h.fd, h)]

    def _fd(self, file: str) -> tuple[int, bool]:
        with self.lock:
            for direct in (True, False) if self.want_direct else (False,):
                if (file, direct) in self.fds:
                    return self.fds[(file, direct)], direct
            if self.want_direct and hasattr(os, "O_DIRECT"):
                try:
                    fd = self._open(file, os.O_DIRECT)
                    self.fds[(file, True)] = fd
                    self.direct = True if self.direct is None else self.direct
                    return fd, True
                except OSError:  # EINVAL: tmpfs and friends
                    pass
            fd = self._open(file, 0)
            self.fds[(file, False)] = fd
            self.direct = False
            return fd, False

    def _unchanged(self, file: str, fd: int) -> None:
        """A held file must not have been written since it was held (``cp`` over a shard
        in place: its bytes would be another file's at this file's offsets, and the tokens
        silently wrong); checked after each read, an ``fstat``: microseconds a read of
        hundreds."""
        held = self.held.get(file)
        if held is not None and self._written(fd, held):
            raise CheckpointError(
                f"{file} was written while moespeq was reading it (copied over in place?); its experts would be "
                "another file's bytes: run again once it is whole"
            )

    def _open(self, file: str, flags: int) -> int:
        """``file`` opened for reading with ``flags``: the held file where there is one."""
        flags |= os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        held = self.held.get(file)
        fd = None
        if held is not None:
            try:
                fd = os.open(PROC_FD.format(held.fd), flags)
            except OSError as e:  # no /proc, or one closed to us (hidepid): the name, checked below
                if e.errno == errno.EINVAL:  # O_DIRECT refused there: the caller falls back
                    raise
        if fd is None:
            fd = os.open(file, flags)
        st = os.fstat(fd)
        if held is not None and (st.st_dev, st.st_ino) != held.ident:
            os.close(fd)
            raise CheckpointError(
                f"{file} was replaced while moespeq was running (its experts were read from the file opened at "
                "start); run again"
            )
        return fd

    def _bounce(self) -> memoryview:
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = mmap.mmap(-1, self.bounce_bytes)  # page-aligned
        return memoryview(buf)

    # -- reading ------------------------------------------------------------------
    def read_into(self, extents: list[Extent], dest: torch.Tensor) -> None:
        """Read ``extents`` back to back into the uint8 tensor ``dest`` (synchronously)."""
        if self.delay_s:
            time.sleep(self.delay_s)
        out = dest.view(torch.uint8).reshape(-1)
        pos = 0
        for e in coalesce(extents) if _in_order(extents) else extents:
            self._read_extent(e, out[pos : pos + e.length])
            pos += e.length
        if pos != out.numel():
            raise ValueError(f"read {pos} bytes into a buffer of {out.numel()}")

    def read_placed(self, placement: Placement, dest: torch.Tensor) -> None:
        """Read one expert into its slot ``dest`` (uint8) as ``placement`` says: in place,
        or packed through the bounce buffer."""
        if placement.span is None:
            self.read_into(placement.extents, dest[: sum(e.length for e in placement.extents)])
            return
        if self.delay_s:
            time.sleep(self.delay_s)
        span, need = placement.span, placement.shift + sum(e.length for e in placement.extents)
        fd, direct = self._fd(span.file)
        got = pread_into(fd, writable(dest[: span.length]), span.offset, direct)
        if got < need:
            raise truncated(Extent(span.file, span.offset, need))
        self._unchanged(span.file, fd)
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, span.offset, span.length, os.POSIX_FADV_DONTNEED)
        with self.lock:
            self.bytes_read += need - placement.shift

    def _read_extent(self, e: Extent, out: torch.Tensor) -> None:
        fd, direct = self._fd(e.file)
        bounce = self._bounce()
        done = 0
        while done < e.length:
            start = e.offset + done
            want = min(e.length - done, self.bounce_bytes - 2 * BLOCK)
            lo = start - start % BLOCK if direct else start
            hi = -(-(start + want) // BLOCK) * BLOCK if direct else start + want
            got = pread_into(fd, bounce[: hi - lo], lo, direct)
            usable = min(got - (start - lo), want)
            if usable <= 0:
                raise truncated(e)
            out[done : done + usable].copy_(
                torch.frombuffer(bounce, dtype=torch.uint8, count=usable, offset=start - lo)
            )
            done += usable
        self._unchanged(e.file, fd)
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, e.offset, e.length, os.POSIX_FADV_DONTNEED)
        with self.lock:
            self.bytes_read += e.length

    def submit(
        self,
        what: list[Extent] | Placement,
        dest: torch.Tensor,
        before: Callable[[], None] | None = None,
        done: Callable[[float, float], None] | None = None,
    ) -> DiskRead:
        """Start reading ``what`` (extents back to back, or one expert's ``Placement``)
        into ``dest`` on an I/O thread. The thread first calls ``before()`` (it waits there
        for whatever must finish before ``dest`` is overwritten), and after the read
        ``done(start, end)`` with ``time.perf_counter`` times of the read itself."""

        def task() -> None:
            if before is not None:
                before()
            start = time.perf_counter()
            self.read(what, dest)
            if done is not None:
                done(start, time.perf_counter())

        future = self.pool.submit(task)
        with self.lock:
            self._inflight.add(future)
        future.add_done_callback(self._landed)
        extents = what.extents if isinstance(what, Placement) else what
        return DiskRead(future, sum(e.length for e in extents))

    def read(self, what: list[Extent] | Placement, dest: torch.Tensor) -> None:
        """Read ``what`` into ``dest`` now, on the calling thread."""
        with self.lock:  # the disk is busy while any read is in flight: their union is timed
            if not self._active:
                self._busy_since = time.perf_counter()
            self._active += 1
        cpu = time.thread_time()
        try:
            if isinstance(what, Placement):
                self.read_placed(what, dest.view(torch.uint8).reshape(-1))
            else:
                self.read_into(what, dest)
        finally:
            cpu = time.thread_time() - cpu
            with self.lock:
                self.cpu_s += cpu
                self._active -= 1
                if not self._active:
                    self.busy_s += time.perf_counter() - self._busy_since

    def bandwidth(self) -> float | None:
        """Bytes per second while any read was in flight, over every read so far (None
        before the first has finished): what the disk gives at this reader's queue depth."""
        with self.lock:
            return self.bytes_read / self.busy_s if self.busy_s > 0 and self.bytes_read else None

    def cpu_seconds(self) -> float:
        """CPU seconds the reads that have finished so far cost their threads (``thread_time``)."""
        with self.lock:
            return self.cpu_s

    def _landed(self, future: Future) -> None:
        with self.lock:
            self._inflight.discard(future)

    def drain(self) -> None:
        """Wait until every read submitted so far has landed (errors are left to the
        reads' own waiters)."""
        while True:
            with self.lock:
                pending = list(self._inflight)
            if not pending:
                return
            for f in pending:
                f.exception()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)  # (a read queued behind one waiting for it: never run)
        with self.lock:
            for fd in [*self.fds.values(), *(h.fd for h in self.held.values())]:
                os.close(fd)
            self.fds.clear()
            self.held.clear()

    def __enter__(self) -> DiskReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _in_order(extents: list[Extent]) -> bool:
    """Coalescing may only reorder nothing: extents already in file order."""
    return all((a.file, a.offset) < (b.file, b.offset) for a, b in zip(extents, extents[1:], strict=False))


def misaligned(path) -> str:
    return (
        f"the experts of {path} have sizes that misalign their parts' elements when packed in one buffer "
        "(an expert's matrix sizes are not multiples of 4 bytes); moespeq cannot hold them compact"
    )


FLOAT_PARTS = ("BF16", "F16", "F32", "F64")  # what an expert not stored compact may be held in
CONVERT = "save the checkpoint again with one torch_dtype (transformers' save_pretrained does)"


class DiskExperts:
    """Every routed expert of a checkpoint as extents of its files, and the packed layout
    one read lands in: the disk tier's table of contents (it holds no expert in memory).

    The packed buffer of an expert follows the *file's* order of its parts (for
    Mixtral's sorted names that is w1 | w2 | w3: gate, down, up), so that an expert whose
    projections are adjacent on disk is one read; ``views`` maps it back to the config's
    order. A fused format (gpt-oss: one tensor per part for all of a layer's experts)
    reads row ``e`` of each. Experts stay in the checkpoint's dtype: every tier above
    holds them so."""

    def __init__(self, ckpt):
        c = self.config = ckpt.config
        ckpt.check_experts()
        tables = {name: ckpt._data[name].table for name in ckpt._files}  # the headers read at open
        # what to read: each file held open, and its (size, mtime) when its header was read
        self.held = {str(ckpt._data[name].path): (ckpt._data[name].fd, ckpt._data[name].stamp) for name in ckpt._files}
        shapes = c.expert_shapes()
        sizes = [math.prod(s) for s in shapes]
        fused = c.expert_format.fused

        def entry(key: str):
            return tables[ckpt._where[key]][ckpt._real.get(key, key)]

        def part(key: str, p: int, e: int) -> Extent:
            """Part ``p`` of expert ``e``: the whole tensor, or row ``e`` of a fused one."""
            ext, dtype, _ = entry(key)
            if not fused:
                return ext
            size = sizes[p] * STORED_DTYPES[dtype].itemsize
            return Extent(ext.file, ext.offset + e * size, size)

        first = [entry(k) for k in c.expert_keys(c.moe_layers[0], 0)]
        names = [d for _, d, _ in first]  # each part's safetensors dtype, the same for every expert
        if c.expert_format.compact:  # several dtypes (codes, scales, biases): every tier holds the bytes
            self.dtype = torch.uint8
            self.part_dtypes = tuple(STORED_DTYPES[d] for d in names)
            lengths = [n * d.itemsize for n, d in zip(sizes, self.part_dtypes, strict=True)]
        else:
            if len(set(names)) != 1:
                raise CheckpointError(
                    f"the experts of {ckpt.path} mix dtypes {sorted(set(names))} within one expert; moespeq "
                    f"moves experts in one float dtype: {CONVERT}"
                )
            if names[0] not in FLOAT_PARTS:  # FP8 without the config that says how to scale it, say
                raise CheckpointError(
                    f"the experts of {ckpt.path} are stored as {names[0]}, which moespeq reads only as its "
                    "config's quantization_config describes (none does here); download the checkpoint again"
                )
            self.dtype, self.part_dtypes, lengths = STORED_DTYPES[names[0]], None, sizes
        # The parts' order in the file (for most families 0 = gate, 1 = up, 2 = down), from the first expert.
        self.order = sorted(range(len(shapes)), key=lambda p: (first[p][0].file, first[p][0].offset))
        self.numel = sum(lengths)
        self.nbytes = self.numel * torch.empty(0, dtype=self.dtype).element_size()
        self._starts = {}  # part -> element offset in the packed buffer
        if self.part_dtypes is not None and not aligned(lengths, self.part_dtypes, self.order):
            raise CheckpointError(misaligned(ckpt.path))
        pos = 0
        for p in self.order:
            self._starts[p] = pos
            pos += lengths[p]
        self.extents: dict[tuple[int, int], list[Extent]] = {}
        for layer in c.moe_layers:
            for e in range(c.num_experts):
                keys = c.expert_keys(layer, e)
                if (got := [entry(k)[1] for k in keys]) != names:
                    raise CheckpointError(
                        f"expert {e} of layer {layer} in {ckpt.path} is stored as {'/'.join(got)}, expert 0 of "
                        f"layer {c.moe_layers[0]} as {'/'.join(names)}; moespeq moves experts in one dtype: {CONVERT}"
                    )
                ordered = [part(keys[p], p, e) for p in self.order]
                self.extents[(layer, e)] = coalesce(ordered) if _in_order(ordered) else ordered

        elem = torch.empty(0, dtype=self.dtype).element_size()
        self.placements: dict[tuple[int, int], Placement] = {}
        for key, ext in self.extents.items():
            if len(ext) == 1 and ext[0].offset % elem == 0:
                e = ext[0]
                lo, hi = e.offset - e.offset % BLOCK, -(-(e.offset + e.length) // BLOCK) * BLOCK
                self.placements[key] = Placement(Extent(e.file, lo, hi - lo), e.offset - lo, ext)
            else:
                self.placements[key] = Placement(None, 0, ext)
        self.slot_bytes = ram_slot_bytes(self.nbytes)
        assert all((p.span.length if p.span else self.nbytes) <= self.slot_bytes for p in self.placements.values())

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A packed expert buffer -> its parts in the config's order (e.g. gate [I, H],
        up [I, H], down [H, I]), as views (of their own dtypes, for a compact format)."""
        return views_at(flat, self._starts, self.config.expert_shapes(), self.part_dtypes)

    @property
    def layout(self):
        """The packed layout (device slots: the expert at the slot's start)."""
        from moespeq_cli.runtime.tiers.cache import ExpertLayout

        return ExpertLayout(self.numel, self.dtype, self.views)

    @property
    def ram_layout(self):
        """RAM slots: whole pages, each expert where its in-place read puts it."""
        from moespeq_cli.runtime.tiers.cache import ExpertLayout

        return ExpertLayout(self.numel, self.dtype, self.views, self.slot_bytes, lambda key: self.placements[key].shift)

    def empty_buffer(self) -> torch.Tensor:
        return torch.empty(self.numel, dtype=self.dtype)

    def read(self, key: tuple[int, int], dest: torch.Tensor, reader: DiskReader) -> torch.Tensor:
        """Read expert ``key`` into the packed buffer ``dest`` (synchronously)."""
        reader.read_into(self.extents[key], dest)
        return dest

    @property
    def total_bytes(self) -> int:
        return self.nbytes * len(self.extents)

    def reads_per_expert(self) -> int:
        return len(next(iter(self.extents.values())))
