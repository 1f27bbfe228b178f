"""Hostile and unlucky inputs (docs/security.md): each case builds the input, runs the
command, and asserts the exit code, one line on stderr naming the problem, no
traceback, no file changed that should not be, and no hang (a 10 s alarm per case)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from offload_helpers import stop_generation_after
from test_bad_inputs import one_line_error, run

GUARD_S = 10


class Hang(Exception):
    pass


@pytest.fixture(autouse=True)
def hang_guard(request):
    """Fail a case that runs past GUARD_S instead of hanging the suite (cases that start
    real processes, each with its own timeout, get a minute: start-up imports torch)."""
    limit = 60 if "moespeq_process" in request.fixturenames else GUARD_S

    def on_alarm(signum, frame):
        raise Hang(f"the case ran past {limit} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def tree(path: Path) -> dict:
    """Every entry under ``path``: its kind and, for files, a hash of the contents."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(path))] = stat.S_IFMT(st.st_mode)
    return out


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


# -- 1. never destroy what the user did not ask to destroy ------------------------


@pytest.mark.parametrize("where", ["checkpoint", "user-dir", "file", "other-draft"])
def test_quantize_refuses_an_out_that_is_not_its_draft(cli, ckpt, tiny, tmp_path, where):
    if where == "checkpoint":
        out = ckpt
    elif where == "user-dir":
        out = tmp_path / "mine"
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    elif where == "file":
        out = tmp_path / "notes.txt"
        out.write_text("precious")
    else:
        other, _ = tiny("mixtral", "top1")
        out = tmp_path / "draft"
        assert cli("quantize", str(other), "--out", str(out)).exit_code == 0
    before = tree(tmp_path)
    one_line_error(cli("quantize", str(ckpt), "--out", str(out)), 2, str(out))
    assert tree(tmp_path) == before


def dead_pid() -> int:
    """The pid of a process that has ended (a killed writer's)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_quantize_never_replaces_a_directory_holding_anything_but_a_draft(cli, tiny, ckpt, tmp_path):
    """A sharded checkpoint holding a copy of its own draft's files (its fingerprint covers
    the shards its index names, so the directory once passed as "a draft of this
    checkpoint" and was replaced, weights and all), and notes kept beside a draft in its
    default directory: refused, nothing touched."""
    src, ref = tiny("mixtral", "gqa")
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="100KB", safe_serialization=True)
    shutil.copy(src / "tokenizer.json", sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    out = tmp_path / "draft"
    assert cli("quantize", str(sharded), "--out", str(out)).exit_code == 0
    for f in out.iterdir():
        shutil.copy(f, sharded / f.name)
    r = cli("run", str(sharded), "--draft", str(sharded), "-p", "hi", "-n", "2", "--spec-depth", "2")
    assert r.exit_code == 0, r.stderr  # a draft of this checkpoint, by its manifest
    before = tree(tmp_path)
    one_line_error(cli("quantize", str(sharded), "--out", str(sharded)), 2, "config.json", "refusing")
    assert tree(tmp_path) == before
    assert cli("quantize", str(ckpt)).exit_code == 0  # the default directory, beside the checkpoint
    default = tmp_path / "ckpt.moespeq-draft-nf4-b64"
    (default / "NOTES.txt").write_text("mine")
    before = tree(tmp_path)
    one_line_error(cli("quantize", str(ckpt)), 2, "NOTES.txt", "the draft directory")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("damage", ["manifest", "no-manifest", "other-weights"])
def test_quantize_rebuilds_a_damaged_or_stale_draft_at_its_default_path(cli, ckpt, tmp_path, damage):
    """What `run` says to do about a damaged draft (rebuild it with `moespeq quantize`)
    works; a draft of the checkpoint's earlier weights at its own default path is replaced
    too, while a given --out holding another checkpoint's draft is still refused."""
    assert cli("quantize", str(ckpt)).exit_code == 0
    default = tmp_path / "ckpt.moespeq-draft-nf4-b64"
    if damage == "manifest":
        (default / "manifest.json").write_text("{half")
    elif damage == "no-manifest":
        (default / "manifest.json").unlink()
    else:
        edit_json(default / "manifest.json", source_fingerprint="0" * 64)
        one_line_error(cli("quantize", str(ckpt), "--out", str(default)), 2, "another checkpoint")
    r = cli("quantize", str(ckpt))
    assert r.exit_code == 0, r.stderr
    assert cli("run", str(ckpt), "-p", "hi", "-n", "2", "--spec-depth", "2").exit_code == 0


def test_a_draft_keeps_its_directorys_mode_and_takes_the_umask(cli, ckpt, tmp_path):
    out = tmp_path / "draft"
    old = os.umask(0o022)
    try:
        assert cli("quantize", str(ckpt), "--out", str(out)).exit_code == 0
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o755  # not mkdtemp's 0700
        assert stat.S_IMODE(os.stat(out / "draft.safetensors").st_mode) == 0o644
        os.chmod(out, 0o750)
        os.chmod(out / "manifest.json", 0o640)
        assert cli("quantize", str(ckpt), "--out", str(out)).exit_code == 0
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o750
        assert stat.S_IMODE(os.stat(out / "manifest.json").st_mode) == 0o640
    finally:
        os.umask(old)


def test_a_live_writers_temporary_draft_is_left_alone(cli, ckpt, tmp_path):
    """Two writers under different locks (two users' caches): the second's clean-up must
    not remove the first's draft in progress, only a dead writer's."""
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.quant.draft_store import fingerprint, recover

    out = tmp_path / "draft"
    live, dead = tmp_path / f".draft.tmp-{os.getppid()}-abc", tmp_path / f".draft.tmp-{dead_pid()}-def"
    for d in (live, dead):
        d.mkdir()
        (d / "draft.safetensors").write_bytes(b"in progress")
    recover(out, fingerprint(Checkpoint(ckpt)))
    assert live.exists() and not dead.exists()


def test_a_long_draft_name_is_accepted(cli, ckpt, tmp_path):
    out = tmp_path / ("d" * 240)  # a valid name; the temporary names built from it must be too
    r = cli("quantize", str(ckpt), "--out", str(out))
    assert r.exit_code == 0, r.stderr
    assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", out.name]  # no temporary left


def test_a_hub_snapshots_draft_goes_to_moespeqs_cache(tmp_path, monkeypatch):
    """Nothing of moespeq's beside a snapshot in the Hugging Face cache (its tools would list
    it as a revision); a draft an earlier moespeq wrote there is still found."""
    from moespeq_cli.fs import cache_dir
    from moespeq_cli.quant.draft_store import default_draft_dir, saved_draft

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert cache_dir() in default_draft_dir(snap, "nf4", 64).parents
    assert saved_draft(snap, "nf4", 64) is None
    earlier = snap.with_name("abc123.moespeq-draft-nf4-b64")
    earlier.mkdir()
    (earlier / "manifest.json").write_text("{}")
    assert saved_draft(snap, "nf4", 64) == earlier.resolve()
    plain = tmp_path / "models" / "tiny"
    plain.mkdir(parents=True)
    assert default_draft_dir(plain, "nf4", 64).parent == plain.resolve().parent


def test_quantize_replaces_its_own_draft_and_cleans_stale_temporaries(cli, ckpt, tmp_path):
    out = tmp_path / "draft"
    assert cli("quantize", str(ckpt), "--out", str(out)).exit_code == 0
    first = tree(out)
    stale = tmp_path / f".draft.tmp-{dead_pid()}"  # left by a killed run
    stale.mkdir()
    (stale / "draft.safetensors").write_bytes(b"half")
    # killed while safetensors wrote: its file still under the writer's temporary name
    mid_write = tmp_path / f".draft.tmp-{dead_pid()}-x"
    mid_write.mkdir()
    (mid_write / ".tmp8HSyJC").write_bytes(b"half of a draft")
    users = tmp_path / f".draft.tmp-{dead_pid()}-y"  # the same name, but not a draft's files
    users.mkdir()
    (users / "notes.tmp").write_text("mine")
    r = cli("quantize", str(ckpt), "--out", str(out))
    assert r.exit_code == 0, r.stderr
    assert tree(out) == first  # the same weights quantize to the same draft
    assert not stale.exists() and not mid_write.exists() and (users / "notes.tmp").exists()
    users.joinpath("notes.tmp").unlink()
    users.rmdir()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".draft")]


def test_a_draft_set_aside_by_a_killed_run_comes_back(cli, ckpt, tmp_path):
    out = tmp_path / "draft"
    assert cli("quantize", str(ckpt), "--out", str(out)).exit_code == 0
    # A kill between "rename the old one aside" and "rename the new one in":
    aside = tmp_path / f".draft.old-{dead_pid()}"
    os.replace(out, aside)
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.quant.draft_store import draft_lock, fingerprint

    with draft_lock(out, fingerprint(Checkpoint(ckpt))):
        assert (out / "manifest.json").is_file() and not aside.exists()


