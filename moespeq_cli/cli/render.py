"""All terminal output: streamed text on stdout, figures on stderr (Rich), JSON for
scripts. Everything else in moespeq returns data."""

from __future__ import annotations

import sys


class Renderer:
    def __init__(self, json_mode: bool = False):
        self.json_mode = json_mode
        self._last = "\n"

    def text(self, chunk: str) -> None:
        if self.json_mode or not chunk:
            return
        sys.stdout.write(chunk)
        sys.stdout.flush()
        self._last = chunk[-1]

    def end_text(self) -> None:
        if self._last != "\n":
            sys.stdout.write("\n")
            sys.stdout.flush()

    def plan(self, plan, hw, draft: str | None = None) -> None:
        from rich.console import Console

        from moespeq_cli.runtime.hardware import format_size

        parts = ", ".join(f"{name} {format_size(n)}" for name, n in plan.rows() if n)
        Console(stderr=True, highlight=False).print(
            f"[dim]plan: {format_size(plan.budget_bytes)} on {hw.name} ({plan.policy}): {parts}[/dim]"
        )

    def stats_line(self, result: dict) -> None:
        from rich.console import Console

        s = result["stats"]
        parts = [f"{s['new_tokens']} tokens in {s['seconds']:.2f} s ({s['clock']} clock)"]
        if s["tokens_per_s"] is not None:
            parts.append(f"{s['tokens_per_s']:.1f} tok/s")
        if s["ttft_s"] is not None:
            parts.append(f"TTFT {s['ttft_s'] * 1000:.0f} ms")
        if s["tpot_s"] is not None:
            parts.append(f"TPOT {s['tpot_s'] * 1000:.1f} ms")
        if s.get("spec_depth_mean") is not None:
            parts.append(f"k {s['spec_depth_mean']:.1f}")
        for key, label in (("acceptance_rate", "accept"), ("expert_hit_rate", "hit rate")):
            if s.get(key) is not None:
                parts.append(f"{label} {s[key]:.0%}")
        if s.get("io_stall_s") is not None and s["seconds"]:
            parts.append(f"I/O stall {s['io_stall_s'] / s['seconds']:.0%}")
        if s.get("bytes_h2d") is not None:
            parts.append(f"{s['bytes_h2d'] / 1e6:.1f} MB copied")
        head = f"[{result['backend']}"
        if result.get("policy"):
            head += f" · {result['policy']}"
        head += "]"
        Console(stderr=True, highlight=False).print(f"[dim]{head} " + " · ".join(parts) + "[/dim]")


def bench_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from moespeq_cli.runtime.hardware import format_size

    clock = report["results"][0]["stats"]["clock"] if report["results"] else "?"
    t = Table(
        title=f"{report['model']} on {report['hardware']} ({report['backend']}, {clock} clock), "
        f"--vram {format_size(report['vram_bytes'])}" + (" + draft (same cache)" if report["same_cache"] else "")
    )
    for col in (
        "policy",
        "slots",
        "tok/s",
        "vs ondemand",
        "vs lru",
        "vs gate-prefetch",
        "hit rate",
        "stall",
        "MB moved",
        "accept",
        "k",
        "bound ratio",
    ):
        t.add_column(col, justify="left" if col == "policy" else "right")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in report["results"]:
        s = r["stats"]
        stall = s["io_stall_s"] / s["seconds"] if s["io_stall_s"] is not None and s["seconds"] else None
        t.add_row(
            r["label"],
            str(r["slots"]),
            f(s["tokens_per_s"], ".1f"),
            *(
                f(r["speedup_vs"].get(b), ".2f") + ("x" if r["speedup_vs"].get(b) else "")
                for b in ("ondemand", "lru", "gate-prefetch")
            ),
            f(s["expert_hit_rate"], ".0%"),
            f(stall, ".0%"),
            f((s["bytes_h2d"] or 0) / 1e6, ".1f"),
            f(s["acceptance_rate"], ".2f"),
            f(s["spec_depth_mean"], ".1f"),
            f(s["bound_ratio"], ".2f"),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # logs and pipes: room for every column
    console.print(t)
