"""The live profile view (Rich): a lane per stream scrolling as the run goes, the expert
residency map per MoE layer, and rolling figures. It only reads the engine's state."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

LANE_WIDTH = 96  # lanes' width when the caller gives none


_CONTROLS = {c: "\ufffd" for c in [*range(0x20), *range(0x7F, 0xA0)]} | {ord("\n"): " ⏎ ", ord("\t"): " "}


def printable(text: str) -> str:
    """The generated text as the preview line shows it: line breaks as ⏎, and no control
    character reaches the terminal (a model can generate ESC, and with it escape sequences)."""
    return text.translate(_CONTROLS)


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
    legend = f"last {window * 1e3:.2f} ms  █ target ▓ draft ░ stall ▬ copy ▒ on the CPU ═ disk read"
    out.append(("         " + legend) if width >= len(legend) + 2 else legend, style="dim")
    return out


SYMBOLS = {"missed": ("×", "bold red"), "flight": ("◆", "yellow"), "in": ("■", "green"), "ram": ("▪", "blue")}


def residency(
    cache, layers: list[int], num_experts: int, missed: set, host=None, width: int = 200, rows: int = 1000
) -> Text:
    """Per MoE layer, each expert: in the compute tier (■), on its way (◆), missed at the
    last layer (×), in host RAM only (▪, with a disk tier below it), or elsewhere (·).
    Layers share a line when they fit in ``width``; a layer wider than the line shows
    its counts instead; past ``rows`` lines the rest is summed up in one."""

    def state(key) -> str:
        if key in missed:
            return "missed"
        if cache.resident(key):
            return "in" if cache.ready(key) else "flight"
        return "ram" if host is not None and host.resident(key) else "out"

    label = max(len(f"L{layer}") for layer in layers) + 1 if layers else 3
    cells = []
    for layer in layers:
        cell = Text(f"L{layer}".rjust(label - 1) + " ", style="bold")
        states = [state((layer, e)) for e in range(num_experts)]
        if label + num_experts <= width:
            for st in states:
                ch, style = SYMBOLS.get(st, ("·", "grey42"))
                cell.append(ch, style=style)
        else:  # too many experts for a line: counts
            for st in ("in", "flight", "missed") + (("ram",) if host is not None else ()):
                ch, style = SYMBOLS[st]
                cell.append(f"{ch}{states.count(st)} ", style=style)
        cells.append(cell)
    cell_width = max(len(c) for c in cells) + 2 if cells else width
    per_line = max(1, width // cell_width)
    lines = [cells[i : i + per_line] for i in range(0, len(cells), per_line)]
    out = Text()
    shown = lines if len(lines) <= rows else lines[: max(rows - 1, 0)]
    for line in shown:
        for c in line:
            out.append(c)
            out.append(" " * (cell_width - len(c)))
        out.append("\n")
    if len(shown) < len(lines):
        hidden = sum(len(line) for line in lines[len(shown) :])
        out.append(f"... {hidden} more layers (a taller terminal shows them)\n", style="dim")
    out.rstrip()
    return out


def figures(stats: dict) -> Table:
    t = Table.grid(padding=(0, 2))
    for _ in range(4):
        t.add_column()

    def f(v, fmt, suffix=""):
        return "-" if v is None else format(v, fmt) + suffix

    t.add_row("tokens/s", f(stats.get("tokens_per_s"), ".1f"), "stall", f(stats.get("stall_share"), ".0%"))
    t.add_row("overlap", f(stats.get("overlap"), ".0%"), "hit rate", f(stats.get("hit_rate"), ".0%"))
    t.add_row("acceptance", f(stats.get("acceptance"), ".0%"), "current k", f(stats.get("k"), "d"))
    t.add_row("tokens", f(stats.get("tokens"), "d"), "MB copied", f(stats.get("mb"), ".1f"))
    if stats.get("mb_read") is not None:
        t.add_row("", "", "MB read", f(stats.get("mb_read"), ".1f"))
    return t


def render(
    title: str,
    intervals,
    t_end: float,
    window: float,
    cache,
    layers,
    num_experts,
    missed,
    stats,
    text: str,
    host=None,
    size: tuple[int, int] = (120, 40),
):
    """The whole view, fitted to a terminal of ``size`` (columns, lines): 80x24 shows every
    part, lanes scaled to the width and the residency map packed into what is left."""
    columns, lines = size
    inner = max(columns - 4, 20)  # the outer panel's borders and padding
    lane_rows = lanes(intervals, t_end, window, width=max(inner - 10, 10))
    fig = figures(stats)
    used = 2 + 1 + 1 + lane_rows.plain.count("\n") + 1 + 1 + 2 + fig.row_count
    title_map = f"experts {'in RAM' if cache.name == 'RAM' else 'on the device'}: ■ resident ◆ in flight × missed" + (
        " ▪ in RAM" if host is not None else ""
    )
    preview = printable(text)[-(inner - 1) :]
    body = Group(
        Text(preview, style="white", no_wrap=True, overflow="ellipsis"),
        Text(""),
        lane_rows,
        Text(""),
        Panel(
            residency(cache, layers, num_experts, missed, host, width=inner - 4, rows=max(lines - used, 1)),
            title=title_map,
            title_align="left",
            border_style="grey42",
        ),
        fig,
    )
    return Panel(body, title=title, title_align="left", border_style="cyan", width=min(columns, 200))
