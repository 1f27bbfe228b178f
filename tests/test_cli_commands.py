"""The user-facing commands through the CLI runner: profile, bench, help and version."""

import json
import re

import pytest
from offload_helpers import stop_generation_after


def test_help_has_examples_for_every_command(cli):
    for cmd in ("pull", "quantize", "run", "profile", "bench"):
        r = cli(cmd, "--help")
        assert r.exit_code == 0 and "Examples" in r.stdout and f"moespeq {cmd}" in r.stdout


def test_version(cli):
    from moespeq_cli import __version__

    r = cli("--version")
    assert r.exit_code == 0 and __version__ in r.stdout


def test_help_imports_no_torch():
    import subprocess
    import sys

    code = "import sys; from moespeq_cli.cli.app import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


STATUS_PROBE = """
import sys
import moespeq_cli.cli.run as run
shown = run.LoadingStatus.__init__
def first(self, quiet=False):
    print("status started, torch imported:", "torch" in sys.modules, file=sys.stderr)
    shown(self, quiet)
run.LoadingStatus.__init__ = first
from moespeq_cli.cli.app import app
app(sys.argv[1:])
"""


@pytest.mark.parametrize("command", ["run", "chat", "profile"])
def test_the_loading_line_starts_before_torch_is_imported(command):
    """Importing torch is a second of a small model's start: the loading line is up before
    it, not after (it first appeared a second in, and vanished 50 ms later)."""
    import subprocess
    import sys

    args = [command, "-n", "2"] + (["--no-live"] if command == "profile" else [])
    r = subprocess.run(
        [sys.executable, "-c", STATUS_PROBE, *args], input="Hi\n", capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "status started, torch imported: False" in r.stderr.splitlines()[0], r.stderr


def test_the_loading_line_says_what_loads_then_the_plan_then_the_prompt():
    """On a terminal's stderr: the model, the plan in one line, the prompt's pass, each
    while it happens, then erased; stdout holds the text alone."""
    import os
    import pty
    import re
    import select
    import subprocess
    import sys

    leader, follower = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "moespeq_cli", "run", "-n", "4"],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=dict(os.environ, TERM="xterm"),  # rich draws no live line on a dumb terminal
    )
    os.close(follower)
    err, out, first_text = b"", b"", None  # first_text: how much stderr had come when stdout began
    streams = [leader, p.stdout.fileno()]
    while streams:
        ready, _, _ = select.select(streams, [], [], 120)
        assert ready, "no output for 120 s"
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the terminal's side closed
                data = b""
            if not data:
                streams.remove(fd)
            elif fd == leader:
                err += data
            else:
                out += data
                first_text = len(err) if first_text is None else first_text
    assert p.wait() == 0
    os.close(leader)
    before = re.sub(rb"\x1b\[[0-9;?]*[a-zA-Z]", b"", err[:first_text]).decode()
    steps = ["loading demo", "plan (moespeq): device", "demo: reading the prompt"]
    at = [before.find(s) for s in steps]
    assert -1 not in at and at == sorted(at), before
    assert b"\x1b" not in out and out.strip()
    assert b"Good morrow" not in out  # the default prompt is shown on a terminal only: a file holds the model's text


def profile_with_files(cli, path, trace, report):
    from offload_helpers import vram_for_slots

    return cli(
        "profile",
        str(path),
        "-p",
        "profile me",
        "-n",
        "16",
        "--backend",
        "mock",
        "--policy",
        "lru",
        "--vram",
        str(vram_for_slots(path, 6, 64)),  # experts must move: the trace has copies
        "--no-live",
        "--trace",
        str(trace),
        "--report",
        str(report),
        "--json",
    )


def test_profile_writes_trace_and_report(tiny, cli, tmp_path):
    path, _ = tiny("mixtral", "wide")
    trace, report = tmp_path / "t.json", tmp_path / "r.html"
    r = profile_with_files(cli, path, trace, report)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["report"] == str(report) and out["stats"]["clock"] == "virtual"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "copy" for e in events)
    page = report.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "Timeline" in page
    # what was measured: the budget and the plan (two reports of other budgets told apart)
    plan = out["plan"]
    assert "device budget (--vram)</td>" in page and f"{plan['slots']} of {plan['total_experts']} on the device" in page
    assert "http://" not in page and "https://" not in page  # viewable with no network
    assert page.count("<rect") > 20  # the timeline is drawn
    assert " tok/s</td>" in page and " ms</td>" in page and "%</td>" in page  # numbers with units
    import re

    ticks = re.findall(r'<text x="([\d.]+)"[^>]*text-anchor="(\w+)">[\d.]+ ms</text>', page)
    assert len(ticks) == 11 and ticks[-1][1] == "end"  # the last time label inside the figure (it was cut)


def test_profile_rejects_the_plain_cpu_backend(tiny, cli):
    path, _ = tiny("mixtral", "gqa")
    r = cli("profile", str(path), "--backend", "cpu", "--no-live")
    assert r.exit_code == 2 and "mock" in r.stderr and "--ram" in r.stderr