def test_second_quantize_of_the_same_draft_says_one_is_in_progress(cli, ckpt, tmp_path):
    import fcntl

    out = tmp_path / "draft"
    assert cli("quantize", str(ckpt), "--out", str(out)).exit_code == 0
    before = tree(out)
    from moespeq_cli.quant.draft_store import lock_file

    with open(lock_file(out), "w") as held:  # another process is writing it
        fcntl.flock(held, fcntl.LOCK_EX)
        one_line_error(cli("quantize", str(ckpt), "--out", str(out)), 1, "another moespeq", str(out))
    assert tree(out) == before


def test_two_quantize_processes_at_once(ckpt, tmp_path, moespeq_process):
    out = tmp_path / "draft"
    cmd = [sys.executable, "-m", "moespeq_cli", "quantize", str(ckpt), "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert any(code == 0 for code, _ in results)
    for code, err in results:
        assert code in (0, 1) and "Traceback" not in err
        if code == 1:
            assert "another moespeq" in err
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.quant.draft import QuantizedExperts

    QuantizedExperts.load(out, Checkpoint(ckpt))  # complete and readable


def special_file(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"out-{kind}"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "dir":
        p.mkdir()
    elif kind == "socket":
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    return p


@pytest.mark.parametrize("kind", ["fifo", "dir", "socket"])
@pytest.mark.parametrize("option", ["--trace", "--report"])
def test_output_paths_must_be_regular_files(cli, ckpt, tmp_path, kind, option):
    target = special_file(tmp_path, kind)
    mode = os.lstat(target).st_mode
    r = cli("profile", str(ckpt), "-p", "hi", "-n", "2", "--no-live", option, str(target))
    one_line_error(r, 2, option, str(target))
    assert os.lstat(target).st_mode == mode


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/null"), reason="as root, /dev/null is writable")
def test_trace_to_dev_null_leaves_the_device_alone(cli, ckpt):
    before = os.lstat("/dev/null")
    one_line_error(run(cli, ckpt, "--backend", "mock", "--trace", "/dev/null"), 2, "/dev/null")
    after = os.lstat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


@pytest.mark.parametrize("option", ["--trace", "--report"])
def test_an_output_never_replaces_the_runs_inputs(cli, ckpt, tmp_path, option):
    """--trace or --report naming the checkpoint's weights or config, the prompt file or the
    hardware profile: refused before any work, the file intact; a new file inside the
    checkpoint directory is fine."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hi")
    profile = write_profile(tmp_path / "hw.yaml")
    for target in (ckpt / "model.safetensors", ckpt / "config.json", prompt, profile):
        before = tree(tmp_path)
        r = cli(
            "profile", str(ckpt), "--prompt-file", str(prompt), "-n", "2", "--no-live",
            "--hardware", str(profile), option, str(target),
        )  # fmt: skip
        one_line_error(r, 2, option, "would overwrite")
        assert tree(tmp_path) == before
    r = cli("profile", str(ckpt), "-p", "hi", "-n", "2", "--no-live", option, str(ckpt / "new.out"))
    assert r.exit_code == 0, r.stderr


def test_an_output_never_replaces_a_draft_of_the_checkpoint(cli, ckpt, tmp_path, monkeypatch):
    """The drafts a run finds by itself (beside the checkpoint, in moespeq's cache, shipped
    with the demo), of any method, directly or through a link: refused, the file intact."""
    from moespeq_cli.model_ref import DEMO_DIR
    from moespeq_cli.quant.draft_store import default_draft_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    beside = ckpt.with_name(ckpt.name + ".moespeq-draft-fp4-b128")
    cached = default_draft_dir(DEMO_DIR, "nf4", 32)  # the demo's drafts go to the cache
    link = tmp_path / "link.safetensors"
    targets = []
    for d in (beside, cached):
        d.mkdir(parents=True)
        (d / "draft.safetensors").write_bytes(b"weights")
        targets.append(d / "draft.safetensors")
    link.symlink_to(beside / "draft.safetensors")
    shipped = sorted((DEMO_DIR.parent).glob("demo-draft-*"))[0] / "manifest.json"
    for model, target in ((ckpt, targets[0]), (ckpt, link), ("demo", targets[1]), ("demo", shipped)):
        before = target.read_bytes()
        r = cli("run", str(model), "-n", "2", "--draft", "none", "--trace", str(target))
        one_line_error(r, 2, "--trace", "would overwrite the checkpoint's draft")
        assert target.read_bytes() == before


def test_a_replaced_output_keeps_its_mode_and_a_killed_writers_leftover_goes(tmp_path):
    from moespeq_cli.fs import atomic_write_text

    out = tmp_path / "trace.json"
    out.write_text("old")
    os.chmod(out, 0o600)
    stale = tmp_path / f".trace.json.{dead_pid()}.x1y2z3w4.tmp"  # a kill after the write, before the rename
    stale.write_text("half")
    mine = tmp_path / f".trace.json.{os.getpid()}.zzzzzzzz.tmp"  # a live writer's
    mine.write_text("busy")
    atomic_write_text(out, "new")
    assert out.read_text() == "new" and stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert not stale.exists() and mine.exists()


def test_calibrate_refuses_an_unwritable_out_before_measuring(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    # refused at once: measuring first would take a minute, past the case's hang guard
    one_line_error(cli("calibrate", "--out", str(blocker / "sub" / "p.yaml")), 2, "--out", "not a directory")
    # a directory that is not there is not made (a mistyped path leaves nothing behind), as
    # every file option refuses it
    missing = tmp_path / "no" / "such"
    one_line_error(cli("calibrate", "--out", str(missing / "p.yaml")), 2, "--out", "does not exist; create it")
    assert not (tmp_path / "no").exists()


def test_trace_through_a_symlink_replaces_its_target(cli, ckpt, tmp_path):
    real = tmp_path / "real.json"
    real.write_text("")  # (an empty file is no one's work)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert run(cli, ckpt, "--backend", "mock", "--trace", str(link)).exit_code == 0
    assert link.is_symlink() and json.loads(real.read_text())["traceEvents"]


def test_an_output_replaces_only_an_earlier_output_of_its_kind(cli, ckpt, tmp_path):
    """`--trace notes.txt` or `--report mycode.py` overwrote the user's file; now only an
    earlier trace or report is replaced, through a link too; anything else is refused
    before any work, untouched."""
    trace, report = tmp_path / "t.json", tmp_path / "r.html"
    args = ("--backend", "mock", "--trace", str(trace))
    assert run(cli, ckpt, *args).exit_code == 0
    first = trace.read_text()
    assert run(cli, ckpt, *args, "-n", "6").exit_code == 0 and trace.read_text() != first  # its own: replaced
    prof = ("profile", str(ckpt), "-n", "2", "--no-live", "--report", str(report))
    assert cli(*prof).exit_code == 0 and cli(*prof).exit_code == 0
    mine = tmp_path / "mycode.py"
    for text in ("important = 1\n", '{"traceEvents": []}', "<!doctype html><p>my page</p>"):
        mine.write_text(text)
        link = tmp_path / "link"
        link.unlink(missing_ok=True)
        link.symlink_to(mine)
        for where in (mine, link):
            one_line_error(run(cli, ckpt, "--backend", "mock", "--trace", str(where)), 2, "not a moespeq trace")
            r = cli("profile", str(ckpt), "-n", "2", "--no-live", "--report", str(where))
            one_line_error(r, 2, "--report", "not a moespeq report", "new file name")
        assert mine.read_text() == text
    # a trace is not a report, nor the other way round
    one_line_error(cli("profile", str(ckpt), "-n", "2", "--no-live", "--report", str(trace)), 2, "not a moespeq report")
    one_line_error(run(cli, ckpt, "--backend", "mock", "--trace", str(report)), 2, "not a moespeq trace")


def test_an_output_that_appears_while_moespeq_runs_is_left_alone(cli, ckpt, tmp_path, monkeypatch):
    """Outputs are checked when the command starts and written at its end: a user's file
    created at that path meanwhile was replaced. Checked again just before the rename; a
    profile calibrate writes too."""
    from moespeq_cli.errors import MoespeqError
    from moespeq_cli.fs import atomic_write_text
    from moespeq_cli.runtime.planning.hardware import PROFILE
    from moespeq_cli.runtime.timeline import Timeline

    trace = tmp_path / "t.json"
    made = Timeline.chrome_trace

    def appear(self, metadata=None):
        trace.write_text("the user's\n")
        return made(self, metadata)

    monkeypatch.setattr(Timeline, "chrome_trace", appear)
    r = run(cli, ckpt, "--backend", "mock", "--trace", str(trace))
    assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr  # (after the plan line: one error line)
    assert "tokens in" in r.stderr  # the answer and its statistics came first: not lost
    assert all(s in r.stderr.splitlines()[-1] for s in ("appeared there", str(trace), "another file name"))
    assert trace.read_text() == "the user's\n" and not list(tmp_path.glob(".t.json*"))  # (no temporary left)
    report = tmp_path / "r.html"
    listed = Timeline.to_list

    def appear_too(self):
        report.write_text("<p>mine</p>")
        return listed(self)

    monkeypatch.setattr(Timeline, "to_list", appear_too)
    r = cli("profile", str(ckpt), "-n", "3", "--no-live", "--report", str(report))
    assert r.exit_code == 1 and "appeared there" in r.stderr.splitlines()[-1], r.stderr
    assert report.read_text() == "<p>mine</p>" and r.stdout.strip() and "tokens in" in r.stderr  # output kept
    profile = tmp_path / "p.yaml"
    profile.write_text("my: notes\n")
    with pytest.raises(MoespeqError, match="not a hardware profile appeared"):
        atomic_write_text(profile, "name: x\n", own=PROFILE)
    assert profile.read_text() == "my: notes\n" and not list(tmp_path.glob(".p.yaml*"))
    profile.write_text("")
    atomic_write_text(profile, "name: x\n", own=PROFILE)
    assert profile.read_text() == "name: x\n"


def test_an_output_name_too_long_is_a_usage_error(cli, ckpt, tmp_path):
    long = tmp_path / ("a" * 300 + ".json")
    one_line_error(run(cli, ckpt, "--backend", "mock", "--trace", str(long)), 2, "--trace", "too long")
    one_line_error(cli("calibrate", "--out", str(tmp_path / ("a" * 300 + ".yaml"))), 2, "--out", "too long")
    one_line_error(cli("quantize", str(ckpt), "--out", str(tmp_path / ("a" * 300))), 2, "--out", "too long")


# -- 2. nothing hangs and nothing eats the machine --------------------------------


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
def test_a_fifo_in_the_checkpoint_never_blocks(cli, ckpt, name):
    (ckpt / name).unlink(missing_ok=True)
    os.mkfifo(ckpt / name)
    one_line_error(run(cli, ckpt), 1, name, "FIFO")


TEMPLATE_BOMBS = [
    "{{ 'A' * 2000000000 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'A'|center(2000000000) }}",
    "{{ 'A'.ljust(2000000000) }}",
    "{{ 9 ** 999999999 }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '{:999999999}'.format(1) }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% set ns = namespace(s='x' * 999999) %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f('x' * 999999, 40) }}",
    "{% for i in range(100000) %}{{ 'x' * 999999 }}{% endfor %}",
    # a list's repetition weighs what it renders to, not its items; tojson's output is
    # bounded before json's C encoder (past the time limit's checks) writes it
    "{{ ['x' * 999999] * 1000000 }}",
    "{{ [1, 2] | tojson(separators=('x' * 999999, ':')) }}",
    "{{ [1, 2] | tojson(indent='x' * 999999) }}",
    "{{ (['x' * 99999] * 9) | tojson(indent=64) * 1 }}{{ range(999) | list | tojson(separators=('x' * 60, ':')) }}",
]


@pytest.mark.parametrize("template", TEMPLATE_BOMBS)
def test_chat_template_bombs_fail_fast(cli, ckpt, template):
    edit_json(ckpt / "tokenizer_config.json", chat_template=template)
    t0 = time.monotonic()
    one_line_error(run(cli, ckpt, "--chat"), 1, "chat template", "tokenizer_config.json")
    assert time.monotonic() - t0 < GUARD_S  # the alarm would fire first; this names the case


def test_a_well_behaved_chat_template_still_renders(cli, ckpt):
    edit_json(
        ckpt / "tokenizer_config.json",
        chat_template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}",
    )
    r = run(cli, ckpt, "--chat", "--json")
    assert r.exit_code == 0, r.stderr
    ids = json.loads(r.stdout)["prompt_token_ids"]
    assert len(ids) == len(b"<user>hello world<assistant>")


PROFILE = {
    "name": "x",
    "description": "x",
    "device_memory": "1GB",
    "reserved_memory": 0,
    "link_bandwidth": 1e9,
    "link_latency": 1e-5,
    "peak_flops": 1e12,
    "mem_bandwidth": 1e11,
    "launch_overhead": 1e-6,
    "host_flops": 1e11,
    "host_mem_bandwidth": 1e10,
    "host_op_overhead": 1e-6,
}


def write_profile(path: Path, **changes) -> Path:
    lines = [f"{k}: {v}" for k, v in {**PROFILE, **changes}.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "field,value",
    [
        ("link_bandwidth", ".nan"),
        ("peak_flops", ".inf"),
        ("mem_bandwidth", "-.inf"),
        ("link_latency", "0"),
        ("host_flops", "-5"),
        ("device_memory", "1e400GB"),
        ("launch_overhead", "[1, 2]"),
    ],
)
def test_profile_figures_must_be_finite_and_positive(cli, tmp_path, field, value):
    p = write_profile(tmp_path / "hw.yaml", **{field: value})
    one_line_error(cli("plan", "mixtral", "--hardware", str(p)), 2, str(p), field)


def test_profile_alias_bomb_is_refused(cli, tmp_path):
    p = tmp_path / "bomb.yaml"
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    rows += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    p.write_text("\n".join(rows) + "\n")
    one_line_error(cli("plan", "mixtral", "--hardware", str(p)), 2, str(p), "alias")


@pytest.mark.parametrize("content", [b"\xff\xfe\x00bad", b"name: \xc3\x28\n"])
def test_profile_that_is_not_utf8(cli, tmp_path, content):
    p = tmp_path / "hw.yaml"
    p.write_bytes(content)
    one_line_error(cli("plan", "mixtral", "--hardware", str(p)), 2, str(p), "UTF-8")


def test_profile_fifo(cli, tmp_path):
    p = tmp_path / "hw.yaml"
    os.mkfifo(p)
    one_line_error(cli("plan", "mixtral", "--hardware", str(p)), 2, str(p), "FIFO")


def test_a_prompt_file_s_byte_order_mark_is_not_prompt_text(tmp_path):
    """Notepad's UTF-8 files begin with one: piped, or through a FIFO, it was dropped, but a
    --prompt-file kept it (a token of its own before the text)."""
    from moespeq_cli.cli.run import read_prompt

    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfHi there")
    assert read_prompt(None, bom, "default") == "Hi there"


def test_prompt_file_too_large(cli, ckpt, tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(17 * 2**20)  # sparse: no disk used
    one_line_error(cli("run", str(ckpt), "--prompt-file", str(big)), 2, "--prompt-file", "limit")


def test_a_prompt_file_that_is_a_pipe_is_read_to_its_end(cli, ckpt, tmp_path, moespeq_process, monkeypatch):
    """`--prompt-file <(...)` (a pipe the shell opened: llama.cpp users write `-f <(...)`)
    is read; a FIFO nobody writes to is a usage error after a wait, never a hang."""
    cmd = " ".join(moespeq("run", str(ckpt), "-n", "2", "--backend", "cpu", "--json"))
    r = subprocess.run(
        ["bash", "-c", f"{cmd} --prompt-file <(printf 'hi there')"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and len(json.loads(r.stdout)["prompt_token_ids"]) == len("hi there"), r.stderr
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    from moespeq_cli.cli import run

    monkeypatch.setattr(run, "STDIN_WAIT_S", 0.2)
    one_line_error(cli("run", str(ckpt), "--prompt-file", str(fifo)), 2, "nothing came within 0.2 s")


@pytest.mark.parametrize("special", ["/dev/zero", "dir"])
def test_prompt_file_that_is_not_a_file(cli, ckpt, tmp_path, special):
    if special == "dir":
        path = tmp_path
    else:
        path = Path(special)
        if not path.exists():
            pytest.skip("no /dev/zero")
    one_line_error(cli("run", str(ckpt), "--prompt-file", str(path)), 2, "--prompt-file", "not a regular file")


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_hidden_layers", 10**9),
        ("hidden_size", 10**12),
        ("vocab_size", 2**40),
        ("num_local_experts", 10**7),
    ],
)
def test_absurd_sizes_are_refused_from_arithmetic(cli, ckpt, field, value):
    edit_json(ckpt / "config.json", **{field: value})
    one_line_error(run(cli, ckpt), 1, "config.json", field)
    one_line_error(cli("plan", str(ckpt)), 1, "config.json", field)


def test_absurd_product_of_sane_sizes(cli, ckpt):
    edit_json(
        ckpt / "config.json",
        num_hidden_layers=1024,
        hidden_size=2**17,
        intermediate_size=2**18,
        num_local_experts=2**14,
        num_attention_heads=64,
        num_key_value_heads=8,
    )
    one_line_error(cli("plan", str(ckpt)), 1, "config.json", "parameters")


# -- 3. context length --------------------------------------------------------------


def fail_if_weights_load(monkeypatch):
    from moespeq_cli.runtime import engine

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the context check")

    monkeypatch.setattr(engine.Engine, "load", refuse)


@pytest.mark.parametrize("backend", ["cpu", "mock"])
def test_prompt_plus_new_tokens_beyond_the_model(cli, ckpt, monkeypatch, backend):
    fail_if_weights_load(monkeypatch)  # tiny models: max_position_embeddings 256
    line = one_line_error(
        cli("run", str(ckpt), "-p", "hello world", "-n", "300", "--backend", backend), 2, "256", "311"
    )
    assert "--max-new-tokens" in line


def test_a_prompt_longer_than_the_context(cli, ckpt, monkeypatch, tmp_path):
    fail_if_weights_load(monkeypatch)
    p = tmp_path / "long.txt"
    p.write_text("x" * 400)
    one_line_error(cli("run", str(ckpt), "--prompt-file", str(p), "-n", "1", "--backend", "cpu"), 2, "400", "256")


def test_context_option(cli, ckpt, monkeypatch):
    one_line_error(run(cli, ckpt, "--context", "1000"), 2, "--context 1000", "256")
    one_line_error(run(cli, ckpt, "--context", "8"), 2, "--context 8", "--max-new-tokens")
    r = run(cli, ckpt, "--context", "200", "--backend", "mock", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["plan"]["context_tokens"] == 200
    one_line_error(cli("plan", str(ckpt), "--context", "100000"), 2, "--context 100000", "256")
    one_line_error(cli("bench", str(ckpt), "-p", "hi", "-n", "400"), 2, "256")


# -- 4. checkpoint paths are confined ---------------------------------------------


SHARD = "model-00001-of-00001.safetensors"


def write_index(ckpt: Path, target=SHARD) -> None:
    """An index sending every tensor to ``target``; model.safetensors becomes the shard
    (where it is, it is read and any index ignored, as transformers does)."""
    from safetensors import safe_open

    (ckpt / "model.safetensors").rename(ckpt / SHARD)
    with safe_open(str(ckpt / SHARD), framework="pt") as f:
        keys = list(f.keys())
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: target for k in keys}}))


@pytest.mark.parametrize(
    "target", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors", "", "..\\x.safetensors", 7]
)
def test_index_names_outside_the_checkpoint(cli, ckpt, tmp_path, target):
    (tmp_path / "outside.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    write_index(ckpt, target)
    one_line_error(run(cli, ckpt), 1, "model.safetensors.index.json", "corrupt")


@pytest.mark.parametrize("weight_map", [["a", "b"], {"x": 5}, "model.safetensors", {}])
def test_index_weight_map_of_the_wrong_shape(cli, ckpt, weight_map):
    write_index(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    one_line_error(run(cli, ckpt), 1, "model.safetensors.index.json")


def test_hub_cache_symlinks_keep_working(cli, ckpt, tmp_path):
    """The hub cache's layout: snapshots/<sha>/<file> -> ../../blobs/<hash>."""
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in ckpt.iterdir():
        blob = blobs / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    write_index(snap)
    r = run(cli, snap, "--json")
    assert r.exit_code == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 4


def test_a_single_file_wins_over_an_index(cli, ckpt):
    """model.safetensors beside a sharded index: transformers loads the single file, and
    so does moespeq (it read the index's shards, other weights, without a word)."""
    import torch
    from safetensors.torch import load_file, save_file

    single = run(cli, ckpt, "--json")
    write_index(ckpt)
    sharded = load_file(ckpt / SHARD)
    save_file({k: torch.randn_like(v) for k, v in sharded.items()}, ckpt / SHARD)  # other weights
    tokens = json.loads(single.stdout)["token_ids"]
    assert json.loads(run(cli, ckpt, "--json").stdout)["token_ids"] != tokens  # the index's shard is read
    save_file(sharded, ckpt / "model.safetensors")  # the original weights beside the index
    assert json.loads(run(cli, ckpt, "--json").stdout)["token_ids"] == tokens


@pytest.mark.parametrize("trap", ["loop", "dir", "dangling"])
def test_symlink_loops_and_directories_in_place_of_files(cli, ckpt, trap):
    f = ckpt / "model.safetensors"
    f.unlink()
    if trap == "loop":
        f.symlink_to("model.safetensors")
    elif trap == "dir":
        f.mkdir()
    else:
        f.symlink_to("nowhere.safetensors")
    one_line_error(run(cli, ckpt), 1, "model.safetensors")


def test_index_shard_that_is_a_directory(cli, ckpt):
    (ckpt / "shard").mkdir()
    write_index(ckpt, "shard")
    one_line_error(run(cli, ckpt), 1, "shard", "directory")


# -- 5. no generic "internal error" for bad input ---------------------------------


BAD_CONFIGS = [
    ("num_attention_heads", 0),
    ("hidden_size", 0),
    ("model_type", ["mixtral"]),
    ("model_type", 5),
    ("num_experts_per_tok", 9),
    ("num_experts_per_tok", 0),
    ("rms_norm_eps", "tiny"),
    ("rms_norm_eps", -1.0),
    ("eos_token_id", "</s>"),
    ("eos_token_id", [2, "x"]),
    ("num_key_value_heads", 4),
    ("hidden_size", 50),
    ("rope_theta", "big"),
    ("rope_scaling", "linear"),
    ("rope_scaling", {"type": "linear", "factor": "two"}),
    ("tie_word_embeddings", "yes"),
    ("max_position_embeddings", -1),
    ("num_hidden_layers", 2.5),
    ("torch_dtype", 16),
    ("sliding_window", "wide"),
    ("head_dim", 7),
    ("clip_qkv", 1e300),
    ("rope_theta", 0.5),
]


@pytest.mark.parametrize("field,value", BAD_CONFIGS)
def test_bad_config_fields_name_the_field(cli, ckpt, field, value):
    edit_json(ckpt / "config.json", **{field: value})
    line = one_line_error(run(cli, ckpt), 1, "config.json")
    assert field in line and "internal error" not in line


@pytest.mark.parametrize(
    "file,changes,needle",
    [
        ("generation_config.json", {"eos_token_id": "end"}, "eos_token_id"),
        ("generation_config.json", {"eos_token_id": [1.5]}, "eos_token_id"),
        ("tokenizer_config.json", {"chat_template": 42}, "chat_template"),
        ("tokenizer_config.json", {"chat_template": [{"template": "x"}]}, "chat_template"),
        ("tokenizer_config.json", {"eos_token": 7}, "eos_token"),
    ],
)
def test_bad_tokenizer_and_generation_files(cli, ckpt, file, changes, needle):
    edit_json(ckpt / file, **changes)
    one_line_error(run(cli, ckpt), 1, file, needle)


@pytest.mark.parametrize("content", [b"[1, 2]", b"\xff\xfe", b"{" * 100000, b""])
def test_config_that_is_not_a_json_object(cli, ckpt, content):
    (ckpt / "config.json").write_bytes(content)
    one_line_error(run(cli, ckpt), 1, "config.json")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--temperature", "1", "--top-p", "nan"], "nan is not a number from 0 to 1"),
        (["--temperature", "nan"], "nan is not a number from 0 to 100"),  # (typer: "less than or equal to 100")
        (["--temperature", "inf"], "--temperature"),
        (["--temperature", "warm"], "'warm' is not a number"),
        (["--temperature", "1e300"], "--temperature"),  # (1e-30 is greedy: below 0.0001)
        (["--seed", str(2**70)], "--seed"),
        (["--top-k", "-1"], "--top-k"),
        (["--cpu-threads", "100000"], "--cpu-threads"),
        (["--spec-depth", "many"], "--spec-depth"),
        (["--dtype", "int3"], "dtype"),
        (["--policy", "fastest"], "policy"),
    ],
)
def test_bad_options(cli, ckpt, args, needle):
    one_line_error(cli("run", str(ckpt), "-p", "hi", "-n", "2", *args), 2, needle)


