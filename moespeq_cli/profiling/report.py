"""The HTML report: one self-contained file (inline SVG and CSS, no scripts from the
network) with the timeline, per-layer hit rates, the summary table and k over time."""

from __future__ import annotations

import html
import json
from pathlib import Path

from moespeq_cli.fs import OwnOutput, atomic_write_text

COLORS = {
    ("compute", "target"): "#1f9bcf",
    ("compute", "draft"): "#b05fd6",
    ("stall", "target"): "#e0473d",
    ("stall", "draft"): "#e0473d",
    ("copy", "target"): "#e8b31a",
    ("copy", "draft"): "#e8b31a",
    ("host", "target"): "#3aa55d",
    ("host", "draft"): "#3aa55d",
}


def timeline_svg(intervals: list[dict], width: int = 1100, lane_h: int = 26) -> str:
    if not intervals:
        return "<p>no intervals</p>"
    t_end = max(iv["end"] for iv in intervals) or 1.0
    lanes = {"compute": 0, "copy": 1}
    if any(iv.get("stream") == "host" for iv in intervals):
        lanes["cpu"] = 2
    n = len(lanes)
    parts = [f'<svg width="{width + 90}" height="{n * lane_h + 40}" class="tl">']
    for name, i in lanes.items():
        parts.append(f'<text x="0" y="{i * lane_h + 18}" font-size="12">{name}</text>')
        parts.append(f'<rect x="80" y="{i * lane_h + 2}" width="{width}" height="{lane_h - 4}" fill="#f3f3f3"/>')
    for iv in intervals:
        host = iv.get("stream") == "host"
        lane = 2 if host else (1 if iv["kind"] == "copy" else 0)
        x = 80 + iv["start"] / t_end * width
        w = max(0.4, (iv["end"] - iv["start"]) / t_end * width)
        color = COLORS.get(("host" if host else iv["kind"], iv.get("phase", "target")), "#888")
        label = html.escape(f"{iv['name']} {iv['start'] * 1e3:.3f}-{iv['end'] * 1e3:.3f} ms")
        parts.append(
            f'<rect x="{x:.2f}" y="{lane * lane_h + 3}" width="{w:.2f}" height="{lane_h - 6}" '
            f'fill="{color}"><title>{label}</title></rect>'
        )
    for i in range(11):
        x = 80 + i * width / 10
        anchor = "end" if i == 10 else "middle"  # the last label ends at the lanes' end, inside the figure
        parts.append(
            f'<text x="{x:.1f}" y="{n * lane_h + 16}" font-size="10" text-anchor="{anchor}">'
            f"{t_end * i / 10 * 1e3:.2f} ms</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def bars_svg(values: dict[str, float], width: int = 500, bar_h: int = 16) -> str:
    parts = [f'<svg width="{width + 140}" height="{len(values) * (bar_h + 4) + 4}">']
    for i, (name, v) in enumerate(values.items()):
        y = i * (bar_h + 4) + 2
        parts.append(f'<text x="0" y="{y + 12}" font-size="12">{html.escape(name)}</text>')
        parts.append(f'<rect x="60" y="{y}" width="{width}" height="{bar_h}" fill="#eee"/>')
        parts.append(f'<rect x="60" y="{y}" width="{v * width:.1f}" height="{bar_h}" fill="#3aa55d"/>')
        parts.append(f'<text x="{width + 66}" y="{y + 12}" font-size="12">{v:.0%}</text>')
    parts.append("</svg>")
    return "".join(parts)


def k_svg(ks: list[int], width: int = 700, height: int = 120) -> str:
    if not ks:
        return "<p>no speculation (k is 0 throughout, or the policy does not speculate)</p>"
    k_max = max(max(ks), 1)
    step = width / max(len(ks) - 1, 1)
    pts = " ".join(f"{40 + i * step:.1f},{10 + (1 - k / k_max) * (height - 30):.1f}" for i, k in enumerate(ks))
    return (
        f'<svg width="{width + 60}" height="{height}">'
        f'<polyline points="{pts}" fill="none" stroke="#b05fd6" stroke-width="2"/>'
        f'<text x="0" y="16" font-size="11">k={k_max}</text><text x="0" y="{height - 18}" font-size="11">k=0</text>'
        f'<text x="40" y="{height - 2}" font-size="11">cycle 1</text>'
        f'<text x="{40 + width}" y="{height - 2}" font-size="11" text-anchor="end">cycle {len(ks)}</text></svg>'
    )


LABELS = {
    "clock": "clock",
    "new_tokens": "tokens generated",
    "seconds": "time",
    "tokens_per_s": "speed",
    "ttft_s": "time to first token",
    "tpot_s": "time per output token",
    "acceptance_rate": "draft tokens accepted",
    "mean_accepted": "accepted per cycle",
    "spec_depth_mean": "mean draft depth k",
    "expert_hit_rate": "expert hit rate",
    "prefetch_precision": "prefetch precision",
    "prefetch_recall": "prefetch recall",
    "io_stall_s": "waiting for experts (copies, reads, the CPU)",
    "cpu_wait_s": "... of it for experts on the CPU",
    "copy_overlap": "copy time under the device's compute",
    "bytes_h2d": "copied host to device",
    "bytes_read": "read from disk",
    "bound_ratio": "time over the lower bound",
    "draft_routing_match": "draft picks the target's experts",
    "cpu_expert_share": "experts computed on the CPU",
}
SECONDS = {"seconds", "ttft_s", "tpot_s", "io_stall_s", "cpu_wait_s"}
SHARES = {
    "acceptance_rate",
    "expert_hit_rate",
    "prefetch_precision",
    "prefetch_recall",
    "draft_routing_match",
    "cpu_expert_share",
    "copy_overlap",
}


def format_seconds(v: float) -> str:
    """12.35 ms below a second (a demo's whole run is milliseconds), 1.23 s above."""
    return f"{v * 1e3:.2f} ms" if abs(v) < 1 else f"{v:.2f} s"


def format_stat(key: str, v) -> str:
    """A statistic with its unit: 12.3 ms, 715.1 tok/s, 94%, 81.8 MB, 1.21x."""
    if v is None:
        return "-"
    if isinstance(v, str) or isinstance(v, bool):
        return str(v)
    if key in SECONDS:
        return format_seconds(v)
    if key in SHARES:
        return f"{v:.1%}"
    if key == "tokens_per_s":
        return f"{v:.1f} tok/s"
    if key in ("bytes_h2d", "bytes_read"):
        return f"{v / 1e9:.2f} GB" if v >= 1e9 else f"{v / 1e6:.1f} MB"
    if key == "bound_ratio":
        return f"{v:.2f}x"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


HEAD = '<!doctype html>\n<html><head><meta charset="utf-8"><title>moespeq profile: '
DATA = '<script type="application/json" id="moespeq-data">'


def is_report(head: bytes, tail: bytes) -> bool:
    """Whether a file (its first and last bytes) is a report ``write_report`` wrote."""
    return head.startswith(HEAD.encode()) and DATA.encode() in tail


REPORT = OwnOutput("a moespeq report", is_report)  # what --report may replace


def run_rows(result: dict) -> list[tuple[str, str]]:
    """What was measured: the budgets and the plan the run had, and what it noted (two
    reports of other budgets must be told apart)."""
    from moespeq_cli.runtime.planning.hardware import format_size

    plan = result.get("plan")
    rows = []
    if plan:
        host = plan.get("compute_tier") == "host"
        budget = "RAM budget (--ram)" if host else "device budget (--vram)"
        rows.append((budget, format_size(plan["budget_bytes"])))
        if not host and plan.get("host_budget_bytes") is not None:
            source = f" ({plan['ram_source']})" if plan.get("ram_source") else ""
            rows.append(("RAM for experts (--ram)", format_size(plan["host_budget_bytes"]) + source))
        where = "in RAM" if host else "on the device"
        rows.append(("expert slots", f"{plan['slots']} of {plan['total_experts']} {where}"))
        draft = plan["draft_bytes"] + (plan.get("host_draft_bytes") or 0)  # on the device and in RAM
        rows.append(("4-bit draft", format_size(draft) if plan.get("has_draft") else "none"))
        rows.append(("experts read from disk", "yes" if plan.get("disk_tier") else "no"))
        rows.append(("context", f"{plan['context_tokens']} tokens"))
    else:
        rows.append(("plan", "every expert in RAM (no offloading)"))
    depths = result.get("spec_depths") or []
    if depths:
        rows.append(("depth k per cycle", f"{min(depths)} to {max(depths)} over {len(depths)} cycles"))
    notes = ("budget_note", "governor_note", "ram_note", "draft_note")
    rows += [("note", result[k]) for k in notes if result.get(k)]
    return rows


def write_report(path: Path, result: dict, intervals: list[dict], layer_hits: dict[int, float]) -> None:
    s = result["stats"]
    rows = "".join(
        f"<tr><td>{html.escape(LABELS.get(k, k))}</td><td>{html.escape(format_stat(k, v))}</td></tr>"
        for k, v in s.items()
    )
    head = {k: result.get(k) for k in ("model", "backend", "hardware", "policy")}
    if head["hardware"] is None:  # (the cpu backend: no profile, this machine's wall clock)
        head["hardware"] = "this CPU"
    setup = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in run_rows(result))
    doc = f"""{HEAD}{html.escape(str(head["model"]))}</title>
<style>
body {{ font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin-top: 28px; }}
table {{ border-collapse: collapse; font-size: 13px; }} td {{ border: 1px solid #ddd; padding: 3px 8px; }}
.legend span {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; vertical-align: middle; }}
pre {{ background: #f7f7f7; padding: 8px; white-space: pre-wrap; }}
</style></head><body>
<h1>moespeq profile — {html.escape(" · ".join(f"{k}: {v}" for k, v in head.items()))}</h1>
<table>{setup}</table>
<h2>Timeline ({html.escape(s["clock"])} clock)</h2>
<div class="legend"><span style="background:#1f9bcf"></span>target compute<span style="background:#b05fd6"></span>draft
compute<span style="background:#e0473d"></span>stall (waiting on a copy or the CPU)<span style="background:#e8b31a"></span>copy host→device<span style="background:#3aa55d"></span>expert computed on the CPU</div>
{timeline_svg(intervals)}
<h2>Expert hit rate per MoE layer (at verification)</h2>
{bars_svg({f"L{k}": v for k, v in sorted(layer_hits.items())})}
<h2>Speculation depth k per cycle</h2>
{k_svg(result.get("spec_depths") or [])}
<h2>Summary</h2>
<table>{rows}</table>
<h2>Text</h2><pre>{html.escape(result.get("text", ""))}</pre>
{DATA}{html.escape(json.dumps({"stats": s}))}</script>
</body></html>
"""
    atomic_write_text(path, doc, own=REPORT)
