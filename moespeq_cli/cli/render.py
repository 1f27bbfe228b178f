"""All terminal output: streamed text on stdout, figures on stderr (Rich), JSON for
scripts. Everything else in moespeq returns data."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator


def no_color() -> bool:
    """$NO_COLOR set and not empty (no-color.org): moespeq's text is then plain, its dim
    and bold dropped with the colours (a terminal where dim reads poorly is one reason to
    set it)."""
    return os.environ.get("NO_COLOR", "") != ""


def styled_console(**options):
    """A rich console for moespeq's own lines and tables: plain text under $NO_COLOR
    (rich alone drops colours but keeps dim and bold)."""
    from rich.console import Console

    return Console(**options, **({"color_system": None} if no_color() else {}))


def _to_terminal(code: bytes) -> None:
    """A terminal control sequence to stderr's descriptor, from a signal handler (no
    exception may leave one)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.write(sys.stderr.fileno(), code)


class LoadingStatus:
    """A transient line on a terminal's stderr from the moment a command starts loading
    until ``stop`` (``run``: its first token): what is loading, then the plan in one line,
    then the prompt's pass. Most of a small model's start is importing torch and reading
    the checkpoint, before any plan exists, so it starts first. Nothing with --json or
    when stderr is not a terminal. Drawn without redirecting stdout and stderr (rich's
    default would leave the loggers torch creates meanwhile writing through its proxy);
    ``note`` prints a line above it; ``paused`` takes it down while the user types a
    prompt. As a context manager it ends on leaving. Ctrl-Z while it is drawn gives the
    shell its cursor back (the line hides it) and hides it again on ``fg``."""

    def __init__(self, quiet: bool = False):
        self._live = None
        self._text = "starting"
        self._tstp = None  # the SIGTSTP handler before ours, while the line is drawn
        if not quiet and sys.stderr.isatty():
            self._start()

    def _start(self) -> None:
        from rich.live import Live
        from rich.spinner import Spinner

        self._spinner = Spinner("dots", self._text)
        self._live = Live(
            self._spinner,
            console=styled_console(stderr=True),
            transient=True,
            refresh_per_second=12.5,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        if (
            hasattr(signal, "SIGTSTP")
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTSTP) is not signal.SIG_IGN  # (ignored stays ignored)
        ):
            self._tstp = signal.signal(signal.SIGTSTP, self._suspend)  # (before the cursor goes)
        try:
            self._live.start()
        except BaseException:
            self.stop()
            raise

    def _suspend(self, signum, frame) -> None:
        """Ctrl-Z: the cursor shown, the process stopped as it would be; on ``fg`` hidden
        again under the line."""
        live = self._live
        # straight to the terminal: the handler may interrupt the console's own write,
        # whose buffer it must not touch
        cursor = live is not None and live.console.is_terminal
        if cursor:
            _to_terminal(b"\x1b[?25h")
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stopped here until SIGCONT
        signal.signal(signal.SIGTSTP, self._suspend)
        if cursor and self._live is live:
            _to_terminal(b"\x1b[?25l")

    def show(self, what: str) -> None:
        self._text = what
        if self._live is not None:
            self._spinner.update(text=what)
            self._live.refresh()

    def planned(self, name: str, plan) -> None:
        """The model and its plan in one line (``plan``: None for the plain cpu run)."""
        from moespeq_cli.runtime.planning.hardware import format_size

        what = f"loading {name}"
        if plan is not None:
            what += f" · {format_size(plan.budget_bytes)} plan ({plan.policy}): {plan.tier_line()}"
        self.show(what)

    def note(self, text: str) -> None:
        """A line of its own on stderr, above the status line, which stays."""
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The line taken down meanwhile (the user typing a prompt), then drawn again."""
        if self._live is None:
            yield
            return
        self.stop()
        try:
            yield
        finally:
            self._start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._tstp is not None:
            signal.signal(signal.SIGTSTP, self._tstp)
            self._tstp = None

    def __enter__(self) -> LoadingStatus:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Renderer:
    def __init__(self, json_mode: bool = False):
        self.json_mode = json_mode
        self._last = "\n"
        self._thinking = False

    def reasoning(self, chunk: str) -> None:
        """A harmony model's (gpt-oss) reasoning as it streams: on stderr (stdout holds the
        answer alone), dimmed at a terminal."""
        if self.json_mode or not chunk:
            return
        sys.stderr.write(f"\x1b[2m{chunk}\x1b[0m" if sys.stderr.isatty() and not no_color() else chunk)
        sys.stderr.flush()
        self._thinking = True

    def split(self, answer: str, reasoning: str) -> None:
        """One step of a ``harmony.Split``: its reasoning (stderr), then its answer (stdout)."""
        self.reasoning(reasoning)
        self.text(answer)

    def text(self, chunk: str) -> None:
        if self.json_mode or not chunk:
            return
        if self._thinking:  # the answer starts on a line of its own
            sys.stderr.write("\n")
            self._thinking = False
        sys.stdout.write(chunk)
        sys.stdout.flush()
        self._last = chunk[-1]

    def end_text(self) -> None:
        if self._thinking:  # reasoning and no answer after it: end its line
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._thinking = False
        if self._last != "\n":
            sys.stdout.write("\n")
            sys.stdout.flush()

    def plan(self, engine) -> None:
        """The engine's memory plan in one dim line, with what it notes about this CPU (a
        run with every expert in RAM has no plan: the note alone)."""

        from moespeq_cli.runtime.planning.hardware import format_size

        plan, hw, note = engine.plan, engine.hw, engine.plan_note
        if plan is None:
            if note:
                say(note)
            if engine.ram_note:
                say(f"note: {engine.ram_note}", style=None)
            return
        parts = ", ".join(f"{name} {format_size(n)}" for name, n in plan.rows() if n)
        where = (
            f"--ram {format_size(plan.budget_bytes)} on this CPU"
            if hw is None
            else f"{format_size(plan.budget_bytes)} on {hw.name}"
        )
        line = f"plan: {where} ({plan.policy}): {parts}"
        if plan.disk_tier:
            line += f"; {plan.tier_line()}"
            if plan.compute_tier == "device":
                line += f"; --ram {format_size(plan.host_budget_bytes)}"
            if plan.ram_source:
                line += f" (--ram: {plan.ram_source})"
        if note:
            line += f"; {note}"
        say(line)
        for line in (engine.budget_note, engine.ram_note, engine.draft_note, depth_not_honoured(engine)):
            if line:
                say(f"note: {line}", style=None)

    def note(self, line: str) -> None:
        """One dim line on stderr (never in JSON mode)."""
        if self.json_mode:
            return
        say(line)

    def stats_line(self, result: dict) -> None:
        from rich.console import Console

        from moespeq_cli.profiling.report import format_seconds as secs
        from moespeq_cli.text import counted

        s = result["stats"]
        tokens = counted(s["new_tokens"], "token")
        if s["clock"] == "virtual" and result.get("wall_seconds") is not None:
            # the mock's figures are simulated time; the wall clock is what this machine spent
            parts = [f"{tokens} in {secs(s['seconds'])} virtual ({secs(result['wall_seconds'])} wall)"]
        else:
            parts = [f"{tokens} in {secs(s['seconds'])} ({s['clock']} clock)"]
        if s["tokens_per_s"] is not None:
            parts.append(f"{s['tokens_per_s']:.1f} tok/s")
        if s["ttft_s"] is not None:
            parts.append(f"TTFT {secs(s['ttft_s'])}")
        if s["tpot_s"] is not None:
            parts.append(f"TPOT {secs(s['tpot_s'])}")
        if s.get("spec_depth_mean") is not None:
            parts.append(f"k {s['spec_depth_mean']:.1f}")
        for key, label in (
            ("acceptance_rate", "accept"),
            ("expert_hit_rate", "hit rate"),
            ("cpu_expert_share", "on the CPU"),
        ):
            if s.get(key) is not None:
                parts.append(f"{label} {s[key]:.0%}")
        if s.get("io_stall_s") is not None and s["seconds"]:
            stall = f"stall {s['io_stall_s'] / s['seconds']:.0%}"  # waiting for experts: copies, reads, the CPU
            if s.get("cpu_wait_s"):
                stall += f" ({s['cpu_wait_s'] / s['seconds']:.0%} for the CPU)"
            parts.append(stall)
        if s.get("bytes_h2d") is not None:
            parts.append(f"{s['bytes_h2d'] / 1e6:.1f} MB copied")
        if s.get("bytes_read") is not None:
            parts.append(f"{s['bytes_read'] / 1e6:.1f} MB read from disk")
        head = f"[{result['backend']}"
        if result.get("policy"):
            head += f" · {result['policy']}"
        head += "]"
        console = Console(stderr=True)  # (its width alone)
        for line in wrap_fields([f"{head} {parts[0]}", *parts[1:]], console.width if console.is_terminal else None):
            say(line)


def say(text: str, style: str | None = "dim") -> None:
    """One message on stderr, its text as written (never read as rich markup: a path with
    brackets, or the stats line's "[mock · moespeq]", which rich took for a style and
    dropped), wrapped between words at a terminal's width and kept whole in a log."""
    from rich.text import Text

    out = styled_console(stderr=True, highlight=False)
    out.print(Text(text, style=style or ""), soft_wrap=not out.is_terminal)