@pytest.mark.parametrize("vram", ["1e30GB", "99999999999999999999999TB", "0GB", "-1GB", "nanGB", "12XB"])
def test_vram_sizes(cli, ckpt, vram):
    one_line_error(cli("run", str(ckpt), "-p", "hi", "-n", "2", "--backend", "mock", "--vram", vram), 2, "--vram")
    one_line_error(cli("plan", "mixtral", "--vram", vram), 2, "--vram")


def test_a_size_below_one_byte_is_no_amount():
    """--ram 0.5B was read as 0 bytes and refused as "--ram 0 B cannot hold 2 expert
    slots", where --ram 0 says it must be a positive amount: both say the latter."""
    from moespeq_cli.errors import UsageError
    from moespeq_cli.runtime.planning.hardware import parse_size

    for text in ("0.5B", "0", "0.9B"):
        with pytest.raises(UsageError, match="must be a positive amount"):
            parse_size(text, "--ram")
    assert parse_size("1B", "--ram") == 1


@pytest.mark.parametrize("model", ["org/..", "../..", "org/.hidden", "a/b/c", "org/name--x", "org-/name"])
def test_pull_refuses_ids_that_are_not_hub_ids(cli, model, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing may be asked of a hub
    one_line_error(cli("pull", model), 2, model)


@pytest.fixture
def saved_draft(cli, ckpt, tmp_path):
    out = tmp_path / "draft"
    assert cli("quantize", str(ckpt), "--out", str(out)).exit_code == 0
    return out


def forge(draft: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = draft / "draft.safetensors"
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "moespeq-draft"})


