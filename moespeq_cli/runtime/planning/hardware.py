"""Hardware profiles (``moespeq_cli/profiles/*.yaml``, shipped in the wheel) and memory sizes.

A profile holds the figures the mock backend's timing model and the planner need, each
with its source in a comment in the YAML. Loading validates every field: an unknown
key, a missing or non-positive figure, or malformed YAML is an error that names the file
and the field.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from moespeq_cli.errors import UsageError
from moespeq_cli.fs import OwnOutput, kind, shown
from moespeq_cli.text import did_you_mean

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "PB": 10**15,
    "EB": 10**18,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "PIB": 2**50,
    "EIB": 2**60,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


MAX_SIZE = 2**60  # 1 EiB: beyond any machine, and still exact in every figure derived from it


def parse_size(text: str | int | float, what: str = "size") -> int:
    """``what`` names the option or field in errors. '12GB' -> 12e9, '12GiB' -> 12 * 2**30, '512MiB', '1.5GB'; a bare number is bytes."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.match(str(text)) if len(str(text)) < 64 else None
        unit = m.group(2).upper() if m else None
        if m and unit in ("K", "M", "G", "T", "P", "E"):  # 10^n or 2^n: said, not guessed
            n = m.group(1)
            raise UsageError(f"{what} {text!r}: write {n}{unit}B (powers of 10) or {n}{unit}iB (powers of 2)")
        if not m or unit not in _UNITS:
            raise UsageError(
                f"cannot read {what} {str(text)[:40]!r} as a size; write it like 12GB, 12GiB, 512MiB or 1.5GB"
            )
        value = float(m.group(1)) * _UNITS[unit]
        if unit == "" and 0 < value < 1024:  # a bare number is bytes: `--vram 12` meant gigabytes
            raise UsageError(f"{what} {text} is {text} bytes (a number without a unit); did you mean {text}GB?")
    if not math.isfinite(value) or value < 1:  # (0.5B is no byte at all)
        raise UsageError(f"{what} {text!r} must be a positive amount of memory, like 12GB")
    if value > MAX_SIZE:
        raise UsageError(f"{what} {text!r} is larger than any machine (the limit is 1 EiB); check the number")
    return int(value)


def format_size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def sizes_apart(a: float, b: float) -> tuple[str, str]:
    """Two sizes said so that they differ where they do: in bytes where two decimals of
    their unit would show the same figure ("375.72 KiB cannot hold ... needs 375.72 KiB")."""
    fa, fb = format_size(a), format_size(b)
    return (f"{int(a):,} bytes", f"{int(b):,} bytes") if fa == fb and a != b else (fa, fb)