def test_run_profile_and_bench_on_the_disk_tier(tiny, cli, tmp_path):
    """--backend cpu with --ram below the experts: a real offloading run on the wall clock,
    with a plan line, a trace with disk reads, a profile report and a bench table."""
    from test_disk_offload import ram_for

    path, _ = tiny("mixtral", "wide")
    ram = str(ram_for(path, 6))
    base = ("-p", "disk tier", "-n", "8", "--backend", "cpu", "--ram", ram)
    r = cli("run", str(path), *base, "--policy", "lru", "--json", "--trace", str(tmp_path / "t.json"))
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    s = out["stats"]
    assert out["backend"] == "cpu" and out["policy"] == "lru" and out["hardware"] is None
    assert s["clock"] == "wall" and s["bytes_read"] > 0 and s["bytes_h2d"] is None
    assert out["plan"]["compute_tier"] == "host" and out["plan"]["disk_tier"] and out["plan"]["slots"] == 6
    trace = json.loads((tmp_path / "t.json").read_text())
    assert any(e.get("cat") == "read" for e in trace["traceEvents"])
    r = cli("run", str(path), *base)
    assert r.exit_code == 0, r.stderr
    assert "RAM 6 of 32 experts" in r.stderr and "MB read from disk" in r.stderr
    report = tmp_path / "p.html"
    r = cli("profile", str(path), *base, "--no-live", "--report", str(report), "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["bytes_read"] > 0 and "<svg" in report.read_text()
    assert "hardware: this CPU" in report.read_text() and "None" not in report.read_text().split("</h1>")[0]
    r = cli("bench", str(path), *base, "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert [x["policy"] for x in out["results"]] == ["moespeq", "gate-prefetch", "lru", "ondemand"]
    assert out["disk_tier"] and out["ram_bytes"] == int(ram) and out["hardware"] is None


@pytest.mark.parametrize(
    "args,words",
    [
        (["--backend", "cpu", "--ram", "lots"], ["--ram", "12GB"]),
        (["--backend", "cpu", "--ram", "-1GB"], ["--ram"]),
        (["--backend", "cpu", "--ram", "10KB"], ["--ram", "cannot hold"]),
        (["--backend", "cpu", "--ram", "200KB", "--policy", "hybrid"], ["hybrid", "--backend cpu"]),
        (["--backend", "cpu", "--ram", "200KB", "--cpu-experts"], ["--cpu-experts"]),
        (["--backend", "mock", "--ram", "10KB"], ["--ram", "cannot hold"]),
    ],
)
def test_bad_ram_is_one_line(tiny, cli, args, words):
    path, _ = tiny("mixtral", "wide")
    r = cli("run", str(path), "-p", "x", "-n", "2", *args)
    assert r.exit_code == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_bench_needs_a_disk_tier_on_the_cpu_backend(tiny, cli):
    path, _ = tiny("mixtral", "gqa")
    r = cli("bench", str(path), "-n", "2", "--backend", "cpu")
    assert r.exit_code == 2 and "--ram" in r.stderr


def test_bench_json(tiny, cli):
    from offload_helpers import vram_for_slots

    path, _ = tiny("mixtral", "wide")
    vram = vram_for_slots(path, 16, 13 + 16)
    r = cli(
        "bench",
        str(path),
        "-p",
        "benchmark me!",
        "-n",
        "16",
        "--backend",
        "mock",
        "--vram",
        str(vram),
        "--spec-depths",
        "auto,4",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["vram_bytes"] == vram and out["hardware"] == "rtx3060-12gb"
    labels = [x["label"] for x in out["results"]]
    assert labels == ["moespeq+cpu k=auto", "moespeq+cpu k=4", "hybrid", "gate-prefetch", "lru", "ondemand"]
    for x in out["results"]:
        assert set(x["speedup_vs"]) == {"ondemand", "lru", "gate-prefetch", "hybrid"}
        assert x["stats"]["bound_ratio"] >= 1.0 - 1e-9
    lru = next(x for x in out["results"] if x["policy"] == "lru")
    assert lru["speedup_vs"]["lru"] == pytest.approx(1.0)


def test_bench_unknown_policy(tiny, cli):
    path, _ = tiny("mixtral", "gqa")
    r = cli("bench", str(path), "--policies", "lru,magic")
    assert r.exit_code == 2 and "magic" in r.stderr


@pytest.mark.parametrize("cmd,opt", [("run", "--trace"), ("profile", "--trace"), ("profile", "--report")])
def test_unwritable_output_is_refused_before_work(tiny, cli, tmp_path, cmd, opt):
    path, _ = tiny("mixtral", "gqa")
    extra = ["--no-live"] if cmd == "profile" else []
    r = cli(cmd, str(path), "-n", "2", "--backend", "mock", opt, str(tmp_path / "missing" / "out.json"), *extra)
    assert r.exit_code == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = cli(cmd, str(path), "-n", "2", "--backend", "mock", opt, str(tmp_path), *extra)
    assert r.exit_code == 2 and "is a directory" in r.stderr


@pytest.mark.parametrize(
    "cmd,opts,failing",
    [
        ("run", ["--trace"], "trace"),
        ("profile", ["--trace", "--report"], "trace"),
        ("profile", ["--trace", "--report"], "report"),
    ],
)
def test_with_json_a_file_that_cannot_be_written_is_in_the_result(tiny, cli, tmp_path, monkeypatch, cmd, opts, failing):
    """A script reads stdout alone: --json's result said "trace": "t.json" (and a normal
    finish) when the disk was full and the file was never written. The files are written
    before the result, which names the ones written, nulls the rest and says why in
    ``error``; the error's line and exit 1 follow, and the answer is in the result."""
    from moespeq_cli.cli import run as run_module
    from moespeq_cli.errors import MoespeqError
    from moespeq_cli.profiling import report as report_module

    def full(*a, **k):
        raise MoespeqError("cannot write x (No space left on device); free some space")

    monkeypatch.setattr(run_module if failing == "trace" else report_module, f"write_{failing}", full)
    path, _ = tiny("mixtral", "gqa")
    files = {opt: tmp_path / f"out{opt.replace('-', '_')}" for opt in opts}
    args = [a for opt in opts for a in (opt, str(files[opt]))] + (["--no-live"] if cmd == "profile" else [])
    r = cli(cmd, str(path), "-n", "3", "--backend", "mock", "--json", *args)
    assert (
        r.exit_code == 1
        and r.stderr.strip() == "moespeq: error: cannot write x (No space left on device); free some space"
    )
    out = json.loads(r.stdout)
    assert out["error"] == "cannot write x (No space left on device); free some space"
    assert out[failing] is None and len(out["token_ids"]) == 3
    if cmd == "profile" and failing == "report":
        assert out["trace"] == str(files["--trace"]) and files["--trace"].exists()
    assert not any(f.exists() for opt, f in files.items() if opt.strip("-") == failing)


def test_atomic_write_failure_is_one_line(tmp_path):
    from moespeq_cli.errors import MoespeqError
    from moespeq_cli.runtime.timeline import atomic_write_text

    with pytest.raises(MoespeqError, match="cannot write"):
        atomic_write_text(tmp_path / "nope" / "x.txt", "data")


def test_demo_budget_is_the_same_with_the_default_hardware_spelled_out(cli):
    """One default budget: `run` and `run --hardware rtx3060-12gb` (the default, named)
    plan the demo alike, `plan` predicts that budget, and the mock's stats line gives
    the virtual and the wall time side by side."""
    plain = json.loads(cli("run", "-n", "4", "--json").stdout)
    named = json.loads(cli("run", "-n", "4", "--json", "--hardware", "rtx3060-12gb").stdout)
    assert plain["plan"]["budget_bytes"] == named["plan"]["budget_bytes"] == 24 * 2**20
    assert plain["wall_seconds"] > 0
    planned = json.loads(cli("plan", "--json").stdout)
    assert all(row["plan"]["budget_bytes"] == 24 * 2**20 for row in planned["policies"] if row["fits"])
    r = cli("run", "-n", "4")
    assert "s virtual (" in r.stderr and "s wall)" in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["run", "-n", "2", "--json"],
        ["plan", "--json"],
        ["bench", "-n", "2", "--policies", "lru,ondemand", "--json"],
    ],
)
def test_a_hardware_profile_is_read_once(cli, tmp_path, monkeypatch, args):
    """--hardware FILE is read once per command: the budget, the plan and every policy's
    engine price the same profile (a file edited mid-run cannot mix two)."""
    from moespeq_cli.runtime.planning import hardware

    profile = tmp_path / "box.yaml"
    profile.write_text(open(hardware.load_profile("rtx3060-12gb").source).read())
    reads = []
    parse = hardware.parse_profile
    monkeypatch.setattr(hardware, "parse_profile", lambda path: reads.append(path) or parse(path))
    r = cli(*args, "--hardware", str(profile))
    assert r.exit_code == 0, r.stderr
    assert reads == [profile]


@pytest.mark.parametrize("args", [[], ["-n", "32"], ["-n", "7", "-p", "To be or not"]])
def test_plan_predicts_the_context_and_slots_run_takes(cli, args):
    """`plan` with run's prompt options (or none, on the demo) plans the context `run`
    plans for -- the prompt's tokens plus --max-new-tokens -- and so the same slots."""
    ran = json.loads(cli("run", *args, "--json").stdout)["plan"]
    planned = json.loads(cli("plan", *args, "--json").stdout)
    row = next(r for r in planned["policies"] if r["policy"] == "moespeq")["plan"]
    assert planned["context_tokens"] == ran["context_tokens"] == row["context_tokens"]
    assert row["slots"] == ran["slots"] and row["budget_bytes"] == ran["budget_bytes"]
    # how the RAM was chosen, in each row as in run's plan (the rows had null; the figures move between calls,
    # the words are this machine's: available memory, or a memory cgroup's limit)
    assert row["ram_source"] and re.sub(r"[\d.]+", "N", row["ram_source"]) == re.sub(r"[\d.]+", "N", ran["ram_source"])


def test_the_blas_workspace_of_a_profile_is_planned_by_run_and_plan_alike(cli, tmp_path):
    """A GPU profile's ``blas_workspace`` (cuBLAS's and cuBLASLt's workspaces, which
    calibrate measures on CUDA) is held in the budget's workspace: `run` on the mock and
    `plan` both count it, so the same budget gives fewer expert slots than without it."""
    from moespeq_cli.runtime.planning.hardware import profiles_dir

    base = (profiles_dir() / "rtx3060-12gb.yaml").read_text()
    plans = {}
    for extra in (0, 4 * 2**20):
        hw = tmp_path / f"gpu-{extra}.yaml"
        hw.write_text(base + f"\nblas_workspace: {extra}\n")
        ran = json.loads(cli("run", "-n", "4", "--json", "--hardware", str(hw)).stdout)["plan"]
        planned = json.loads(cli("plan", "-n", "4", "--json", "--hardware", str(hw)).stdout)
        rows = {r["policy"]: r["plan"] for r in planned["policies"] if r["fits"]}
        assert rows["moespeq"]["workspace_bytes"] == ran["workspace_bytes"] and rows["moespeq"]["slots"] == ran["slots"]
        plans[extra] = (ran, rows["lru"])
    (ran0, lru0), (ran4, lru4) = plans[0], plans[4 * 2**20]
    assert ran4["workspace_bytes"] - ran0["workspace_bytes"] == 4 * 2**20
    assert lru4["workspace_bytes"] - lru0["workspace_bytes"] == 4 * 2**20
    assert ran4["slots"] < ran0["slots"] and ran4["budget_bytes"] == ran0["budget_bytes"]


def test_plan_refuses_prompt_options_without_a_tokenizer(cli):
    r = cli("plan", "mixtral", "-n", "32")
    assert r.exit_code == 2 and "give --context N" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(cli("plan", "mixtral", "--json").stdout)["context_tokens"] == 4096  # no prompt option: as before


def test_plan_with_prompt_options_on_a_damaged_checkpoint_says_what_run_says(tiny, cli, tmp_path):
    """A checkpoint whose weights file is cut short is no config alone: `plan -n 2` blamed
    a missing tokenizer where `run` names the truncated file."""
    import shutil

    src, _ = tiny("mixtral", "gqa")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    r = cli("plan", str(bad), "-n", "2")
    assert r.exit_code == 1 and "model.safetensors is truncated" in r.stderr, r.stderr
    assert "model.safetensors is truncated" in cli("run", str(bad), "-n", "2").stderr


def test_unknown_model_names_the_demo(cli):
    r = cli("run", "not-a-model")
    assert r.exit_code == 2 and "use demo (the built-in demo)" in r.stderr


COMMANDS = ("pull", "list", "rm", "run", "chat", "serve", "quantize", "profile", "bench", "plan", "calibrate")
MODULES = {"list": "listing", "rm": "remove"}  # (commands whose names are Python's own)


def help_at(columns: int, *args: str) -> str:
    """What docs/cli.md is made from, at another width."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from gen_cli_docs import help_text

    return help_text(list(args), columns)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_at_80_columns(command):
    """At 80 columns the options' help is a readable column (typer's six-column table left
    it 17 characters wide and cut words: "profiles/*.yam…"), and every example is whole
    on its lines, so it can be copied (comments above commands, long ones continued with
    a backslash)."""
    import importlib
    import re

    text = help_at(80, command)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in text, text
    # the help beside --hardware (or the first option's) starts a column at most 28 in
    opt = next(line for line in lines if re.match(r"│ --\S", line))
    assert re.match(r"│ --\S+(, -\w)?\s+\S", opt) and len(re.match(r"│ --\S+(, -\w)?\s+", opt)[0]) <= 28, opt
    epilog = importlib.import_module(f"moespeq_cli.cli.{MODULES.get(command, command)}").EPILOG
    shown = {line.strip() for line in lines}
    for line in epilog.splitlines():
        plain = re.sub(r"\[/?[a-z ]+\]", "", line).strip()
        if plain.startswith(("moespeq ", "printf ", "curl ", "-", "#")):
            assert plain in shown, (plain, text)


def test_the_narrow_help_falls_back_to_typer_s_own(monkeypatch):
    """Help must never fail: with typer internals this layout does not know (here a
    helper that raises, and a keyword argument a later typer might pass), typer's own
    panel is drawn, and nothing half-drawn before it."""
    import io

    import typer.rich_utils as ru
    from rich.console import Console

    from moespeq_cli.cli import help_layout

    calls = []
    monkeypatch.setattr(ru, "_print_options_panel", lambda **kw: calls.append(kw))
    help_layout.install()
    panel = ru._print_options_panel
    assert getattr(panel, "narrow_aware", False)

    def another_typer(*a, **kw):
        raise AttributeError("no such style in this typer")

    monkeypatch.setattr(help_layout, "narrow_table", another_typer)
    console = Console(width=60, file=io.StringIO())
    panel(name="Options", params=[object()], ctx=None, markup_mode="rich", console=console, added_later=1)
    assert len(calls) == 1 and calls[0]["added_later"] == 1 and console.file.getvalue() == ""


def test_wide_terminals_keep_typer_s_table():
    line = next(line for line in help_at(160, "run").splitlines() if "--max-new-tokens" in line)
    assert re.search(r"--max-new-tokens\s+-n\s+<int range> \[x>=1\]\s+Tokens to generate", line), line


def test_help_paragraphs_wrap_at_the_terminals_width():
    """A command's description reaches --help one line a paragraph (the terminal wraps it):
    typer keeps a docstring's source line breaks, which an 80-column terminal broke again
    mid-line ("the speedup" / "over each baseline")."""
    import typer

    from moespeq_cli.cli.app import app, prose

    assert prose("First line.\n\n    One paragraph\n    over two lines.\n\n    Another.\n") == (
        "First line.\n\nOne paragraph over two lines.\n\nAnother."
    )
    commands = typer.main.get_command(app).commands
    assert len(commands) == 11
    for name, command in commands.items():
        assert command.help and all("\n" not in p for p in command.help.split("\n\n")), name
        # the epilog's prose too (chat's broke at 80 columns: "at a terminal the" / "arrow keys"),
        # indented as its examples, which it otherwise pushed two columns right of every other's
        prose_lines = [ln for ln in (command.epilog or "").splitlines() if ln.strip() and not ln.startswith("  ")]
        assert prose_lines == ["[bold]Examples[/bold]"], (name, prose_lines)
        for para in (command.epilog or "").split("\n\n"):  # prose: one line (the source's ends are continued)
            if not para.lstrip().startswith(("[dim]", "[bold]Examples", "moespeq", "curl", "printf", "echo")):
                assert "\n" not in para.strip(), (name, para)
    from moespeq_cli.cli.chat import HELP

    assert "/help" in HELP  # the conversation's /help lists itself, as the other lists do


def test_the_loading_line_steps_aside(monkeypatch):
    """While a prompt is typed the line is down (its redraws would erase the typing), a
    note prints above it, and stdout and stderr stay the process's own while it is up
    (rich's default redirect left torch's loggers, created meanwhile, writing through its
    proxy)."""
    import io
    import sys
    import time

    from moespeq_cli.cli.render import LoadingStatus

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    out = sys.stdout
    status = LoadingStatus()
    try:
        status.show("loading demo")
        assert sys.stdout is out and sys.stderr is err
        with status.paused():
            before = len(err.getvalue())
            time.sleep(0.3)  # several of the spinner's frames
            during = err.getvalue()[before:]
        status.note("note: --cpu-threads has no effect here")
        status.show("demo: reading the prompt")
    finally:
        status.stop()
    text = err.getvalue()
    assert "loading demo" in text[:before] and during == ""
    assert "note: --cpu-threads has no effect here\n" in text and "demo: reading the prompt" in text


def test_a_silent_pipe_is_said_to_give_the_default_prompt(monkeypatch, capsys):
    """An open pipe that sends nothing is not a prompt, and the run says so (it used the
    default quietly: a prompt piped late looked ignored); one that closes empty gives the
    default and says so too (`cat empty.txt | moespeq run` answered a prompt never sent)."""
    import os
    import sys

    from moespeq_cli.cli import run

    monkeypatch.setattr(run, "STDIN_WAIT_S", 0.1)
    r, w = os.pipe()
    with os.fdopen(r) as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        assert run.read_prompt(None, None, "the default") == "the default"
        assert "nothing came on standard input within 0.1 s" in capsys.readouterr().err
        os.close(w)  # closed, empty: the default, said
        assert run.read_prompt(None, None, "the default") == "the default"
        assert capsys.readouterr().err == "moespeq: standard input was empty: using the default prompt\n"


def test_completion_for_the_shell_named(tmp_path):
    """`--install-completion zsh` installed bash's completion when run from bash (typer took
    no shell name where it can detect one); the name given is the shell, a wrong one is a
    usage error."""
    import os
    import subprocess
    import sys

    def moespeq(*args):
        env = {**os.environ, "HOME": str(tmp_path)}
        cmd = [sys.executable, "-m", "moespeq_cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)

    assert moespeq("--show-completion", "zsh").stdout.startswith("#compdef moespeq")
    assert "complete --command moespeq" in moespeq("--show-completion", "fish").stdout
    r = moespeq("--install-completion", "zsh")
    assert r.returncode == 0 and (tmp_path / ".zfunc" / "_moespeq").is_file(), r.stderr
    assert not (tmp_path / ".bashrc").exists()
    r = moespeq("--show-completion", "tcsh")
    assert r.returncode == 2 and "bash, zsh, fish" in r.stderr and len(r.stderr.splitlines()) == 1
    assert "Usage: moespeq" in moespeq("--show-completion", "--help").stdout  # --help still wins
    assert moespeq("--show-completion=fish").stdout == moespeq("--show-completion", "fish").stdout
    (tmp_path / ".zfunc" / "_moespeq").unlink()
    assert "Usage: moespeq" in moespeq("--install-completion", "bash", "--help").stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [".zfunc", ".zshrc"]  # nothing installed by asking help
    # fish reads each line as a candidate: an option's help must not wrap onto others
    fish = {"_MOESPEQ_COMPLETE": "complete_fish", "_TYPER_COMPLETE_FISH_ACTION": "get-args"}
    env = {**os.environ, **fish, "_TYPER_COMPLETE_ARGS": "moespeq run --", "COLUMNS": "80"}
    cmd = [sys.executable, "-m", "moespeq_cli"]
    lines = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60).stdout.splitlines()
    assert len(lines) > 10 and all(line.startswith("-") for line in lines), lines


def test_the_stats_line_keeps_its_head_and_wraps_between_fields(cli, tiny):
    """The head "[mock · moespeq]" reached rich as markup and was dropped; at a terminal the line
    breaks between fields, never inside one, and a log keeps it whole."""
    path, _ = tiny("mixtral", "gqa")
    r = cli("run", str(path), "--backend", "mock", "-p", "hi", "-n", "2")
    assert r.exit_code == 0 and "[mock · moespeq] 2 tokens in" in r.stderr, r.stderr
    from moespeq_cli.cli.render import wrap_fields

    fields = ["[mock · moespeq] 16 tokens in 0.01 s", "1194.5 tok/s", "TTFT 2 ms", "TPOT 0.8 ms", "hit rate 84%"]
    assert wrap_fields(fields, None) == [" · ".join(fields)]
    lines = wrap_fields(fields, 50)
    assert all(len(line) <= 50 for line in lines) and len(lines) > 1
    assert " · ".join(line.strip() for line in lines) == " · ".join(fields)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGINT, SIGTERM"])
def test_a_signal_in_an_import_is_raised_once_the_import_is_done(tmp_path, monkeypatch, signame):
    """Ctrl-C or SIGTERM landing while a module imports (torch's C++ import code swallowed
    the exception, or aborted on it: a cancelled `quantize` went on to replace the draft)
    is raised after the import, where the command's cleanups see it."""
    import importlib
    import signal
    import sys
    import time

    from moespeq_cli.cli.signals import Signals
    from moespeq_cli.errors import Terminated

    name = f"moespeq_test_slow_import_{signame.lower().replace(', ', '_')}"
    sends = "".join(f"os.kill(os.getpid(), signal.{s})\n" for s in signame.split(", "))
    (tmp_path / f"{name}.py").write_text(
        f"import os, signal, time\n{sends}for _ in range(20):\n    time.sleep(0.005)\nDONE = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    signals = Signals()
    raised = None
    try:
        importlib.import_module(name)  # the signal lands here, inside the import
        deadline = time.time() + 10
        while time.time() < deadline:
            time.sleep(0.01)
    except (KeyboardInterrupt, Terminated) as e:
        raised = e
    finally:
        signals.restore()
    assert isinstance(raised, KeyboardInterrupt if signame == "SIGINT" else Terminated)  # SIGTERM wins
    assert sys.modules[name].DONE  # the import ran to its end first
    assert {s: signal.getsignal(s) for s in before} == before
    waiting = Signals()
    waiting.pending = {signal.SIGINT}  # came in the command's last import, never raised
    assert waiting.restore() == signal.SIGINT and {s: signal.getsignal(s) for s in before} == before


def test_bench_union_bound_is_over_the_same_verifications(cli):
    """`union_bound` is (k+1) x top_k over the verifications `mean_union` averages; it took
    the run's mean k, k = 0 cycles included, and came out below the union (3.5 / 2 here)."""
    r = cli("bench", "--same-cache", "--policies", "moespeq", "--no-cpu-experts", "-n", "32", "--json")
    assert r.exit_code == 0, r.stderr
    (result,) = json.loads(r.stdout)["results"]
    assert result["mean_union"] is not None and result["mean_union"] <= result["union_bound"]


def test_bench_table_shows_only_columns_that_hold_figures(capsys):
    """On `--backend cpu` no hybrid runs and no expert is computed on the CPU beside a
    device: the table printed a "vs hybrid" and an "on CPU" column of dashes."""
    from moespeq_cli.cli.render import bench_table

    stats = dict(clock="wall", tokens_per_s=100.0, io_stall_s=0.1, seconds=1.0, expert_hit_rate=0.5)
    stats |= dict(bytes_read=1e6, cpu_expert_share=None, acceptance_rate=None, spec_depth_mean=0.0, bound_ratio=1.2)
    result = dict(label="moespeq k=auto", slots=6, stats=stats, speedup_vs={"lru": 1.1, "ondemand": 1.3})
    report = dict(model="demo", hardware=None, backend="cpu", same_cache=False, disk_tier=True, ram_bytes=2**20)
    bench_table(report | {"results": [result]})
    out = capsys.readouterr().out
    assert "vs lru" in out and "vs ondemand" in out and "MB read" in out
    assert "vs hybrid" not in out and "on CPU" not in out and "vs gate-prefetch" not in out


def test_bench_and_profile_say_what_run_says_of_the_budget(cli):
    """`--vram 1TB` got a note from `run` and none from `profile` or `bench`; a policy named
    twice ran twice; --spec-depths without moespeq was ignored; `--policies resident`'s
    error named run's --policy."""
    from test_bad_inputs import one_line_error

    r = cli("bench", "-n", "2", "--vram", "1TB", "--policies", "lru", "--json")
    assert r.exit_code == 0 and "is more than rtx3060-12gb's" in json.loads(r.stdout)["budget_note"], r.stderr
    r = cli("bench", "-n", "2", "--vram", "1TB", "--policies", "lru")
    assert r.exit_code == 0 and "note: --vram 931.32 GiB is more than" in r.stderr, r.stderr
    assert json.loads(cli("bench", "-n", "2", "--policies", "lru", "--json").stdout)["budget_note"] is None
    r = cli("profile", "-n", "2", "--no-live", "--vram", "1TB")
    assert r.exit_code == 0 and "note: --vram 931.32 GiB is more than" in r.stderr and "plan: " in r.stderr
    for cmd in ("run", "profile"):  # --json has it, as plan's and bench's have
        out = json.loads(cli(cmd, "-n", "2", "--vram", "1TB", "--json").stdout)
        assert "is more than rtx3060-12gb's" in out["budget_note"], cmd
    assert json.loads(cli("run", "-n", "2", "--json").stdout)["budget_note"] is None
    one_line_error(cli("bench", "-n", "2", "--policies", "lru,lru"), 2, "names lru twice")
    one_line_error(cli("bench", "-n", "2", "--policies", "lru", "--spec-depths", "4"), 2, "leaves moespeq out")
    one_line_error(
        cli("bench", "-n", "2", "--policies", "lru", "--same-cache"), 2, "--same-cache", "leaves moespeq out"
    )
    one_line_error(cli("bench", "-n", "2", "--policies", "lru,,ondemand"), 2, "empty entry")
    one_line_error(cli("bench", "-n", "2", "--spec-depths", "2,2"), 2, "twice")
    # refused before lru runs, not after (a real model's policies take hours)
    r = cli("bench", "-n", "2", "--policies", "lru,moespeq", "--spec-depths", "auto,2", "--draft", "none")
    one_line_error(r, 2, "--draft none leaves it out")
    line = one_line_error(
        cli("bench", "-n", "2", "--policies", "resident", "--vram", "20MB"), 2, "policy resident needs"
    )
    assert "--policy " not in line


def test_a_narrow_terminal_gets_whole_figures_from_bench(cli, monkeypatch):
    """bench's table at 80 columns cut every figure ("1…"): now the columns a reader needs
    least are left out, and said, until the rest fit whole."""
    import io
    import json
    import re

    import rich.console

    from moespeq_cli.cli.render import bench_table

    r = cli("bench", "-n", "4", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    real = rich.console.Console
    for width in (80, 60, 200):
        buf = io.StringIO()
        monkeypatch.setattr(
            rich.console, "Console", lambda *a, b=buf, w=width, **k: real(file=b, force_terminal=True, width=w)
        )
        bench_table(report)
        text = re.sub(r"\x1b\[[0-9;]*m", "", buf.getvalue())
        table = [ln for ln in text.splitlines() if ln.startswith("│")]
        assert all(len(ln) <= width for ln in text.splitlines()), text
        assert "…" not in "\n".join(table), text
        for res in report["results"]:  # each policy's tok/s shown whole
            assert f"{res['stats']['tokens_per_s']:.1f}" in text, text
        assert ("left out for the terminal's width" in text) == (width < 170), text
        assert ("bound ratio" in text.split("left out")[0]) == (width == 200)
    monkeypatch.setattr(rich.console, "Console", real)
    for columns, widest in (("80", 80), ("", 170)):  # a pipe: $COLUMNS where set (as rich reads it), else room
        buf = io.StringIO()
        monkeypatch.setenv("COLUMNS", columns)
        monkeypatch.setattr(rich.console, "Console", lambda *a, b=buf, **k: real(*a, file=b, **k))
        bench_table(report)
        lines = buf.getvalue().splitlines()
        assert max(map(len, lines)) <= widest and (max(map(len, lines)) > 80) == (widest > 80), buf.getvalue()


def test_run_says_why_its_text_ended(tiny, cli, tmp_path):
    """`run -n 760` gave 412 tokens without a word (the model's end-of-sequence token):
    --json has finish_reason, and the stats are followed by a note."""
    import shutil

    src, _ = tiny("mixtral", "gqa")
    args = ("-p", "hello world", "-n", "8", "--backend", "cpu")
    r = cli("run", str(src), *args, "--json")
    first = json.loads(r.stdout)
    assert (first["finish_reason"], first["interrupted"]) == ("length", False) and len(first["token_ids"]) == 8
    ended = tmp_path / "ended"
    shutil.copytree(src, ended)
    config = json.loads((ended / "config.json").read_text())
    (ended / "config.json").write_text(json.dumps(config | {"eos_token_id": first["token_ids"][2]}))
    (ended / "generation_config.json").unlink(missing_ok=True)
    r = cli("run", str(ended), *args, "--json")
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop" and out["token_ids"] == first["token_ids"][:3], r.stderr
    r = cli("run", str(ended), *args)
    assert r.exit_code == 0 and "ended its text (end-of-sequence token) after 3 of -n 8" in r.stderr, r.stderr
    assert "end-of-sequence" not in cli("run", str(src), *args).stderr


def test_run_stops_before_a_stop_string(cli):
    """`run --stop` (as chat's and the server's): the text ends before the string, on
    stdout and in --json, whose token_ids keep the token that completed it (stats count
    it); a string whose start ends the text but never completes holds nothing back."""
    from moespeq_cli.model_ref import DEMO_DIR
    from moespeq_cli.runtime.engine import Engine, EngineOptions
    from moespeq_cli.tokenizer import stream_text

    args = ("-n", "40", "--backend", "cpu")
    full = json.loads(cli("run", *args, "--json").stdout)
    text = full["text"]
    stop = text[21:26]  # across tokens (checked below)
    cut = text.find(stop)
    assert 0 < cut < len(text) - len(stop), text
    r = cli("run", *args, "--stop", stop, "--stop", "never said", "--json")
    out = json.loads(r.stdout)
    assert out["text"] == text[:cut] and out["finish_reason"] == "stop", (out["text"], text)
    ids = out["token_ids"]
    assert ids == full["token_ids"][: len(ids)] and out["stats"]["new_tokens"] == len(ids)
    tokenizer = Engine(DEMO_DIR, EngineOptions(backend="cpu", draft="none")).tokenizer
    assert stop in stream_text(tokenizer, ids) and stop not in stream_text(tokenizer, ids[:-1])
    assert stop not in stream_text(tokenizer, ids[-1:])  # (so the match spans tokens)
    r = cli("run", *args, "--stop", stop)
    assert r.exit_code == 0 and r.stdout.rstrip("\n") == text[:cut].rstrip("\n"), (r.stdout, r.stderr)
    assert "end-of-sequence" not in r.stderr
    tail = text[-2:] + "\u2603"  # its first two characters end the text: held back, then shown
    r = cli("run", *args, "--stop", tail)
    assert r.exit_code == 0 and r.stdout.rstrip("\n") == text.rstrip("\n"), (r.stdout, r.stderr)
    out = json.loads(cli("run", *args, "--stop", tail, "--json").stdout)
    assert out["text"] == text and out["finish_reason"] == full["finish_reason"]


def test_a_profile_stopped_by_ctrl_c_writes_what_it_recorded(tiny, cli, tmp_path, monkeypatch):
    """Ctrl-C during `profile --trace --report` (a long run, enough seen) left neither file:
    both are written for the tokens generated, as a profiler writes what it recorded when
    stopped, then the interruption (exit 130)."""
    stop_generation_after(monkeypatch, 5)
    path, _ = tiny("mixtral", "wide")
    trace, report = tmp_path / "t.json", tmp_path / "r.html"
    r = profile_with_files(cli, path, trace, report)
    assert r.exit_code == 130 and r.stderr.strip().splitlines()[-1] == "moespeq: error: interrupted", r.stderr
    out = json.loads(r.stdout)
    assert out["interrupted"] and out["finish_reason"] == "interrupted" and len(out["token_ids"]) == 5
    assert out["trace"] == str(trace) and out["report"] == str(report)
    assert any(e.get("cat") == "copy" for e in json.loads(trace.read_text())["traceEvents"])
    assert report.read_text().startswith("<!doctype html>")


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_chat_and_serve_say_their_default_context(cli, command):
    """Their --help said "Default: what the prompt and --max-new-tokens need" (run's), where
    they hold 4,096 tokens: a QA run's 5,000-token request was refused with no word of it."""
    r = cli(command, "--help")
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.stdout).split())
    assert "Default: 4096 (the demo: 512)" in flat and "what the prompt and --max-new-tokens need" not in flat