@pytest.mark.parametrize(
    "edit",
    [
        lambda sd: sd.pop("layers.1.experts.2.up.qweight"),
        lambda sd: sd.pop("layers.0.experts.0.gate.absmax"),
        lambda sd: sd.update({"layers.0.experts.1.down.qweight": sd["layers.0.experts.1.down.qweight"][:-4]}),
        lambda sd: sd.update({"layers.0.experts.3.gate.absmax": sd["layers.0.experts.3.gate.absmax"][:1]}),
    ],
    ids=["missing-weight", "missing-state", "short-weight", "short-absmax"],
)
def test_forged_drafts_are_refused(cli, ckpt, saved_draft, edit):
    forge(saved_draft, edit)
    r = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--backend", "mock", "--draft", str(saved_draft))
    one_line_error(r, 1, "draft", "rebuild")


@pytest.mark.parametrize("manifest", [{"method": "nf3"}, {"blocksize": 7}, {"format": "other"}])
def test_forged_draft_manifests(cli, ckpt, saved_draft, manifest):
    edit_json(saved_draft / "manifest.json", **manifest)
    r = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--backend", "mock", "--draft", str(saved_draft))
    one_line_error(r, 1, str(saved_draft))


def test_draft_path_that_is_a_file(cli, ckpt, tmp_path):
    f = tmp_path / "draft.txt"
    f.write_text("x")
    r = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--backend", "mock", "--draft", str(f))
    one_line_error(r, 2, "--draft", str(f))