@dataclass(frozen=True)
class KernelCurve:
    """Measured seconds of one kernel (as the code runs it) by batch size, at two weight
    sizes; ``ops``: the aten ops one call dispatches (their overhead is in the seconds)."""

    tokens: tuple[int, ...]  # ascending batch sizes measured
    sizes: tuple[float, float]  # weight bytes of the two shapes measured
    times: tuple[tuple[float, ...], tuple[float, ...]]  # seconds per call: per size, per batch size
    ops: int = 1

    def _at(self, row: tuple[float, ...], t: float) -> float:
        ts = self.tokens
        if t <= ts[0]:
            return row[0]
        for i in range(1, len(ts)):
            if t <= ts[i]:
                return row[i - 1] + (row[i] - row[i - 1]) * (t - ts[i - 1]) / (ts[i] - ts[i - 1])
        if len(ts) == 1:
            return row[0] * t / ts[0]
        slope = (row[-1] - row[-2]) / (ts[-1] - ts[-2])
        return row[-1] + max(0.0, slope) * (t - ts[-1])

    def seconds(self, tokens: float, weight_bytes: float) -> float:
        """Piecewise linear in the batch size, linear in the weight bytes (the intercept is
        the per-call overhead), never below a microsecond's tenth."""
        (b1, b2), (r1, r2) = self.sizes, self.times

        t1, t2 = self._at(r1, tokens), self._at(r2, tokens)
        t = t1 + (t2 - t1) * (weight_bytes - b1) / (b2 - b1)
        return max(t, 1e-7)


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    device_memory: int  # bytes
    reserved_memory: int  # bytes the CUDA context and allocator take before moespeq
    link_bandwidth: float  # B/s host-to-device, pinned
    link_latency: float  # s per copy
    peak_flops: float  # dense bf16 FLOP/s on the device
    mem_bandwidth: float  # B/s device memory
    launch_overhead: float  # s per kernel
    host_flops: float  # FLOP/s of the host CPU
    host_mem_bandwidth: float  # B/s host memory
    host_op_overhead: float  # s per CPU operation (framework dispatch)
    source: str = ""
    disk_bandwidth: float | None = None  # B/s, reads of the checkpoint's files (the disk tier); optional
    disk_latency: float | None = None  # s per read request; optional
    kind: str = "gpu"  # "cpu": the device is this CPU (RAM the compute tier, the disk the link)
    sync_overhead: float = 0.0  # s per host-device synchronisation (reading a value back)
    disk_queue_bandwidth: tuple[float, ...] | None = None  # B/s with 1, 2, ... reads in flight
    disk_read_cpu: float = 0.0  # CPU seconds a read costs per byte (O_DIRECT: pinning pages, I/O setup)
    # ... and per read (the system call, setting the transfer up); None (absent) in
    # profiles calibrated before it was measured, whose NAME@busy curves hold the reads'
    # CPU time too (a kernel they price is not charged it again)
    read_cpu_overhead: float | None = None
    read_submit_overhead: float = 0.0  # s the compute thread spends handing a read to the I/O threads
    read_wake_overhead: float = 0.0  # s it loses after a wait for a read: waking, and its next kernel's start
    # ... as a curve over how long the thread was blocked: (seconds blocked, seconds lost)
    # ascending; where present it replaces the single figure (calibrate measures it)
    read_wake_curve: tuple[tuple[float, float], ...] = ()
    # the dtypes the GPU has a grouped GEMM kernel for (bfloat16 on Hopper and Blackwell): a
    # layer's experts computed in one of them take one call, not one expert at a time
    # (executors/grouped.py); none: every expert apart
    grouped_gemm: tuple[str, ...] = ()
    kernels: dict = field(default_factory=dict)  # kernel name -> KernelCurve, on the device
    # region kind ("attention", "expert", ..; "layer": the code outside every region, per
    # layer a forward pass runs; "pass": the same per pass, in profiles written before)
    # -> host seconds a call costs beyond its priced work: Python the op count misses
    region_overhead: dict = field(default_factory=dict)
    host_kernels: dict = field(default_factory=dict)  # ... on the host CPU
    # bytes the GPU's BLAS libraries hold for the compute stream (torch allocates cuBLAS's
    # and cuBLASLt's workspaces at the first matmul there and keeps them: 32 MiB and more
    # on compute capability 9.0); calibrate measures it, bundled profiles leave it 0
    blas_workspace: int = 0

    @property
    def called(self) -> str:
        """The profile as messages name it: its name, and the file it came from where that is
        not a bundled profile (an edited copy keeps the name it was copied with)."""
        if not self.source or Path(self.source).parent.resolve() == profiles_dir().resolve():
            return self.name or "(unnamed)"
        return f"{self.name or '(unnamed)'} ({shown(self.source)})"

    def host_overhead(self, kind: str, one_call_attention: bool = True) -> float:
        """Host seconds a call of region ``kind`` costs beyond its priced work (measured by
        calibrate; 0 where unmeasured): the mock's clock and ``plan``'s step both add it
        (``Cost.charged``: never below the region's work without ops). Negative where the
        real backend dispatches fewer ops than the mock counts: a negative ``attention``
        figure is measured on an attention the CPU kernels run as one call, and is 0 for
        one that runs its ops (``one_call_attention`` False: kernels/modules.py)."""
        seconds = self.region_overhead.get(kind, 0.0)
        return 0.0 if seconds < 0 and kind == "attention" and not one_call_attention else seconds

    def between_regions(self, layers: int) -> float:
        """Host seconds of a forward pass's code outside every region, ``layers`` layers run."""
        return self.region_overhead.get("pass", 0.0) + self.region_overhead.get("layer", 0.0) * layers

    @property
    def usable_memory(self) -> int:
        return self.device_memory - self.reserved_memory

    def curve(self, kernel: str, host: bool = False, busy: bool = False) -> KernelCurve | None:
        """The measured curve of ``kernel`` on the device (or the host; a cpu profile's
        device is its host); ``busy``: the one measured while the disk was reading, where
        there is one."""
        table = self.host_kernels if host and self.kind != "cpu" else self.kernels
        return (table.get(f"{kernel}@busy") if busy else None) or table.get(kernel)

    def read_cpu(self, nbytes: float) -> float:
        """CPU seconds a read of ``nbytes`` costs its I/O thread (on a machine with few cores,
        time the kernels running beside it lose): a line, per read and per byte. On a
        2-core VM, reads one after another: 0.06-0.1 ms for 0.5 MiB, 0.11-0.17 for 2, 0.5-0.9
        for 22, 1.4-2.7 for 64 (one figure a byte, measured on 22 MiB, put a 2 MiB read at
        half its time)."""
        return (self.read_cpu_overhead or 0.0) + self.disk_read_cpu * nbytes

    def read_wake(self, blocked: float) -> float:
        """Seconds a compute thread loses after blocking ``blocked`` seconds on a read: it
        wakes, and its next kernel runs slower than back to back (a CPU left idle longer
        comes back colder: on a 2-core VM 0.04-0.11 ms after 1 ms blocked, 0.4-0.65 ms
        after 30 ms). The curve interpolated linearly, held at its ends; the single figure
        where there is no curve."""
        curve = self.read_wake_curve
        if not curve:
            return self.read_wake_overhead
        if blocked <= curve[0][0]:
            return curve[0][1]
        for (b0, s0), (b1, s1) in zip(curve, curve[1:], strict=False):
            if blocked <= b1:
                return s0 + (s1 - s0) * (blocked - b0) / (b1 - b0)
        return curve[-1][1]

    def disk_channel_bandwidth(self, in_flight: int) -> float:
        """Bytes per second one read gets with ``in_flight`` reads running (the disk shared
        among them); the profile's single figure where it has no queue curve."""
        q = self.disk_queue_bandwidth
        if not q:
            return self.disk_bandwidth / max(1, in_flight)
        total = q[min(in_flight, len(q)) - 1]
        return total / in_flight


