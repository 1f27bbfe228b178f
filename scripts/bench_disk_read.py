"""How fast the disk tier's reader reads experts on this machine (a benchmark, not a test).

Writes a file of ``--gib`` GiB of random bytes (once; kept under --dir), then reads it as
expert-sized extents (``--expert-mib``, default 21 MiB: one bf16 expert of hidden 1024 x
intermediate 3584) with ``DiskReader`` at 1, 2 and 4 I/O threads, bypassing the page cache
(O_DIRECT). Prints a table and ends with one JSON line.

    python scripts/bench_disk_read.py --gib 1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from moespeq_cli.runtime.tiers.disk import DiskReader, Extent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "moespeq-bench-disk")
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--expert-mib", type=float, default=21.0)
    ap.add_argument("--threads", default="1,2,4")
    args = ap.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "experts.bin"
    size = int(args.gib * 2**30)
    if not path.is_file() or path.stat().st_size != size:
        with open(path, "wb") as f:
            for _ in range(0, size, 64 << 20):
                f.write(os.urandom(min(64 << 20, size - f.tell())))
    n = int(args.expert_mib * 2**20)
    extents = [Extent(str(path), off, n) for off in range(0, size - n + 1, n)]
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        # Destinations are reused across reads in flight: bandwidth only (tests check bytes).
        dests = [torch.empty(n, dtype=torch.uint8) for _ in range(threads * 2)]
        with DiskReader(threads=threads) as reader:
            t0 = time.perf_counter()
            reads = [reader.submit([e], dests[i % len(dests)]) for i, e in enumerate(extents)]
            for r in reads:
                r.wait()
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "threads": threads,
                    "direct": reader.direct,
                    "bytes": reader.bytes_read,
                    "seconds": round(seconds, 3),
                    "gb_per_s": round(reader.bytes_read / seconds / 1e9, 3),
                }
            )
    print(f"{'threads':>7} {'O_DIRECT':>8} {'GB read':>8} {'seconds':>8} {'GB/s':>6}")
    for r in rows:
        print(
            f"{r['threads']:>7} {str(r['direct']):>8} {r['bytes'] / 1e9:>8.2f} {r['seconds']:>8.2f} {r['gb_per_s']:>6.2f}"
        )
    print(json.dumps({"file_bytes": size, "extent_bytes": n, "results": rows}))


if __name__ == "__main__":
    main()
