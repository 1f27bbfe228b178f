"""Timeline: every compute, copy and stall interval of a run, per stream, with names.

It is what the profile view draws and what ``--trace FILE`` writes as Chrome trace JSON
(Perfetto and chrome://tracing open it): one track per stream, layer/expert/bytes in
``args``. Times are seconds from the start of generation on the run's clock.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from moespeq_cli.fs import OwnOutput, atomic_write_text

_LAYER = re.compile(r" L\d+(\.E\d+)?$")  # "expert L3.E5" -> "expert": one row per kind of region
STREAM_TIDS = {"compute": 1, "copy": 2, "host": 3, "disk": 4}


def region_kind(name: str) -> str:
    """A region's name without its layer and expert: "expert L3.E5" -> "expert"."""
    return _LAYER.sub("", name)


@dataclass
class Interval:
    stream: str  # "compute", "copy" (or "copy1", ...), "host", "disk"
    kind: str  # "compute", "copy", "read", "stall"
    name: str
    start: float
    end: float
    layer: int | None = None
    expert: int | None = None
    bytes: int = 0
    phase: str = "target"  # "target" or "draft" (the self-draft's passes)
    ops: int = 0  # aten ops the region launched (counted on the mock)

    @property
    def duration(self) -> float:
        return self.end - self.start


def lanes(intervals: list[Interval]) -> dict[int, int]:
    """id(interval) -> its lane: the first whose last interval ended by its start."""
    ends: list[float] = []
    out = {}
    for iv in sorted(intervals, key=lambda iv: iv.start):
        k = next((k for k, end in enumerate(ends) if end <= iv.start), len(ends))
        ends[k : k + 1] = [iv.end]
        out[id(iv)] = k
    return out


class Timeline:
    def __init__(self):
        self.intervals: list[Interval] = []

    def add(self, iv: Interval) -> None:
        self.intervals.append(iv)

    def clear(self) -> None:
        self.intervals.clear()

    def busy(self, kind: str) -> float:
        return sum(iv.duration for iv in self.intervals if iv.kind == kind)

    def breakdown(self, total: float) -> dict[str, list[float]]:
        """Where the compute stream's ``total`` seconds went: ``{region: [count, seconds]}``
        by the regions' names without their layer and expert over its compute intervals (a nested region counts in its own name and in
        its parent's), ``"(stall)"`` for the waits and ``"(between regions)"`` for what no
        interval covers (on the wall clock: Python and framework work outside every timed
        region; on the mock it is zero, its glue being the ``framework`` region)."""
        out: dict[str, list[float]] = {}
        spans = []
        for iv in self.intervals:
            if iv.stream != "compute":
                continue
            name = "(stall)" if iv.kind == "stall" else region_kind(iv.name)
            row = out.setdefault(name, [0, 0.0])
            row[0] += 1
            row[1] += iv.duration
            spans.append((iv.start, iv.end))
        covered, end = 0.0, float("-inf")
        for s, e in sorted(spans):
            if e > end:
                covered += e - max(s, end)
                end = e
        out["(between regions)"] = [0, max(0.0, total - covered)]
        return out

    def overlap_s(self) -> float:
        """Copy time that ran while the compute stream was busy computing: not stalled, and
        not waiting for a resident expert the CPU took (``BALANCED``); the CPU's own lane
        hides no copy from the device."""
        from moespeq_cli.runtime.backends.base import BALANCED

        computes = sorted(
            (iv.start, iv.end)
            for iv in self.intervals
            if iv.stream == "compute" and iv.kind == "compute" and iv.name != BALANCED
        )
        merged: list[list[float]] = []
        for s, e in computes:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        total = 0.0
        import bisect

        starts = [m[0] for m in merged]
        for iv in self.intervals:
            if iv.kind != "copy":
                continue
            i = max(0, bisect.bisect_right(starts, iv.start) - 1)
            while i < len(merged) and merged[i][0] < iv.end:
                total += max(0.0, min(iv.end, merged[i][1]) - max(iv.start, merged[i][0]))
                i += 1
        return total

    def chrome_trace(self, metadata: dict | None = None) -> dict:
        events = []
        streams = sorted({iv.stream for iv in self.intervals}, key=lambda s: STREAM_TIDS.get(s, 9))
        tids = {s: STREAM_TIDS.get(s, 10 + i) for i, s in enumerate(streams)}
        for s, tid in tids.items():
            events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": s}})
        # reads in flight together: side by side, one lane each ("disk", "disk 2", ...), as a
        # trace viewer draws a thread's events nested or apart, never half over each other
        lane = lanes([iv for iv in self.intervals if iv.stream == "disk"])
        for k in range(1, max(lane.values(), default=0) + 1):
            events.append(
                {"ph": "M", "name": "thread_name", "pid": 1, "tid": 100 + k, "args": {"name": f"disk {k + 1}"}}
            )
        events.append({"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "moespeq"}})
        for iv in self.intervals:
            args = {"kind": iv.kind, "phase": iv.phase}
            if iv.layer is not None:
                args["layer"] = iv.layer
            if iv.expert is not None:
                args["expert"] = iv.expert
            if iv.bytes:
                args["bytes"] = iv.bytes
            if iv.ops:
                args["ops"] = iv.ops
            events.append(
                {
                    "ph": "X",
                    "name": iv.name,
                    "cat": iv.kind,
                    "pid": 1,
                    "tid": 100 + lane[id(iv)] if lane.get(id(iv)) else tids[iv.stream],
                    # whole nanoseconds, the end rounded rather than the duration: an interval
                    # that ends where the next starts does not overlap it by a rounding
                    "ts": round(iv.start * 1e9) / 1e3,
                    "dur": (round(iv.end * 1e9) - round(iv.start * 1e9)) / 1e3,
                    "args": args,
                }
            )
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": metadata or {}}

    @staticmethod
    def is_chrome_trace(head: bytes, tail: bytes) -> bool:
        """Whether a file (its first and last bytes) is a trace ``write_chrome_trace`` wrote:
        an output may replace only its own earlier one (``fs.check_replaces_own``)."""
        return head.startswith(b'{"traceEvents": ') and b'"otherData": {' in tail and b'"clock": ' in tail

    def write_chrome_trace(self, path: Path, metadata: dict | None = None) -> None:
        atomic_write_text(path, json.dumps(self.chrome_trace(metadata)), own=TRACE)

    def to_list(self) -> list[dict]:
        return [asdict(iv) for iv in self.intervals]


TRACE = OwnOutput("a moespeq trace", Timeline.is_chrome_trace)  # what --trace may replace