_SIZES = {"device_memory", "reserved_memory", "blas_workspace"}
# Plausible ranges (inclusive): figures outside them are typos or hostile, and would make
# the timing model divide by (almost) zero or print 300-digit times.
_RANGES = {
    "device_memory": (2**20, MAX_SIZE),
    "reserved_memory": (0, MAX_SIZE),
    "blas_workspace": (0, 2**34),
    "link_bandwidth": (1e6, 1e14),  # B/s: 1 MB/s .. 100 TB/s
    "link_latency": (1e-9, 1.0),  # s
    "peak_flops": (1e6, 1e19),  # FLOP/s
    "mem_bandwidth": (1e6, 1e15),  # B/s
    "launch_overhead": (1e-9, 1.0),  # s
    "host_flops": (1e6, 1e19),
    "host_mem_bandwidth": (1e6, 1e15),
    "host_op_overhead": (1e-9, 1.0),
    "disk_bandwidth": (1e6, 1e13),  # B/s: 1 MB/s .. 10 TB/s
    "disk_latency": (1e-7, 1.0),  # s
    "sync_overhead": (0.0, 1.0),  # s
    "disk_read_cpu": (0.0, 1e-6),  # s per byte: 0 .. 1 s per MB
    "read_cpu_overhead": (0.0, 1.0),  # s per read
    "read_submit_overhead": (0.0, 1.0),  # s
    "read_wake_overhead": (0.0, 1.0),  # s
}
_TEXT = {"name", "description"}
# optional: a profile without disk figures cannot price a disk tier; no kernel curves: rooflines
_OPTIONAL = {
    "disk_bandwidth",
    "disk_latency",
    "kind",
    "sync_overhead",
    "disk_read_cpu",
    "read_cpu_overhead",
    "read_submit_overhead",
    "read_wake_overhead",
    "read_wake_curve",
    "disk_queue_bandwidth",
    "kernels",
    "host_kernels",
    "region_overhead",
    "grouped_gemm",
    "blas_workspace",
}
_STRUCTURED = {
    "kind",
    "grouped_gemm",
    "disk_queue_bandwidth",
    "read_wake_curve",
    "kernels",
    "host_kernels",
    "region_overhead",
}
KINDS = ("gpu", "cpu")
GROUPED_DTYPES = ("bfloat16", "float16", "float32")
MAX_CURVES = 64