def wrap_fields(fields: list[str], width: int | None) -> list[str]:
    """``fields`` joined by " · ", broken between fields (never inside one) so that each line
    fits ``width`` columns; one line when ``width`` is None (not a terminal: a log keeps it
    whole)."""
    lines = [fields[0]]
    for f in fields[1:]:
        if width is not None and len(lines[-1]) + 3 + len(f) > width:
            lines.append(f"  {f}")
        else:
            lines[-1] += f" · {f}"
    return lines


def bench_table(report: dict) -> None:
    from rich.table import Table

    from moespeq_cli.runtime.planning.hardware import format_size

    clock = report["results"][0]["stats"]["clock"] if report["results"] else "?"
    budget = []
    if report.get("vram_bytes") is not None:
        budget.append(f"--vram {format_size(report['vram_bytes'])}")
    if report.get("disk_tier") and report.get("ram_bytes") is not None:
        budget.append(f"--ram {format_size(report['ram_bytes'])}")
    where = report["hardware"] or "this CPU, experts from disk"
    title = (
        f"{report['model']} on {where} ({report['backend']}, {clock} clock), "
        + " ".join(budget)
        + (" + draft (same cache)" if report["same_cache"] else "")
    )
    disk = bool(report.get("disk_tier"))
    results = report["results"]
    # a comparison only against a baseline that ran, "on CPU" only where experts can run there
    baselines = [
        b for b in ("ondemand", "lru", "gate-prefetch", "hybrid") if any(r["speedup_vs"].get(b) for r in results)
    ]
    on_cpu = any(r["stats"].get("cpu_expert_share") is not None for r in results)
    cols = ["policy", "slots", "tok/s", *(f"vs {b}" for b in baselines), "hit rate", "stall"]
    cols += ["MB moved"] if report["backend"] != "cpu" else []
    cols += ["MB read"] if disk else []
    cols += ["on CPU"] if on_cpu else []
    cols += ["accept", "k", "bound ratio"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = []
    for r in results:
        s = r["stats"]
        stall = s["io_stall_s"] / s["seconds"] if s["io_stall_s"] is not None and s["seconds"] else None
        rows.append(
            [
                r["label"],
                str(r["slots"]),
                f(s["tokens_per_s"], ".1f"),
                *(f(r["speedup_vs"].get(b), ".2f") + ("x" if r["speedup_vs"].get(b) else "") for b in baselines),
                f(s["expert_hit_rate"], ".0%"),
                f(stall, ".0%"),
                *([f((s["bytes_h2d"] or 0) / 1e6, ".1f")] if report["backend"] != "cpu" else []),
                *([f((s.get("bytes_read") or 0) / 1e6, ".1f")] if disk else []),
                *([f(s.get("cpu_expert_share"), ".0%")] if on_cpu else []),
                f(s["acceptance_rate"], ".0%"),  # (as run's stats line says it)
                f(s["spec_depth_mean"], ".1f"),
                f(s["bound_ratio"], ".2f"),
            ]
        )
    console = table_console(170)
    # a narrow terminal drops the columns a reader needs least, first (a cut "1…" is no figure)
    least = ["bound ratio", "vs ondemand", "slots", "accept", "vs hybrid", "MB moved", "MB read", "vs gate-prefetch"]
    least += ["on CPU", "hit rate", "k"]
    left_out = []

    def table() -> Table:
        t = Table(title=title)
        for col in cols:
            t.add_column(col, justify="left" if col == "policy" else "right")
        for row in rows:
            t.add_row(*row)
        return t

    unbounded = console.options.update_width(10**4)  # (measured within the width, a table always fits)
    while console.measure(table(), options=unbounded).maximum > console.width and any(c in cols for c in least):
        drop = next(c for c in least if c in cols)
        i = cols.index(drop)
        cols.pop(i)
        for row in rows:
            row.pop(i)
        left_out.append(drop)
    console.print(table())
    if left_out:
        console.print(
            f"[dim]left out for the terminal's width: {', '.join(left_out)} (a wider one, or --json, has them)[/dim]"
        )


def plan_table(report: dict) -> None:
    """``moespeq plan``: one row per policy (placement and modelled tokens/s)."""
    from rich.markup import escape
    from rich.table import Table

    from moespeq_cli.runtime.planning.hardware import format_size
    from moespeq_cli.text import counted

    console = table_console(130, highlight=False)
    host = report.get("compute_tier") == "host"  # a profile of this CPU: RAM is the tier it computes from
    budget = "this CPU" if host else f"--vram {format_size(report['vram_bytes'])}"
    console.print(
        f"[bold]{report['model']}[/bold] on {report['hardware']}, {budget}, "
        f"{counted(report['context_tokens'], 'token')} of context, {report['dtype']}  [dim]({report['config']})[/dim]"
    )
    ram = format_size(report["ram_bytes"]) if report.get("ram_bytes") is not None else "unbounded"
    how = f" ({report['ram_source']})" if report.get("ram_source") else ""
    console.print(
        f"{report['total_experts']} routed experts of {format_size(report['expert_bytes'])} each "
        f"({format_size(report['experts_bytes'])} in all"
        + (
            f", {format_size(report['experts_ram_bytes'])} in RAM, in whole pages"
            if format_size(report["experts_ram_bytes"]) != format_size(report["experts_bytes"])
            else ""
        )
        + "); "
        f"{'RAM for the expert slots the CPU computes from' if host else 'host RAM for expert buffers'}: "
        f"--ram {ram}{how}."
    )
    disk = any(r["fits"] and r.get("disk_bytes") for r in report["policies"])
    table = Table(show_edge=False, header_style="bold")
    cols = ["policy", *([] if host else ["device"]), "slots", "draft", "RAM", *(["disk only"] if disk else [])]
    cols += ["tok/s*", "k"]
    for col in cols:
        table.add_column(col, justify="left" if col == "policy" else "right")
    best = max((r["estimate"]["tokens_per_s"] for r in report["policies"] if r["fits"]), default=None)
    refused: dict[str, list[str]] = {}  # reason -> the policies it refuses (said once)
    for r in report["policies"]:
        if not r["fits"]:
            table.add_row(r["policy"], "[red]does not fit[/red]", *[""] * (len(cols) - 2))
            refused.setdefault(r["reason"], []).append(r["policy"])
            continue
        p, e = r["plan"], r["estimate"]
        draft = f"{p['draft_device_experts']} ({format_size(p['draft_bytes'])})" if p["draft_bytes"] else "-"
        ram_col = format_size(r["host_bytes"]) + (" +CPU" if e["cpu_experts"] else "")
        tps = f"{e['tokens_per_s']:.2f}"
        if e["tokens_per_s"] == best:
            tps = f"[bold green]{tps}[/bold green]"
        k = "" if e["spec_depth"] is None else str(e["spec_depth"])
        on_disk = [format_size(r["disk_bytes"]) if r["disk_bytes"] else "-"] if disk else []
        device = [] if host else [format_size(r["device_bytes"])]
        table.add_row(r["policy"], *device, str(p["slots"]), draft, ram_col, *on_disk, tps, k)
    console.print(table)
    fixed = next((r["plan"] for r in report["policies"] if r["fits"]), None)
    kv = fixed and format_size(fixed["kv_cache_bytes"])
    fewest = min((r["plan"]["kv_cache_bytes"] for r in report["policies"] if r["fits"]), default=0)
    if fixed and fewest < fixed["kv_cache_bytes"]:  # linear-attention states: a cycle's, only where it may roll back
        kv += f" ({format_size(fewest)} without a draft's rollback states)"
    if fixed and host:
        console.print(
            f"RAM: full-precision expert slots and (moespeq) the 4-bit draft's experts, beside the non-expert "
            f"weights {format_size(fixed['non_expert_bytes'])}, KV cache {kv} and "
            f"workspace {format_size(fixed['workspace_bytes'])}"
            + ("; disk only: experts read from the checkpoint's files as needed" if disk else "")
            + "."
        )
    elif fixed:
        console.print(
            f"device: non-expert weights {format_size(fixed['non_expert_bytes'])}, KV cache "
            f"{kv}, workspace {format_size(fixed['workspace_bytes'])}, then "
            "full-precision expert slots and (moespeq) the 4-bit draft's experts; RAM: full-precision experts and "
            "the draft's other experts"
            + ("; disk only: experts read from the checkpoint's files as needed" if disk else "")
            + ". +CPU: experts not on the device may be computed there."
        )
    for reason, policies in refused.items():
        console.print(f"[red]{', '.join(policies)}: {escape(reason)}[/red]")
    for r in report["policies"]:
        if r["fits"] and r.get("note"):
            console.print(f"{r['policy']}: {r['note']}")
    console.print(
        f"[dim]* modelled with uniform routing and a draft acceptance of {report['acceptance_assumed']:.2f}; "
        f"`moespeq bench` measures on the mock clock, `moespeq run` on your {'CPU' if host else 'GPU'}.[/dim]"
    )


def end_note(engine, result: dict) -> str | None:
    """The governor's note for the end of a run's output, unless the model's loading said
    it (a run without a plan; a depth asked for and not honoured)."""
    if engine.plan is None or depth_not_honoured(engine) is not None:
        return None
    return result.get("governor_note")


def depth_not_honoured(engine) -> str | None:
    """Why a ``--spec-depth N`` asked for is not honoured (the plan left the draft out), said
    when the model loads: ``chat`` and ``serve`` have no end-of-run line to say it in."""
    if not engine.fixed_k or engine.plan is None or engine.plan.has_draft or engine.scheduler is None:
        return None
    from moespeq_cli.cli.run import NO_DRAFT

    return f"--spec-depth {engine.fixed_k} is not honoured: {engine.plan.note or NO_DRAFT}"


def table_console(pipe_width: int, **options):
    """A console for a table: a terminal's width, else ``pipe_width`` (logs and pipes: room
    for every column) unless $COLUMNS says a width, as it does for rich's own output."""
    import os

    shown = styled_console(**options)
    if shown.is_terminal or os.environ.get("COLUMNS", "").strip().isdigit():
        return shown
    return styled_console(width=pipe_width, **options)