def test_trace_events_that_meet_do_not_overlap_by_a_rounding():
    """Adjacent regions of a lane (one ends where the next starts) were written with start
    and duration rounded apart: 22 pairs in a 48-token profile overlapped by a nanosecond,
    which a trace viewer draws nested. In whole nanoseconds, as viewers read them, they meet."""
    import random

    from moespeq_cli.runtime.timeline import Interval, Timeline

    rng = random.Random(0)
    timeline, t = Timeline(), 0.0
    for i in range(2000):
        end = t + rng.uniform(1e-7, 3e-4)
        timeline.add(Interval("compute", "compute", f"r{i}", t, end))
        t = end
    events = [e for e in timeline.chrome_trace()["traceEvents"] if e["ph"] == "X"]
    for a, b in zip(events, events[1:], strict=False):
        assert round(a["ts"] * 1e3) + round(a["dur"] * 1e3) == round(b["ts"] * 1e3), (a, b)


@pytest.mark.parametrize("no_color", ["", "1"])
def test_no_color_makes_moespeqs_own_lines_plain(monkeypatch, no_color):
    """$NO_COLOR (set, not empty) drops dim and bold too, which rich alone keeps: the
    plan, stats and notes lines, the tables, a reasoning model's dimmed thoughts."""
    import io
    import sys

    from rich.text import Text

    from moespeq_cli.cli import render

    monkeypatch.setenv("NO_COLOR", no_color)
    buf = io.StringIO()
    render.styled_console(file=buf, force_terminal=True).print(Text("note", style="dim"), Text("head", style="bold"))
    term = io.StringIO()
    term.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", term)
    render.Renderer().reasoning("thinking")
    for out in (buf.getvalue(), term.getvalue()):
        assert ("\x1b[" in out) == (no_color == ""), out
    assert "note" in buf.getvalue() and "thinking" in term.getvalue()


def test_other_names_users_type_for_commands(cli):
    """`ls` and `remove` (ollama's and others' names) are `list` and `rm`; `help [COMMAND]`
    is --help; none is listed as a command of its own."""
    assert cli("ls", "--json").stdout == cli("list", "--json").stdout != ""
    assert cli("help", "rm").stdout == cli("rm", "--help").stdout != ""
    top = cli("help")
    assert top.exit_code == 0 and top.stdout == cli("--help").stdout
    assert not re.search(r"│ (ls|remove|help) ", top.stdout)
    r = cli("remove", "no-such-model", "--yes")
    assert r.exit_code == 2 and "no-such-model is not on this machine" in r.stderr
    r = cli("help", "nope")
    assert r.exit_code == 2 and "No such command 'nope'" in r.stderr
    assert cli("help", "help").stdout == top.stdout  # (as git's)
    assert cli("help", "--json", "rm").stdout == cli("rm", "--help").stdout  # an option after help: ignored