# -- 6. signals, pipes and standard input (real processes) ------------------------


def moespeq(*args: str) -> list[str]:
    return [sys.executable, "-m", "moespeq_cli", *args]


@pytest.fixture
def moespeq_process():
    """Marks a case that runs moespeq as a real process (see hang_guard)."""
    return moespeq


def test_standard_input_is_the_prompt(ckpt, moespeq_process):
    for args in ([], ["--prompt-file", "-"]):
        r = subprocess.run(
            moespeq("run", str(ckpt), "-n", "2", "--backend", "cpu", "--json", *args),
            input="hi there",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert len(json.loads(r.stdout)["prompt_token_ids"]) == len("hi there")


def test_blank_standard_input_is_refused_and_plan_reads_it_as_run(ckpt, moespeq_process):
    """Piped blank lines are an empty prompt (as -p ""), not the default prompt; plan
    plans for the piped prompt, as run runs it."""
    r = subprocess.run(moespeq("run", str(ckpt), "-n", "2"), input="\n\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "blank" in r.stderr and "Traceback" not in r.stderr
    args = ("-n", "8", "--backend", "cpu", "--json")
    ran = subprocess.run(moespeq("run", str(ckpt), *args), input="hi there", capture_output=True, text=True, timeout=60)
    planned = subprocess.run(
        moespeq("plan", str(ckpt), "-n", "8", "--json"), input="hi there", capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0 and planned.returncode == 0, (ran.stderr, planned.stderr)
    assert json.loads(planned.stdout)["context_tokens"] == len(json.loads(ran.stdout)["prompt_token_ids"]) + 8


def test_offloading_options_the_plain_cpu_run_ignores_are_named(cli, ckpt):
    """--backend cpu with every expert in RAM decodes from memory: a --policy or
    --spec-depth given then says, in one note, that it does nothing and when it would."""
    r = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--backend", "cpu", "--draft", "none", "--policy", "lru")
    assert r.exit_code == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--policy lru and --draft none take effect with --ram" in notes[0]
    r = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--backend", "cpu", "--spec-depth", "4")
    assert r.exit_code == 0 and "--spec-depth 4 takes effect with --ram" in r.stderr, r.stderr
    # resident is what runs (no note); hybrid is refused whatever --ram is (not a note that --ram would help)
    r = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--backend", "cpu", "--policy", "resident")
    assert r.exit_code == 0 and "note:" not in r.stderr, r.stderr
    r = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--backend", "cpu", "--policy", "hybrid")
    assert r.exit_code == 2 and "policy hybrid computes experts on the CPU beside a GPU" in r.stderr, r.stderr
    # a depth no run could honour is refused, whatever the backend: lru has no draft, nor does --draft none
    for extra in (("--policy", "lru"), ("--draft", "none")):
        r = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--spec-depth", "4", *extra)
        assert r.exit_code == 2 and "--spec-depth" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--spec-depth", "4", "--policy", "bogus")  # the policy said first
    assert r.exit_code == 2 and "unknown policy 'bogus'" in r.stderr, r.stderr
    r = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--policy", "lru", "--draft", str(ckpt))
    assert r.exit_code == 2 and "only --policy moespeq runs" in r.stderr, r.stderr
    r = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--draft", str(ckpt))  # a directory, not a draft: usage
    assert r.exit_code == 2 and "is not a draft directory" in r.stderr, r.stderr
    plain = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--backend", "cpu")
    assert plain.exit_code == 0 and "note:" not in plain.stderr
    # --json says it too (governor_note was null: why speculation is off went unsaid)
    for extra, words in ((("--spec-depth", "3"), "--spec-depth 3 takes effect"), ((), "every expert fits in RAM")):
        r = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--backend", "cpu", "--json", *extra)
        assert words in json.loads(r.stdout)["governor_note"], r.stdout
    assert plain.stderr.count("every expert fits") == 0
    r = cli("run", str(ckpt), "-p", "hi", "-n", "2", "--backend", "cpu", "--spec-depth", "3")
    assert r.stderr.count("--spec-depth 3 takes effect") == 1, r.stderr


def test_a_closed_pipe_exits_quietly(moespeq_process):
    p = subprocess.Popen(
        moespeq("run", "--backend", "cpu", "-n", "200"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.read(20)  # like `| head -c 20`: read a little, then leave
    p.stdout.close()
    code = p.wait(timeout=60)
    err = p.stderr.read().decode()
    p.stderr.close()
    assert code in (0, 141, -signal.SIGPIPE), err
    assert "Traceback" not in err and "Exception" not in err and "error" not in err


def test_ctrl_c_prints_interrupted_with_partial_statistics(moespeq_process):
    p = subprocess.Popen(
        moespeq("run", "--backend", "cpu", "-n", "900"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdout.read(120)  # past the echoed demo prompt: tokens are streaming
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1] == "moespeq: error: interrupted" and "Traceback" not in err
    assert "tokens in" in lines[-2]  # the statistics of what was generated


def test_ctrl_c_with_json_prints_the_partial_result(cli, ckpt, monkeypatch):
    stop_generation_after(monkeypatch, 3)
    r = run(cli, ckpt, "--json", "-n", "10")
    assert r.exit_code == 130 and r.stderr.strip().splitlines()[-1] == "moespeq: error: interrupted"
    result = json.loads(r.stdout)
    assert result["interrupted"] and len(result["token_ids"]) == result["stats"]["new_tokens"] == 3


def test_ctrl_c_writes_the_trace_of_what_ran(cli, ckpt, monkeypatch, tmp_path):
    """`run --trace` stopped by Ctrl-C wrote no trace (profile's files neither): the trace of
    the tokens generated is written, with the partial result and the interruption."""
    stop_generation_after(monkeypatch, 3)
    for json_out in (["--json"], []):
        trace = tmp_path / f"t{len(json_out)}.json"
        r = run(cli, ckpt, *json_out, "-n", "10", "--backend", "mock", "--trace", str(trace))
        assert r.exit_code == 130 and r.stderr.strip().splitlines()[-1] == "moespeq: error: interrupted"
        assert json.loads(trace.read_text())["traceEvents"], json_out
        if json_out:
            assert json.loads(r.stdout)["trace"] == str(trace)


@pytest.mark.parametrize("signum, code, word", [(15, 143, "terminated"), (1, 129, "hung up")])
def test_sigterm_and_sighup_print_the_partial_result_too(cli, ckpt, monkeypatch, signum, code, word):
    """`timeout 60 moespeq run --json`: SIGTERM printed nothing of what was generated, where
    Ctrl-C prints it; SIGHUP (a closed terminal) ended the process where it stood."""
    from moespeq_cli.errors import Terminated

    stop_generation_after(monkeypatch, 3, Terminated(signum))
    r = run(cli, ckpt, "--json", "-n", "10")
    assert r.exit_code == code and r.stderr.strip().splitlines()[-1].startswith(f"moespeq: error: {word}")
    result = json.loads(r.stdout)
    assert result["interrupted"] and result["finish_reason"] == "interrupted" and len(result["token_ids"]) == 3


def test_a_hangup_whose_terminal_is_gone_still_exits_129(cli, ckpt, monkeypatch):
    """After SIGHUP the terminal may be gone: writing the partial result there failed
    (EIO) and that error replaced the signal's exit code."""
    import io

    from moespeq_cli.errors import Terminated
    from moespeq_cli.runtime.engine import Engine

    generate = Engine.generate

    def hung_up(self, *args, **kwargs):
        for ev in generate(self, *args, **kwargs):
            yield ev
            if ev.index == 1:
                raise Terminated(1)

    from moespeq_cli.cli.errors import GuardedOutput

    class Closed(io.StringIO):
        def write(self, text):
            raise OSError(5, "Input/output error")

    gone = GuardedOutput(Closed())  # (stdout as moespeq wraps it, over a terminal that is gone)
    monkeypatch.setattr(Engine, "generate", hung_up)
    monkeypatch.setattr(GuardedOutput, "write", lambda self, text: gone._call("write", text))
    r = run(cli, ckpt, "--json", "-n", "10")
    assert r.exit_code == 129, r.stderr


def test_sighup_cleans_up_and_exits_129(moespeq_process, tmp_path):
    """A closed terminal (SIGHUP) killed quantize where it stood, leaving its temporary
    draft (gigabytes for a real model) beside the checkpoint: cleaned up as for SIGTERM."""
    out = tmp_path / "draft"
    p = subprocess.Popen(
        moespeq("quantize", "demo", "--out", str(out)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not list(tmp_path.glob(".draft.tmp-*/draft.safetensors")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)  # (writing the draft: not the probe that says the directory can be written)
    p.send_signal(signal.SIGHUP)
    _, err = p.communicate(timeout=60)
    if p.returncode == 0:  # (it finished before the signal came: nothing to clean)
        pytest.skip("quantize ended before the signal")
    assert p.returncode == 129 and err.strip().splitlines()[-1] == "moespeq: error: hung up (its terminal closed)"
    assert not list(tmp_path.glob(".draft.tmp-*"))  # (the draft: not there, or whole where it came after the rename)
    assert not out.exists() or (out / "manifest.json").is_file()


def test_a_signal_in_a_finalizer_is_raised_after_it():
    """A Ctrl-C that lands in a ``__del__`` (the garbage collector runs them anywhere: the
    disk tier's PageMapping) was printed as "Exception ignored" and lost, and `bench` ran
    on to its end: raised once the finalizer is done."""
    from moespeq_cli.cli.signals import Signals

    class Slow:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(20):
                time.sleep(0.005)  # the handler runs here, inside the finalizer

    signals = Signals()
    raised = False
    try:
        x = Slow()
        del x
        deadline = time.time() + 10
        while time.time() < deadline:
            time.sleep(0.01)
    except KeyboardInterrupt:
        raised = True
    finally:
        signals.restore()
    assert raised


def test_a_second_ctrl_c_does_not_cut_the_first_one_s_cleanup_short(capfd):
    """Two Ctrl-C close together on a disk-tier run: the second landed in the first one's
    cleanup (reads in flight landing) and the run ended on an internal error without its
    result (QA: 23 of 42 tries), once hung. The second is said and the cleanup goes on;
    a command that goes on after a Ctrl-C (chat) makes the next one interrupt again."""
    from moespeq_cli.cli.signals import Signals, interrupt_handled

    signals = Signals()
    cleaned = []
    try:
        with pytest.raises(KeyboardInterrupt):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGINT)  # pressed again during the cleanup
                time.sleep(0.05)
                cleaned.append(True)
        assert cleaned and "(stopping; Ctrl-C again to quit at once)" in capfd.readouterr().err
        interrupt_handled()
        with pytest.raises(KeyboardInterrupt):  # the next one interrupts again
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        signals.restore()


def test_ctrl_c_ends_a_chat_read_from_a_pipe(cli, ckpt, monkeypatch):
    """Piped in, each Ctrl-C stopped one answer and the chat went on through the file (it
    looked hung); now the answer's record is written, then the chat ends (exit 130)."""
    from moespeq_cli.runtime.engine import Engine

    generate = Engine.generate

    def interrupted(self, *args, **kwargs):
        for ev in generate(self, *args, **kwargs):
            yield ev
            raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "generate", interrupted)
    from typer.testing import CliRunner

    from moespeq_cli.cli.app import app

    r = CliRunner().invoke(app, ["chat", str(ckpt), "--json", "-n", "4"], input="one\ntwo\nthree\n")
    assert r.exit_code == 130, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 1 and records[0]["interrupted"] and records[0]["finish_reason"] == "interrupted"


# -- found by trying it as a hostile user would (second round) ---------------------


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 4.0},
        {"rope_type": "linear"},
        {"rope_type": "longrope", "original_max_position_embeddings": 64, "long_factor": [1.0], "short_factor": [1.0]},
        {"rope_type": "longrope", "original_max_position_embeddings": 64},
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e-300},
    ],
)
def test_rope_parameters_the_rotary_code_cannot_use(cli, ckpt, rope):
    edit_json(ckpt / "config.json", rope_parameters={"rope_theta": 10000.0, **rope}, rope_scaling=None)
    one_line_error(run(cli, ckpt), 1, "config.json", "rope")
    one_line_error(cli("plan", str(ckpt)), 1, "config.json", "rope")


@pytest.mark.parametrize(
    "family,variant,changes",
    [
        ("qwen2_moe", "shared", {"mlp_only_layers": [0, 1]}),
        ("qwen2_moe", "shared", {"decoder_sparse_step": 100}),
        ("deepseek_v2", "lite", {"first_k_dense_replace": 50}),
    ],
)
def test_a_config_with_no_moe_layer(cli, tiny, tmp_path, family, variant, changes):
    src, _ = tiny(family, variant)
    path = tmp_path / "dense"
    shutil.copytree(src, path)
    edit_json(path / "config.json", **changes)
    one_line_error(cli("plan", str(path)), 1, "config.json", "no Mixture-of-Experts layer")


def test_json_integer_too_long_to_read(cli, ckpt):
    text = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text(text.replace('"hidden_size": 48', '"hidden_size": ' + "9" * 5000))
    one_line_error(run(cli, ckpt), 1, "config.json")


def test_unknown_router_method(cli, tiny, tmp_path):
    src, _ = tiny("deepseek_v2", "lite")
    path = tmp_path / "ds"
    shutil.copytree(src, path)
    edit_json(path / "config.json", topk_method="noaux_tc")
    one_line_error(cli("plan", str(path)), 1, "topk_method")


def tokenizer_with(ckpt: Path, edit) -> None:
    data = json.loads((ckpt / "tokenizer.json").read_text())
    edit(data)
    (ckpt / "tokenizer.json").write_text(json.dumps(data))


def test_tokenizer_that_cannot_encode(cli, ckpt):
    def wordpiece_without_unk(d):
        d["model"] = {
            "type": "WordPiece",
            "vocab": {"a": 0},
            "unk_token": "[UNK]",
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
        }
        d["pre_tokenizer"] = None
        d["decoder"] = None

    tokenizer_with(ckpt, wordpiece_without_unk)
    one_line_error(run(cli, ckpt), 1, "tokenizer.json", "cannot encode")


def test_tokenizer_normalizer_that_explodes_the_prompt(cli, ckpt):
    def explode(d):
        d["normalizer"] = {"type": "Replace", "pattern": {"String": "h"}, "content": "h" * 100000}

    tokenizer_with(ckpt, explode)
    r = cli("run", str(ckpt), "--prompt", "h" * 40, "-n", "4", "--backend", "cpu")
    one_line_error(r, 1, "tokenizer.json", "normalizer")


@pytest.mark.parametrize("what", ["nan-expert", "nan-embedding", "int-expert", "bool-weight"])
def test_corrupt_weight_values_and_types(cli, ckpt, what):
    import torch
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    sd = load_file(f)
    expert = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    if what == "nan-expert":
        sd[expert] = torch.full_like(sd[expert], float("nan"))
    elif what == "nan-embedding":
        sd["model.embed_tokens.weight"] = torch.full_like(sd["model.embed_tokens.weight"], float("nan"))
    elif what == "int-expert":
        sd[expert] = sd[expert].to(torch.int64)
    else:
        sd["model.norm.weight"] = sd["model.norm.weight"] > 0
    save_file(sd, f, metadata={"format": "pt"})
    needle = "NaN" if what.startswith("nan") else "floating-point"
    one_line_error(run(cli, ckpt, "--backend", "mock", "-n", "8"), 1, needle)


@pytest.mark.parametrize("top_p", ["1e-300", "0"])
def test_top_p_tiny_keeps_the_most_likely_token(cli, ckpt, top_p):
    a = run(cli, ckpt, "--temperature", "1", "--top-p", top_p, "--seed", "3", "--json")
    b = run(cli, ckpt, "--json")
    assert a.exit_code == 0, a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]  # nucleus of one = greedy


@pytest.mark.parametrize(
    "field,value",
    [("link_bandwidth", "5e-324"), ("peak_flops", "1e-3"), ("launch_overhead", "1e6"), ("host_flops", "1e30")],
)
def test_profile_figures_outside_a_plausible_range(cli, tmp_path, field, value):
    p = write_profile(tmp_path / "hw.yaml", **{field: value})
    one_line_error(cli("plan", "mixtral", "--hardware", str(p)), 2, str(p), field)


def test_profile_integer_too_long_to_read(cli, tmp_path):
    p = write_profile(tmp_path / "hw.yaml", host_flops="9" * 5000)
    one_line_error(cli("plan", "mixtral", "--hardware", str(p)), 2, str(p))


def test_quantize_out_through_a_symlink(cli, ckpt, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    for _ in range(2):  # first into the empty directory, then replacing its own draft
        r = cli("quantize", str(ckpt), "--out", str(link))
        assert r.exit_code == 0, r.stderr
    assert link.is_symlink() and (real / "manifest.json").is_file()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_outputs_where_nothing_can_be_written(cli, ckpt):
    one_line_error(cli("quantize", str(ckpt), "--out", "/proc/moespeq-draft"), 2, "/proc/moespeq-draft")
    one_line_error(
        run(cli, ckpt, "--backend", "mock", "--trace", "/proc/trace.json"), 2, "--trace", "takes no new files"
    )


def test_trace_with_the_cpu_backend_is_refused_before_work(cli, ckpt, tmp_path):
    r = run(cli, ckpt, "--trace", str(tmp_path / "t.json"))
    one_line_error(r, 2, "--trace", "cpu")


def test_files_named_like_our_temporaries_are_left_alone(cli, ckpt, tmp_path):
    out = tmp_path / "t.json"
    theirs = [tmp_path / ".t.json.999999999.tmp", tmp_path / ".t.json.1.tmp"]
    for f in theirs:
        f.write_text("precious")
    assert run(cli, ckpt, "--backend", "mock", "--trace", str(out)).exit_code == 0
    assert out.is_file() and all(f.read_text() == "precious" for f in theirs)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".t.json")) == sorted(f.name for f in theirs)