def profiles_dir() -> Path:
    env = os.environ.get("MOESPEQ_PROFILES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "profiles"  # moespeq_cli/profiles, shipped in the wheel


def check_profiles_dir() -> None:
    """MOESPEQ_PROFILES, where set, must hold profiles: else every --hardware is unknown
    and the list of those available empty, the cause unnamed."""
    if os.environ.get("MOESPEQ_PROFILES") and not bundled_profiles():
        from moespeq_cli.errors import UsageError
        from moespeq_cli.fs import shown

        raise UsageError(
            f"MOESPEQ_PROFILES {shown(profiles_dir())} is not a directory of hardware profiles (.yaml files); unset "
            "it, or point it at one"
        )


def calibrated_dir() -> Path:
    """Where ``moespeq calibrate`` writes this machine's profiles by default
    ($XDG_CACHE_HOME/moespeq/profiles): found by name too, after the bundled ones."""
    from moespeq_cli.fs import cache_dir

    return cache_dir() / "profiles"


def _names(d: Path) -> list[str]:
    return sorted(p.stem for p in d.glob("*.yaml") if p.is_file()) if d.is_dir() else []


def bundled_profiles() -> list[str]:
    """The profiles shipped with moespeq (each figure with its source)."""
    return _names(profiles_dir())


def available_profiles() -> list[str]:
    """The profile names --hardware takes: the bundled ones, then this machine's
    calibrations (a calibration never shadows a bundled name)."""
    names = bundled_profiles()
    return names + [s for s in _names(calibrated_dir()) if s not in names]


def named_profile(name: str) -> Path | None:
    """The file --hardware NAME loads: a bundled profile first, else a calibration in the
    cache; None where there is neither."""
    if "/" in name or len(name) >= 200:
        return None
    for d in (profiles_dir(), calibrated_dir()):
        if kind(d / f"{name}.yaml") == "file":
            return d / f"{name}.yaml"
    return None


def load_profile(name_or_path: str) -> HardwareProfile:
    """A profile by name (``moespeq_cli/profiles/NAME.yaml``) or by the path of a .yaml file."""
    if not name_or_path.strip():
        raise UsageError(
            f"--hardware is empty; give a profile name ({', '.join(available_profiles())}) or a .yaml path"
        )
    path = Path(os.path.expanduser(name_or_path))
    if path.suffix in (".yaml", ".yml") and kind(path) != "missing":
        return parse_profile(path)  # parse_profile's reader refuses anything but a regular file
    named = named_profile(name_or_path)
    if named is not None:
        return parse_profile(named)
    if path.suffix in (".yaml", ".yml"):
        raise UsageError(
            f"hardware profile file {shown(path)} does not exist; check the path, or give a profile name "
            "(`moespeq plan --list-hardware` lists them)"
        )
    if kind(path) != "missing":
        raise UsageError(
            f"--hardware {shown(path)} is not a hardware profile: give a profile name "
            f"({', '.join(available_profiles())}) or a .yaml file (`moespeq calibrate --out FILE.yaml` writes one)"
        )
    if name_or_path.startswith("calibrated-"):
        raise UsageError(
            f"no calibration {shown(name_or_path)!r} on this machine yet; `moespeq calibrate` measures it "
            "(about 25 s) and writes calibrated-cpu (calibrated-gpu with CUDA)"
        )
    check_profiles_dir()
    raise UsageError(
        f"unknown hardware profile {shown(name_or_path)!r}{did_you_mean(name_or_path, available_profiles())}; available: {', '.join(available_profiles())} "
        "(or pass a path to a .yaml file)"
    )


PROFILE_LIMIT = 2**20  # a profile is a few dozen lines


def _no_alias_loader():
    """yaml.SafeLoader that refuses anchors and aliases: a profile has no use for them,
    and nested aliases expand exponentially (the 'billion laughs')."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            # a key given twice is a mistake (YAML keeps the last silently: a duplicated
            # link_bandwidth halved every figure without a word)
            seen = set()
            for key_node, _ in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{str(key)[:40]!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"anchors and aliases are not allowed (line {mark.line + 1})")
            return super().compose_node(parent, index)

    return Loader


PROFILE_FIELDS = frozenset(f.name for f in fields(HardwareProfile)) - {"source"}  # what a profile's YAML may hold


def is_profile(head: bytes, tail: bytes) -> bool:
    """Whether a file (its first and last bytes; the whole of a file under 64 KiB) is a
    hardware profile calibrate may replace: YAML naming a profile's fields (a profile of
    another moespeq version too, which may no longer load), or blank; nothing else (a
    checkpoint's config.json, the user's notes, a file of comments)."""
    import yaml

    if len(tail) >= 65536:  # (a profile is a few dozen lines)
        return False
    try:
        data = yaml.load(tail.decode("utf-8"), Loader=_no_alias_loader())  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError, ValueError):
        return False
    if data is None:  # blank only: a file of comments, `null` or `---` is someone's
        return not tail.strip()
    return isinstance(data, dict) and "name" in data and len(PROFILE_FIELDS & set(data)) >= 3


PROFILE = OwnOutput("a hardware profile", is_profile)  # what calibrate --out may replace


def parse_profile(path: Path) -> HardwareProfile:
    import yaml

    from moespeq_cli.fs import read_text

    text = read_text(path, PROFILE_LIMIT, "hardware profile", UsageError)
    try:
        data = yaml.load(text, Loader=_no_alias_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else f" ({e})" if not hasattr(e, "problem") else ""
        problem = getattr(e, "problem", None)
        where += f" ({problem})" if mark and problem and "twice" in problem else ""
        raise UsageError(f"hardware profile {path} is not valid YAML{where}; fix the file") from None
    except RecursionError:
        raise UsageError(f"hardware profile {path} is nested too deeply; fix the file") from None
    except ValueError as e:  # an integer of 4300+ digits
        raise UsageError(f"hardware profile {path} is not valid YAML ({str(e)[:60]}); fix the file") from None
    if not isinstance(data, dict):
        raise UsageError(f"hardware profile {path} must be a YAML mapping of field: value")
    known = PROFILE_FIELDS
    unknown = sorted((str(k) for k in set(data) - known), key=str)
    if unknown:
        raise UsageError(
            f"hardware profile {path}: unknown field {unknown[0][:40]!r}; known fields: {', '.join(sorted(known))}"
        )
    values: dict = {"source": str(path)}
    for f in sorted(known):
        if (f not in data or data[f] is None) and f in _OPTIONAL:
            continue
        if f not in data or data[f] is None:
            raise UsageError(
                f"hardware profile {path}: field {f!r} is missing; add it (`moespeq calibrate --out FILE.yaml` "
                "writes a whole profile for this machine; docs/mock-backend.md lists the fields)"
            )
        v = data[f]
        if f in _STRUCTURED:
            values[f] = _structured(path, f, v)
            continue
        if f in _TEXT:
            if (
                not isinstance(v, str | int | float)
                or isinstance(v, bool)
                or len(str(v)) > 200
                or not str(v).isprintable()
            ):
                raise UsageError(f"hardware profile {path}: field {f!r} must be a short line of printable text")
            values[f] = str(v)
            continue
        try:
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise TypeError
            num = _size_or_number(v, f) if f in _SIZES else float(v)  # YAML reads 1.2e10 (no dot, no sign) as text
        except UsageError as e:  # parse_size's own words: "write 12GB (powers of 10) or 12GiB (powers of 2)"
            raise UsageError(f"hardware profile {path}: {e}") from None
        except (TypeError, ValueError, OverflowError):  # also ints of 4300+ digits
            what = "a size such as 12GiB or a number of bytes" if f in _SIZES else "a number"
            raise UsageError(f"hardware profile {path}: field {f!r} must be {what}, got {str(v)[:40]!r}") from None
        lo, hi = _RANGES[f]
        if math.isfinite(num) and (num < 0 or (num == 0 and lo > 0)):
            raise UsageError(f"hardware profile {path}: field {f!r} must be positive, got {str(v)[:40]!r}")
        if not math.isfinite(num) or not lo <= num <= hi:
            raise UsageError(
                f"hardware profile {path}: field {f!r} must be a finite number from {lo:g} to {hi:g}, got {str(v)[:40]!r}"
            )
        values[f] = int(num) if f in _SIZES else num
    if values["reserved_memory"] >= values["device_memory"]:
        raise UsageError(f"hardware profile {path}: reserved_memory must be below device_memory")
    return HardwareProfile(**values)


DRAFT_PATHS = ("cuda", "kernel", "packed", "reference")  # quant/draft.py planned_path


def kernel_name_ok(name: str) -> bool:
    """A curve name the cost model looks up (costs.py ``expert_kernel``, ``linear_cost``;
    the draft's ``draft:PATH``), with or without ``@busy``."""
    head, _, rest = name.removesuffix("@busy").partition(":")
    parts = rest.split(":")
    if head == "draft":
        return rest in DRAFT_PATHS
    if head == "linear":
        return 1 <= len(parts) <= 2 and all(p in GROUPED_DTYPES for p in parts)
    return head == "expert" and len(parts) >= 2 and all(p in GROUPED_DTYPES for p in parts[-2:]) and all(parts)


NUMBER_AS_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")  # 1.2e10: YAML 1.1 reads it as text


def _size_or_number(v, f: str) -> float:
    if not isinstance(v, str):
        return float(v)
    return float(v) if NUMBER_AS_TEXT.fullmatch(v.strip()) else parse_size(v, f)


def _number(path, what: str, v, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
        raise UsageError(f"hardware profile {path}: {what} must be a number from {lo:g} to {hi:g}, got {str(v)[:40]!r}")
    return float(v)


def _named(path, f: str, v, what: str) -> None:
    """``v`` is a mapping of at most MAX_CURVES entries named by short lines of text."""
    if not isinstance(v, dict) or len(v) > MAX_CURVES:
        raise UsageError(f"hardware profile {path}: {f} must be a mapping of at most {MAX_CURVES} {what}")
    for name in v:
        if not isinstance(name, str) or not 0 < len(name) <= 64 or not name.isprintable():
            raise UsageError(f"hardware profile {path}: {f} has a name that is not a short line of text")


def _structured(path, f: str, v):
    """``kind``, ``grouped_gemm``, the disk's queue curve, the wake curve and the kernel curves, checked field by field (a
    profile is untrusted input: no shape, length or value may surprise the clock)."""
    if f == "kind":
        if v not in KINDS:
            raise UsageError(f"hardware profile {path}: kind must be one of {', '.join(KINDS)}, got {str(v)[:40]!r}")
        return v
    if f == "grouped_gemm":
        if not isinstance(v, list) or len(v) > len(GROUPED_DTYPES) or not set(map(str, v)) <= set(GROUPED_DTYPES):
            raise UsageError(
                f"hardware profile {path}: grouped_gemm must be a list of dtypes from {', '.join(GROUPED_DTYPES)}, "
                f"got {str(v)[:40]!r}"
            )
        return tuple(v)
    if f == "disk_queue_bandwidth":
        if not isinstance(v, list) or not 1 <= len(v) <= 64:
            raise UsageError(f"hardware profile {path}: disk_queue_bandwidth must be a list of 1 to 64 numbers (B/s)")
        return tuple(_number(path, "disk_queue_bandwidth", x, 1e6, 1e13) for x in v)
    if f == "read_wake_curve":
        if not isinstance(v, dict) or set(v) != {"blocked", "seconds"}:
            raise UsageError(f"hardware profile {path}: read_wake_curve must have blocked and seconds (two lists)")
        blocked, seconds = v["blocked"], v["seconds"]
        if (
            not isinstance(blocked, list)
            or not isinstance(seconds, list)
            or not 1 <= len(blocked) == len(seconds) <= 32
        ):
            raise UsageError(
                f"hardware profile {path}: read_wake_curve's blocked and seconds must be lists of 1 to 32 numbers "
                "each, as many of one as of the other"
            )
        xs = [_number(path, "read_wake_curve.blocked", x, 1e-7, 10.0) for x in blocked]
        if xs != sorted(set(xs)):
            raise UsageError(f"hardware profile {path}: read_wake_curve.blocked must be ascending")
        return tuple(zip(xs, (_number(path, "read_wake_curve.seconds", s, 0.0, 1.0) for s in seconds), strict=True))
    if f == "region_overhead":
        _named(path, f, v, "regions")
        return {name: _number(path, f"region_overhead.{name}", s, -1.0, 1.0) for name, s in v.items()}
    _named(path, f, v, "kernel curves")
    curves = {}
    for name, c in v.items():
        where = f"{f}.{str(name)[:40]}"
        if not kernel_name_ok(name):  # a misspelt curve is never looked up: the roofline would price silently
            raise UsageError(
                f"hardware profile {path}: {where} is not a kernel moespeq runs; names are linear:DTYPE[:DTYPE], "
                f"expert:[LAYOUT:]DTYPE:DTYPE or draft:{'|'.join(DRAFT_PATHS)} (DTYPE one of "
                f"{', '.join(GROUPED_DTYPES)}), optionally ending @busy"
            )
        if (
            not isinstance(c, dict)
            or set(c) - {"tokens", "sizes", "seconds", "ops"}
            or not {"tokens", "sizes", "seconds"} <= set(c)
        ):
            raise UsageError(f"hardware profile {path}: {where} must have tokens, sizes, seconds (and ops)")
        tokens, sizes, seconds = c["tokens"], c["sizes"], c["seconds"]
        if (
            not isinstance(tokens, list)
            or not 1 <= len(tokens) <= 64
            or any(isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 4096 for t in tokens)
            or tokens != sorted(set(tokens))
        ):
            raise UsageError(f"hardware profile {path}: {where}.tokens must be ascending batch sizes from 1 to 4096")
        if not isinstance(sizes, list) or len(sizes) != 2:
            raise UsageError(f"hardware profile {path}: {where}.sizes must be two weight sizes in bytes")
        b1, b2 = (_number(path, f"{where}.sizes", b, 1.0, 2.0**50) for b in sizes)
        if not b1 < b2:
            raise UsageError(f"hardware profile {path}: {where}.sizes must be ascending")
        if (
            not isinstance(seconds, list)
            or len(seconds) != 2
            or any(not isinstance(r, list) or len(r) != len(tokens) for r in seconds)
        ):
            raise UsageError(f"hardware profile {path}: {where}.seconds must be two rows of one time per batch size")
        rows = tuple(tuple(_number(path, f"{where}.seconds", x, 1e-9, 100.0) for x in r) for r in seconds)
        ops = c.get("ops", 1)
        if isinstance(ops, bool) or not isinstance(ops, int) or not 0 <= ops <= 10_000:
            raise UsageError(f"hardware profile {path}: {where}.ops must be a whole number of ops")
        curves[name] = KernelCurve(tuple(tokens), (b1, b2), rows, ops)
    return curves


def beyond_device(budget: int, hw: HardwareProfile) -> str | None:
    """A note when ``--vram`` is more than the profile's device holds (a plan for a bigger
    card priced as this one: the default profile when --hardware is not given), else None."""
    if budget <= hw.device_memory:
        return None
    return (
        f"--vram {format_size(budget)} is more than {hw.name}'s {format_size(hw.device_memory)}: copies and "
        "compute are priced as that device's; give --hardware for yours (moespeq plan --list-hardware)"
    )
