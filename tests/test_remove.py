"""``moespeq rm``: a model pulled into the Hugging Face cache and its drafts go, nothing
else does; every name is checked before anything is deleted; a download or a draft
being written stops it; it asks at a terminal and is never half done by one Ctrl-C."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pull import hub  # noqa: F401 - the fake hub fixture

from moespeq_cli.removal import files_size


@pytest.fixture
def pulled(hub, cli, monkeypatch, tmp_path):  # noqa: F811
    """Two models pulled, the first quantized (its draft in moespeq's cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for repo in ("acme/tiny-olmoe", "acme/plan-only"):
        assert cli("pull", repo).exit_code == 0
    assert cli("quantize", "acme/tiny-olmoe").exit_code == 0
    return tmp_path / "cache"


def listed(cli) -> dict:
    r = cli("list", "--json")
    assert r.exit_code == 0, r.stderr
    return {m["name"]: m for m in json.loads(r.stdout)["models"]}


def test_rm_removes_the_model_and_its_drafts_and_nothing_else(pulled, cli, tmp_path):
    model = listed(cli)["acme/tiny-olmoe"]
    folder = pulled / "models--acme--tiny-olmoe"
    (draft,) = map(Path, model["drafts"])
    assert draft.is_relative_to(tmp_path / "xdg")
    size, draft_size = files_size(folder), files_size(draft)
    other = {p: p.read_bytes() for p in (pulled / "models--acme--plan-only").rglob("*") if p.is_file()}

    r = cli("rm", "acme/tiny-olmoe", "--yes", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert [m["repo"] for m in out["removed"]] == ["acme/tiny-olmoe"]
    assert out["removed"][0]["drafts"] == [str(draft)] and out["removed"][0]["draft_bytes"] == draft_size
    assert out["freed_bytes"] == size + draft_size > 0
    assert not folder.exists() and not draft.exists()
    assert {p: p.read_bytes() for p in other} == other  # the other model untouched
    assert set(listed(cli)) == {"demo", "acme/plan-only"}
    r = cli("run", "acme/tiny-olmoe", "-p", "hi", "-n", "2")
    assert r.exit_code == 2 and "is not downloaded" in r.stderr
    r = cli("rm", "acme/plan-only", "-y")
    assert r.exit_code == 0 and r.stdout.startswith("Removed acme/plan-only (")
    assert set(listed(cli)) == {"demo"}


@pytest.mark.parametrize(
    "names, needle",
    [
        (["acme/plan-only", "acme/nothing-here"], "acme/nothing-here is not on this machine"),
        (["acme/plan-only", "demo"], "the demo is built into moespeq"),
        (["acme/plan-only", "acme/plan-only"], "names the same model"),
        (["acme/plan-only", "acme/tiny-olmo"], "did you mean 'acme/tiny-olmoe'?"),
        (["acme/plan-only", "{dir}"], "is a directory of yours"),
    ],
)
def test_every_name_is_checked_before_anything_is_deleted(pulled, cli, tmp_path, names, needle):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    before = set(listed(cli))
    r = cli("rm", *[n.format(dir=mine) for n in names], "--yes")
    assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1
    assert set(listed(cli)) == before and (mine / "config.json").exists()


def test_without_a_terminal_rm_asks_for_yes(pulled, cli):
    r = cli("rm", "acme/plan-only")
    assert r.exit_code == 2 and "give --yes" in r.stderr
    assert "acme/plan-only" in listed(cli)


def test_a_download_in_progress_or_a_draft_being_written_stops_it(pulled, cli, tmp_path):
    from moespeq_cli.fs import exclusive_lock
    from moespeq_cli.quant.draft_store import lock_file

    locks = pulled / ".locks" / "models--acme--plan-only"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / "abc.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as huggingface_hub's FileLock holds it while it writes the blob
        r = cli("rm", "acme/tiny-olmoe", "acme/plan-only", "--yes")
        assert r.exit_code == 1 and "acme/plan-only is being downloaded" in r.stderr
    finally:
        os.close(fd)
    assert {"acme/tiny-olmoe", "acme/plan-only"} <= set(listed(cli))  # neither removed
    (draft,) = listed(cli)["acme/tiny-olmoe"]["drafts"]
    with exclusive_lock(lock_file(Path(draft)), "writing"):
        r = cli("rm", "acme/tiny-olmoe", "--yes")
    assert r.exit_code == 1 and "another moespeq is writing the draft" in r.stderr
    assert Path(draft).exists() and "acme/tiny-olmoe" in listed(cli)
    assert cli("rm", "acme/tiny-olmoe", "acme/plan-only", "--yes").exit_code == 0


def test_a_repository_the_hub_api_cannot_read_is_removed_whole(pulled, cli):
    folder = pulled / "models--acme--plan-only"
    for link in (folder / "snapshots").rglob("*.json"):
        link.unlink()  # (a removal cut short: snapshots without their files, blobs left)
    (folder / "refs" / "main").unlink()
    assert folder.exists()
    r = cli("rm", "acme/plan-only", "--yes", "--json")
    assert r.exit_code == 0, r.stderr
    assert not folder.exists() and json.loads(r.stdout)["freed_bytes"] > 0


def test_a_file_it_may_not_delete_is_named(pulled, cli, monkeypatch):
    folder = pulled / "models--acme--plan-only"
    real_unlink = os.unlink

    def refusing(path, *a, **kw):
        if str(path).endswith("config.json") or "config.json" in os.fspath(path):
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", refusing)
    monkeypatch.setattr(os, "remove", refusing)
    r = cli("rm", "acme/plan-only", "--yes")
    monkeypatch.undo()
    assert r.exit_code == 1 and "could not delete" in r.stderr and "permission denied" in r.stderr
    assert "run `moespeq rm` again" in r.stderr and r.stderr.count("\n") == 1
    assert folder.exists()


def rm_at_a_terminal(cache: Path, xdg: Path, answer: bytes, *names: str) -> tuple[int, str]:
    import pty

    primary, secondary = pty.openpty()
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "XDG_CACHE_HOME": str(xdg)}
    p = subprocess.Popen(
        [sys.executable, "-m", "moespeq_cli", "rm", *names],
        stdin=secondary,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(secondary)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
            if b"[y/N]" in (err := _peek(p)):
                break
        os.write(primary, answer)
        out, err = p.communicate(timeout=30)
    finally:
        os.close(primary)
    return p.returncode, (_seen.pop(p.pid, b"") + err).decode()


_seen: dict[int, bytes] = {}


def _peek(p) -> bytes:
    """What the process has written to stderr so far (kept for ``communicate``'s rest)."""
    import select

    while select.select([p.stderr], [], [], 0)[0]:
        chunk = os.read(p.stderr.fileno(), 4096)
        if not chunk:
            break
        _seen[p.pid] = _seen.get(p.pid, b"") + chunk
    return _seen.get(p.pid, b"")


def test_at_a_terminal_it_asks_and_says_what_goes(pulled, cli, tmp_path):
    code, err = rm_at_a_terminal(pulled, tmp_path / "xdg", b"n\n", "acme/tiny-olmoe")
    assert code == 0 and "Nothing removed." in err
    assert "acme/tiny-olmoe:" in err and "and 1 draft (" in err and "Remove acme/tiny-olmoe," in err
    assert "acme/tiny-olmoe" in listed(cli)
    code, err = rm_at_a_terminal(pulled, tmp_path / "xdg", b"y\n", "acme/tiny-olmoe", "acme/plan-only")
    assert code == 0, err
    assert "Remove 2 models," in err and set(listed(cli)) == {"demo"}


def test_a_signal_waits_for_an_uninterrupted_block():
    from moespeq_cli.cli.signals import Signals, uninterrupted

    signals = Signals()
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with uninterrupted("removing x"):
                signal.raise_signal(signal.SIGINT)
                time.sleep(0.2)  # the watcher looks every 20 ms: it must wait for the block
                reached.append("end of block")
            time.sleep(2)  # raised here, once the block is over
            reached.append("after")
    finally:
        signals.restore()
    assert reached == ["end of block"]