def test_directories_named_like_draft_temporaries_are_left_alone(cli, ckpt, tmp_path):
    mine = [tmp_path / ".draft.tmp-12345", tmp_path / ".draft.old-777"]
    for d in mine:
        d.mkdir()
        (d / "mydata.txt").write_text("precious")
    assert cli("quantize", str(ckpt), "--out", str(tmp_path / "draft")).exit_code == 0
    assert all((d / "mydata.txt").read_text() == "precious" for d in mine)


def test_quantize_out_as_a_dangling_symlink(cli, ckpt, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere" / "x")
    one_line_error(cli("quantize", str(ckpt), "--out", str(link)), 2, "dangling")
    assert not (tmp_path / "nowhere").exists()


def test_quantize_refuses_nan_experts(cli, ckpt, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, f, metadata={"format": "pt"})
    one_line_error(cli("quantize", str(ckpt), "--out", str(tmp_path / "d")), 1, key, "NaN")
    assert not (tmp_path / "d").exists()


def test_bench_spec_depths_checked_before_any_run(cli, ckpt):
    one_line_error(cli("bench", str(ckpt), "-p", "hi", "-n", "2", "--spec-depths", "auto,x"), 2, "--spec-depths")


def test_empty_hardware_name(cli):
    one_line_error(cli("plan", "mixtral", "--hardware", ""), 2, "--hardware")


def test_a_home_directory_that_does_not_exist(cli):
    one_line_error(cli("run", "~no-such-user-here/ckpt"), 2, "~no-such-user-here/ckpt")


def test_pull_with_a_garbage_endpoint(cli, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "garbage")
    one_line_error(cli("pull", "org/name"), 2, "HF_ENDPOINT")


def test_a_tokenizer_that_panics_is_one_line(cli, ckpt):
    tokenizer_with(ckpt, lambda d: d.update(normalizer={"type": "Precompiled", "precompiled_charsmap": "bm90IGEgbWFw"}))
    line = one_line_error(run(cli, ckpt), 1, "tokenizer.json")
    assert "panicked" not in line


def test_tokenizer_truncation_and_padding_settings_are_ignored(cli, ckpt):
    def truncate_and_pad(d):
        d["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}
        d["padding"] = {
            "strategy": "BatchLongest",
            "direction": "Right",
            "pad_to_multiple_of": 10**9,
            "pad_id": 0,
            "pad_type_id": 0,
            "pad_token": "<pad>",
        }

    tokenizer_with(ckpt, truncate_and_pad)
    r = run(cli, ckpt, "--json")
    assert r.exit_code == 0, r.stderr
    assert len(json.loads(r.stdout)["prompt_token_ids"]) == len("hello world")


@pytest.mark.parametrize("when", ["reserving", "writing"])
def test_a_full_disk_while_writing_a_draft(cli, ckpt, tmp_path, monkeypatch, when):
    """A disk without room for the draft: refused when its size is reserved, before the
    second expert is quantized, or (a file system that cannot reserve) when a write
    fails; either way one line, and nothing left behind."""
    import errno

    from moespeq_cli.quant import draft, draft_file

    def full(*a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with open(tmp_path / "reserved", "wb") as fh:  # the real call, where the file system has it
        assert draft_file._fallocate(fh.fileno(), 1 << 20) in (0, errno.EOPNOTSUPP)

    quantized = []
    real = draft.quantized_experts

    def counted(*a, **k):
        for item in real(*a, **k):
            quantized.append(item[0])
            yield item

    monkeypatch.setattr(draft, "quantized_experts", counted)
    if when == "reserving":
        monkeypatch.setattr(draft_file, "_fallocate", lambda *a: errno.ENOSPC)
    else:
        monkeypatch.setattr(draft_file, "_fallocate", lambda *a: errno.EOPNOTSUPP)  # no reservation here
        calls = []
        real_write = draft_file._write_expert
        monkeypatch.setattr(
            draft_file, "_write_expert", lambda *a: full() if len(calls) > 2 else calls.append(real_write(*a))
        )
    out = tmp_path / "draft"
    one_line_error(cli("quantize", str(ckpt), "--out", str(out)), 1, "No space left", str(out))
    assert not out.exists() and not list(tmp_path.glob(".draft.tmp-*"))
    assert len(quantized) == (1 if when == "reserving" else 4)


def test_calibrate_replaces_only_a_hardware_profile(cli, ckpt, tmp_path):
    """--out naming a file that is not a profile, or a link to a checkpoint's config.json:
    refused before a minute of measuring, the file intact; a --disk-dir that does not
    exist is not made."""
    notes = tmp_path / "notes.yaml"
    notes.write_text("my: notes\n")
    link = tmp_path / "cfg.yaml"
    link.symlink_to(ckpt / "config.json")
    for target in (notes, link):
        before = target.read_bytes()
        one_line_error(cli("calibrate", "--out", str(target)), 2, "is not a hardware profile")
        assert target.read_bytes() == before
    one_line_error(
        cli("calibrate", "--out", str(tmp_path / "new.yaml"), "--disk-dir", str(tmp_path / "nodir")),
        2,
        "does not exist",
    )
    assert not (tmp_path / "nodir").exists() and not (tmp_path / "new.yaml").exists()
    from moespeq_cli.fs import holds_another_file
    from moespeq_cli.runtime.planning.hardware import PROFILE

    empty, older, blank = tmp_path / "empty.yaml", tmp_path / "older.yaml", tmp_path / "blank.yaml"  # replaced
    empty.write_text("")
    blank.write_text("\n  \n")
    older.write_text("name: mine\ndescription: x\ndevice_memory: 8GB\na_field_of_another_version: 1\n")
    for mine in (empty, blank, older, write_profile(tmp_path / "p.yaml")):
        assert not holds_another_file(mine, PROFILE), mine
    comments, nulls = tmp_path / "c.yaml", tmp_path / "n.yaml"
    comments.write_text("# TODO: my settings\n")
    nulls.write_text("---\n")
    for theirs in (notes, link.resolve(), comments, nulls):
        assert holds_another_file(theirs, PROFILE), theirs
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n# only comments\n")
    mine = tmp_path / "mine.yaml"
    mine.symlink_to(script)  # through a link: its target's name says what it is
    one_line_error(cli("calibrate", "--out", str(mine)), 2, "is not a hardware profile")
    assert script.read_text() == "#!/bin/sh\n# only comments\n"


def test_sigterm_cleans_up_as_ctrl_c_does(tmp_path):
    """`kill` (SIGTERM) during a calibration: exit 143 with one line, and its 256 MiB
    scratch file is removed (the process used to end where it stood)."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "moespeq_cli", "calibrate", "--out", str(tmp_path / "p.yaml")]
    p = subprocess.Popen([*cmd, "--disk-dir", str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".moespeq-calibrate-*")):
            assert p.poll() is None and time.time() < deadline, "no scratch file appeared"
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        err = p.stderr.read()
        assert p.wait(30) == 143 and err.strip().splitlines()[-1] == "moespeq: error: terminated", err
        assert "Traceback" not in err
        assert not list(tmp_path.glob(".moespeq-calibrate-*")) and not (tmp_path / "p.yaml").exists()
    finally:
        if p.poll() is None:
            p.kill()


def test_an_output_is_never_the_command_s_own_standard_stream(ckpt, tmp_path, moespeq_process):
    """`--trace /dev/stdout >> log` renamed the trace over log (the shell's file, reached
    through /proc/self/fd): the log's lines and the run's JSON were lost. An output that
    is a standard stream, or `-`, is refused before any work; the log is untouched."""
    log = tmp_path / "log.txt"
    log.write_text("precious line\n")
    run = " ".join(moespeq("run", str(ckpt), "-n", "2", "--backend", "mock", "-p", "hi", "--json"))
    for redirect in (">> log.txt", "2>> log.txt"):
        stream = "/dev/stdout" if redirect.startswith(">") else "/dev/stderr"
        r = subprocess.run(
            f"{run} --trace {stream} {redirect}", shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert (
            log.read_text().startswith("precious line\n") and "is this command's standard" in log.read_text() + r.stderr
        )
    r = subprocess.run(
        moespeq("run", str(ckpt), "-n", "2", "--trace", "-"), capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert r.returncode == 2 and "takes a file name" in r.stderr and not (tmp_path / "-").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a write-protected file")
def test_a_write_protected_output_is_refused(cli, tiny, tmp_path):
    path, _ = tiny("mixtral", "gqa")
    out = tmp_path / "t.json"
    out.write_text("precious")
    out.chmod(0o444)
    r = cli("run", str(path), "-n", "2", "--backend", "mock", "--trace", str(out))
    assert r.exit_code == 2 and "write-protected" in r.stderr and out.read_text() == "precious"


def test_broken_or_narrow_standard_streams(ckpt, moespeq_process):
    """A full disk behind stdout is one line, exit 1 (it was an "internal error"); a closed
    stderr leaves stdout's JSON whole (the error landed on stdout); an ASCII stdout gets
    the text with what it cannot show replaced (a crash mid-answer), and an ASCII locale's
    arguments are read as the UTF-8 they are."""
    run = [*moespeq("run", str(ckpt), "-n", "12", "--backend", "cpu", "-t", "100", "--seed", "1")]
    quoted = " ".join(run)
    r = subprocess.run(f"{quoted} -p hi > /dev/full", shell=True, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        "moespeq: error: cannot write to standard output"
    )
    r = subprocess.run(f"{quoted} -p hi --json 2>&-", shell=True, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["stats"]["new_tokens"] == 12
    # no stdout at all (`>&-`): one line and exit 1, as `echo hi >&-` (it was exit 0, nothing)
    r = subprocess.run(f"{quoted} -p hi --json >&-", shell=True, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "standard output (it is closed)" in r.stderr, (r.returncode, r.stderr)
    # a stderr that takes no writes (full, or open read-only): the answer and the exit code
    # stay (the loading line's failed write ended the run, "internal error", exit 1)
    for err in ("2>/dev/full", "2</dev/null"):
        r = subprocess.run(f"{quoted} -p hi {err}", shell=True, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip(), (err, r.returncode, r.stdout)
        bad = " ".join(moespeq("run", str(ckpt), "--vram", "abc"))
        assert subprocess.run(f"{bad} -p hi {err}", shell=True, capture_output=True, timeout=60).returncode == 2
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    r = subprocess.run([*run, "-p", "h\u00e9llo \u2014 caf\u00e9"], capture_output=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.isascii(), r.stderr
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    r = subprocess.run([*run, "-p", "h\u00e9llo", "--json"], capture_output=True, env=env, timeout=60)
    utf8 = subprocess.run([*run, "-p", "h\u00e9llo", "--json"], capture_output=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["prompt_token_ids"] == json.loads(utf8.stdout)["prompt_token_ids"]


def test_empty_standard_input(ckpt, tmp_path, moespeq_process):
    """`moespeq run < empty.txt` is an empty prompt file: a usage error (it ran the default
    prompt, exit 0); a pipe that closes without a byte runs the default and says so."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cmd = moespeq("run", str(ckpt), "-n", "2", "--backend", "cpu", "--json")
    with open(empty) as f:
        r = subprocess.run(cmd, stdin=f, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "standard input is an empty file" in r.stderr and not r.stdout
    r = subprocess.run(cmd, input="", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "standard input was empty: using the default prompt" in r.stderr


def test_a_cache_that_is_a_file_is_named_as_such(cli, tmp_path, monkeypatch):
    """$XDG_CACHE_HOME pointing at a file: `quantize` said its draft directory "exists and
    is unusable" and `calibrate` blamed an --out never given; both now name the cache."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(afile))
    one_line_error(cli("quantize"), 2, "($XDG_CACHE_HOME) is not a directory")
    r = cli("calibrate")
    one_line_error(r, 2, "moespeq's cache")
    assert "--out " not in r.stderr.split("(")[0]


@pytest.mark.parametrize("command", ["run", "plan", "quantize"])
def test_an_empty_model_name_is_not_the_current_directory(cli, command):
    one_line_error(cli(command, ""), 2, "MODEL is empty")


def test_locks_leave_nothing_and_calibrations_take_turns(cli, tiny, tmp_path, monkeypatch):
    """A draft's lock file is removed when the draft is written (one was left per output
    path ever quantized, beside the user's files where the cache was read-only); a second
    `calibrate` while one measures is refused (each measured the other's load)."""
    from moespeq_cli.cli.calibrate import calibrate_lock
    from moespeq_cli.fs import cache_dir, exclusive_lock

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path, _ = tiny("mixtral", "gqa")
    out = tmp_path / "o" / "d"
    out.parent.mkdir()
    assert cli("quantize", str(path), "--out", str(out)).exit_code == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["d"]
    assert not list((cache_dir() / "locks").glob("*.lock"))
    with exclusive_lock(calibrate_lock(), "calibrating"):
        r = cli("calibrate", "--out", str(tmp_path / "p.yaml"))
    one_line_error(r, 1, "another moespeq is calibrating this machine")
    assert not (tmp_path / "p.yaml").exists()
    # the lock is not in the cache: a cache that cannot be written does not stop a
    # calibration from measuring (here a stand-in that stops at once)
    from moespeq_cli.runtime.planning import calibrate

    def measured(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate, "calibrate", measured)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "o" / "d" / "manifest.json"))
    r = cli("calibrate", "--out", str(tmp_path / "p.yaml"), "--disk-dir", str(tmp_path))
    one_line_error(r, 130, "interrupted")


def test_calibrate_names_the_cache_it_times_the_disk_in(cli, tmp_path, monkeypatch):
    """Without --disk-dir the disk is timed in moespeq's cache: a cache that is a file was
    blamed on a --disk-dir never given."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(afile))
    r = cli("calibrate", "--out", str(tmp_path / "p.yaml"))
    one_line_error(r, 2, "moespeq's cache")
    assert not r.stderr.startswith("moespeq: error: --disk-dir") and not (tmp_path / "p.yaml").exists()


def test_ctrl_c_while_the_command_imports_is_one_line():
    """A Ctrl-C in moespeq's first 0.2 s (typer and rich importing) printed a Python
    traceback; one line and exit 130 now."""
    code = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'typer':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from moespeq_cli.entry import main\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stderr == "moespeq: error: interrupted\n", r.stderr


def test_version_into_a_closed_pipe_is_141_like_every_output():
    """`moespeq --version | true` exited 1 (typer's mapping of a closed pipe in an option's
    callback); 141 with nothing said, as `--help | true` and `run | head` are."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run(moespeq("--version"), stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)
    assert p.returncode == 141 and p.stderr == "", p.stderr


def test_nohup_keeps_moespeq_through_a_closed_terminal():
    """`nohup moespeq ...` starts with SIGHUP ignored: moespeq's handler replaced that, so
    a long quantize or a server stopped at logout. A signal ignored at start stays so."""
    code = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "from moespeq_cli.cli.signals import Signals\n"
        "s = Signals()\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "time.sleep(0.2)\n"
        "assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN\n"
        "assert signal.getsignal(signal.SIGTERM) == s.on_signal\n"
        "s.restore()\n"
        "print('survived')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "survived\n", r.stderr


def test_an_empty_or_relative_home_keeps_the_cache_in_the_account_s_home(monkeypatch):
    """`HOME=` (a service's or a container's environment): Path.home() is then `/`, and
    `quantize` and the kernels' build wrote /.cache/moespeq; a relative HOME would put it
    wherever the command runs. The password database's home directory is used instead."""
    import pwd
    import tempfile

    from moespeq_cli.fs import cache_dir

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    account = Path(pwd.getpwuid(os.getuid()).pw_dir)
    for home in ("", "relative/home"):
        monkeypatch.setenv("HOME", home)
        assert cache_dir() == account / ".cache" / "moespeq"
    monkeypatch.setenv("HOME", "/somewhere/else")
    assert cache_dir() == Path("/somewhere/else/.cache/moespeq")

    def no_entry(uid):  # an account the container's password database lacks
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setenv("HOME", "")
    assert str(cache_dir()).startswith(tempfile.gettempdir() + os.sep)


def test_an_empty_or_relative_home_anchors_the_hugging_face_cache(tmp_path):
    """huggingface_hub reads ~/.cache/huggingface from HOME as given: with `HOME=` the
    cache was /.cache/huggingface, with a relative HOME the directory a command ran in
    (a model there listed and run, one pulled written there)."""
    import pwd

    account = pwd.getpwuid(os.getuid()).pw_dir
    code = (
        "import os, sys\n"
        "from moespeq_cli.fs import anchor_hub_cache\n"
        "anchor_hub_cache()\n"
        "from huggingface_hub import constants\n"
        "print(constants.HF_HUB_CACHE)\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME")}
    for home in ("", "rel"):
        r = subprocess.run(
            [sys.executable, "-c", code], env={**clean, "HOME": home}, cwd=tmp_path, capture_output=True, text=True
        )
        assert r.stdout.strip() == os.path.join(account, ".cache", "huggingface", "hub"), (home, r.stdout, r.stderr)
    r = subprocess.run(
        [sys.executable, "-c", code], env={**clean, "HOME": str(tmp_path)}, capture_output=True, text=True
    )
    assert r.stdout.strip() == str(tmp_path / ".cache" / "huggingface" / "hub")  # an absolute HOME as given
    env = {**clean, "HOME": str(tmp_path), "XDG_CACHE_HOME": "rel", "HF_HOME": ""}  # relative XDG, empty HF_HOME
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.stdout.strip() == str(tmp_path / ".cache" / "huggingface" / "hub"), r.stdout
