#!/usr/bin/env python3
"""Load test for ``moespeq serve``: starts the server on 127.0.0.1 (loopback only) with the
demo model (or --model) on the mock backend, sends --requests chat completions from
--clients concurrent clients with the openai client, and reports requests/s and latency
percentiles (time to the whole answer, and to the first streamed token). Bounded: at
most --requests requests, and --timeout seconds (then the server is killed and the script
exits with a line saying so). The last line is JSON.

    python scripts/load_serve.py [--model demo] [--requests 32] [--clients 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import IO


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: ``kind`` of the text, above 0."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:  # nan too
            raise argparse.ArgumentTypeError(f"{text} is not above 0")
        return value

    return parse


def tail(log: IO[bytes]) -> str:
    """The server's last words, from its stderr file."""
    log.seek(0)
    return log.read().decode(errors="replace").strip()[-500:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="what `moespeq serve` serves (default: the demo)")
    ap.add_argument("--backend", default="mock", help="serve's --backend (default: mock)")
    ap.add_argument("--requests", type=positive(int), default=32, help="chat completions to send in all (default: 32)")
    ap.add_argument("--clients", type=positive(int), default=8, help="clients sending at once (default: 8)")
    ap.add_argument("--max-tokens", type=positive(int), default=32, help="max_tokens of each request (default: 32)")
    ap.add_argument("--timeout", type=positive(float), default=300.0, help="seconds for the whole run, start included")
    args = ap.parse_args()
    import openai

    end = time.time() + args.timeout

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "moespeq_cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend", args.backend, "--queue", str(max(args.clients, 1))] + ([args.model] if args.model else [])
    # the server's log goes to a file, not a pipe: nobody reads a pipe while requests run,
    # and a full one would stop the server mid-write
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stderr=log)
    base = f"http://127.0.0.1:{port}/v1"
    c = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=args.timeout)
    pool = ThreadPoolExecutor(args.clients)
    try:
        while True:
            try:
                model = c.with_options(timeout=max(end - time.time(), 0.5)).models.list().data[0].id
                break
            except openai.APIConnectionError:
                if proc.poll() is not None:  # it exited: its own error says why (exit 2: a usage error)
                    print(f"load_serve: the server failed to start: {tail(log)}", file=sys.stderr)
                    sys.exit(2 if proc.returncode == 2 else 1)
                if time.time() > end:
                    proc.kill()
                    proc.wait()
                    sys.exit(f"load_serve: the server did not start within {args.timeout:g} s: {tail(log)}")
                time.sleep(0.2)

        def one(i: int) -> tuple[float, float, int]:
            t0 = time.perf_counter()
            first, n = None, 0
            stream = c.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"Tell me story number {i}."}],
                max_tokens=args.max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for ch in stream:
                if ch.choices and ch.choices[0].delta.content and first is None:
                    first = time.perf_counter() - t0
                if ch.usage:
                    n = ch.usage.completion_tokens
            return time.perf_counter() - t0, first or 0.0, n

        t0 = time.perf_counter()
        futures = [pool.submit(one, i) for i in range(args.requests)]
        done, late = wait(futures, timeout=max(end - time.time(), 0))
        wall = time.perf_counter() - t0
        if late:
            for f in late:
                f.cancel()
            proc.kill()  # a graceful stop would wait for the open answers: the waiting clients see it close
            sys.exit(
                f"load_serve: {len(late)} of {args.requests} requests unanswered after --timeout {args.timeout:g} s"
            )
        try:
            results = [f.result() for f in futures]
        except openai.OpenAIError as e:
            sys.exit(f"load_serve: a request failed: {e}; the server's log ends: {tail(log)}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        pool.shutdown(wait=True, cancel_futures=True)
    lat = [r[0] for r in results]
    ttft = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    out = {
        "benchmark": "serve_load",
        "requests": len(results),
        "clients": args.clients,
        "seconds": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "latency_s": {p: round(percentile(lat, int(p[1:])), 3) for p in ("p50", "p90", "p99")},
        "first_token_s": {p: round(percentile(ttft, int(p[1:])), 3) for p in ("p50", "p90", "p99")},
    }
    print(
        f"{out['requests']} requests from {args.clients} clients in {wall:.1f} s: {out['requests_per_s']} req/s, "
        f"{out['tokens_per_s']} tok/s; latency p50 {out['latency_s']['p50']} s, p99 {out['latency_s']['p99']} s; "
        f"first token p50 {out['first_token_s']['p50']} s"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
