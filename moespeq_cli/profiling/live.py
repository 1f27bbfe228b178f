"""The live profile view (Rich): a lane per stream scrolling as the run goes, the expert
residency map per MoE layer, and rolling figures. It only reads the engine's state."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

LANE_WIDTH = 96


def lanes(intervals, t_end: float, window: float, width: int = LANE_WIDTH) -> Text:
    """Character lanes over [t_end - window, t_end]: compute (target, draft, stall), copy,
    the host CPU when it computed experts, and the disk when experts are read from it."""
    t0 = t_end - window
    compute = [" "] * width
    copy = [" "] * width
    host = [" "] * width
    disk = [" "] * width
    style = {
        "target": ("█", "cyan"),
        "draft": ("▓", "magenta"),
        "stall": ("░", "red"),
        "copy": ("▬", "yellow"),
        "host": ("▒", "green"),
        "read": ("═", "blue"),
    }
    recent = intervals[-4000:]
    for iv in recent:
        if iv.end < t0:
            continue
        a = max(0, int((iv.start - t0) / window * width))
        b = min(width, max(a + 1, int((iv.end - t0) / window * width)))
        if iv.stream == "host":
            key, lane = "host", host
        elif iv.kind == "read":
            key, lane = "read", disk
        elif iv.kind == "copy":
            key, lane = "copy", copy
        else:
            key, lane = ("stall" if iv.kind == "stall" else iv.phase), compute
        for i in range(a, b):
            if lane is compute and compute[i] == "stall" and key != "stall":
                continue
            lane[i] = key
    rows = [("compute", compute)]
    if any(iv.kind == "copy" for iv in recent) or not any(iv.kind == "read" for iv in recent):
        rows.append(("copy   ", copy))
    if any(iv.stream == "host" for iv in recent):
        rows.append(("cpu    ", host))
    if any(iv.kind == "read" for iv in recent):
        rows.append(("disk   ", disk))
    out = Text()
    for name, lane in rows:
        out.append(f"{name} │", style="bold")
        for k in lane:
            if k == " ":
                out.append("·", style="grey30")
            else:
                ch, st = style[k]
                out.append(ch, style=st)
        out.append("│\n")
    out.append(
        f"         last {window * 1e3:.2f} ms   █ target  ▓ draft  ░ stall  ▬ copy H2D  ▒ expert on the CPU  ═ read",
        style="dim",
    )
    return out


def residency(cache, layers: list[int], num_experts: int, missed: set, host=None) -> Table:
    """Per MoE layer, each expert: in the compute tier (■), on its way (◆), missed at the
    last layer (×), in host RAM only (▪, with a disk tier below it), or elsewhere (·)."""
    t = Table.grid(padding=(0, 1))
    t.add_column(justify="right", style="bold")
    t.add_column()
    for layer in layers:
        row = Text()
        for e in range(num_experts):
            key = (layer, e)
            if key in missed:
                row.append("×", style="bold red")
            elif cache.resident(key) and not cache.ready(key):
                row.append("◆", style="yellow")
            elif cache.resident(key):
                row.append("■", style="green")
            elif host is not None and host.resident(key):
                row.append("▪", style="blue")
            else:
                row.append("·", style="grey42")
        t.add_row(f"L{layer}", row)
    return t


def figures(stats: dict) -> Table:
    t = Table.grid(padding=(0, 2))
    for _ in range(4):
        t.add_column()

    def f(v, fmt, suffix=""):
        return "-" if v is None else format(v, fmt) + suffix

    t.add_row("tokens/s", f(stats.get("tokens_per_s"), ".1f"), "I/O stall", f(stats.get("stall_share"), ".0%"))
    t.add_row("overlap", f(stats.get("overlap"), ".0%"), "hit rate", f(stats.get("hit_rate"), ".0%"))
    t.add_row("acceptance", f(stats.get("acceptance"), ".0%"), "current k", f(stats.get("k"), "d"))
    t.add_row("tokens", f(stats.get("tokens"), "d"), "MB copied", f(stats.get("mb"), ".1f"))
    if stats.get("mb_read") is not None:
        t.add_row("", "", "MB read", f(stats.get("mb_read"), ".1f"))
    return t


def render(
    title: str, intervals, t_end: float, window: float, cache, layers, num_experts, missed, stats, text: str, host=None
):
    body = Group(
        Text(text[-300:].replace("\n", " ⏎ "), style="white"),
        Text(""),
        lanes(intervals, t_end, window),
        Text(""),
        Panel(
            residency(cache, layers, num_experts, missed, host),
            title=f"experts {'in RAM' if cache.name == 'RAM' else 'on the device'}: ■ resident  ◆ in flight  × missed"
            + ("  ▪ in RAM" if host is not None else ""),
            title_align="left",
            border_style="grey42",
        ),
        figures(stats),
    )
    return Panel(body, title=title, title_align="left", border_style="cyan")
