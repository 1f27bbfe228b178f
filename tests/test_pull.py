"""``moespeq pull`` against a fake hub on 127.0.0.1: download, resume, errors, offline."""

import json
import os
from pathlib import Path

import pytest
from fake_hub import FakeHub

from moespeq_cli.hub import PULLED


@pytest.fixture
def hub(tiny, monkeypatch, tmp_path):
    src, _ = tiny("olmoe", "base")
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    files["pytorch_model.bin"] = b"pickle we must not download"
    files["README.md"] = b"# a model card"
    repos = {
        "acme/tiny-olmoe": files,
        "acme/gated": dict(files),
        "acme/bin-only": {"config.json": files["config.json"], "pytorch_model.bin": b"x"},
        "acme/plan-only": dict(files),
        "acme/bert": {"config.json": b'{"model_type": "bert"}', "model.safetensors": files["model.safetensors"]},
    }
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "DOWNLOAD_CHUNK_SIZE", 4096)  # so a dropped transfer leaves a partial file
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with FakeHub(repos, gated={"acme/gated"}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


def test_full_download_then_offline_reuse(hub, cli, monkeypatch):
    r = cli("pull", "acme/tiny-olmoe")
    assert r.exit_code == 0, r.stderr
    path = r.stdout.strip().splitlines()[-1]
    from pathlib import Path

    names = {p.name for p in Path(path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "pytorch_model.bin" not in names and "README.md" not in names  # only what a run needs
    # Offline: the server is gone for all we care; run resolves the id from the cache.
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    n_before = len(hub.requests)
    r = cli("run", "acme/tiny-olmoe", "-p", "hello", "-n", "4", "--backend", "cpu", "--json")
    assert r.exit_code == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 4
    assert len(hub.requests) == n_before


def test_resume_after_dropped_connection(hub, cli):
    hub.drop_once.add(("acme/tiny-olmoe", "model.safetensors"))
    r = cli("pull", "acme/tiny-olmoe")
    if r.exit_code != 0:  # the client gave up on this attempt: the same command resumes
        assert "run the same command again" in r.stderr and "Traceback" not in r.stderr
        r = cli("pull", "acme/tiny-olmoe")
    assert r.exit_code == 0, r.stderr
    from pathlib import Path

    got = (Path(r.stdout.strip().splitlines()[-1]) / "model.safetensors").read_bytes()
    assert got == hub.repos["acme/tiny-olmoe"]["model.safetensors"]
    gets = [rng for m, p, rng in hub.requests if m == "GET" and p.endswith("model.safetensors")]
    assert len(gets) >= 2, hub.requests
    assert gets[-1] and gets[-1] != "bytes=0-", gets  # it asked for the rest, not the whole file again


def test_missing_repo(hub, cli):
    r = cli("pull", "acme/nope")
    assert r.exit_code == 2 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_revision(hub, cli):
    r = cli("pull", "acme/tiny-olmoe", "--revision", "v9")
    assert r.exit_code == 2 and "revision" in r.stderr and "v9" in r.stderr


def test_gated_repo_explains_login(hub, cli):
    r = cli("pull", "acme/gated")
    assert r.exit_code == 1 and "hf auth login" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bin_only_repo(hub, cli):
    r = cli("pull", "acme/bin-only")
    assert r.exit_code == 1 and "never unpickles" in r.stderr


def test_offline_and_not_cached(hub, cli, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    r = cli("pull", "acme/tiny-olmoe")
    assert r.exit_code == 1 and "cannot reach the hub" in r.stderr and "unset HF_HUB_OFFLINE" in r.stderr


def test_a_hub_whose_name_does_not_resolve_is_said_at_once(cli, monkeypatch, tmp_path):
    """No network (the hub's name does not resolve): one line at once, where huggingface_hub
    retried for about 25 s; behind a proxy the name is the proxy's to resolve."""
    import huggingface_hub
    import huggingface_hub.constants as hc

    asked = []
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda *a, **k: asked.append(a) or [])
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")  # (RFC 2606: never resolves)
    for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    r = cli("pull", "acme/tiny-olmoe", "--config-only")
    assert r.exit_code == 1 and not asked, r.stderr
    assert "hub.invalid does not resolve" in r.stderr and "HF_ENDPOINT" in r.stderr
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    cli("pull", "acme/tiny-olmoe", "--config-only")
    assert asked  # the proxy's to resolve: the hub is asked
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid:99999")  # read at huggingface_hub's import: one line
    r = cli("pull", "acme/tiny-olmoe", "--config-only")
    assert r.exit_code == 2 and "Port out of range" in r.stderr and "internal error" not in r.stderr, r.stderr


def test_list_aliases(cli):
    r = cli("pull", "--list", "--json")
    assert r.exit_code == 0
    aliases = {a["alias"]: a for a in json.loads(r.stdout)["aliases"]}
    assert aliases["mixtral"]["repo"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert set(aliases) == {
        "mixtral",
        "phi-moe",
        "qwen-moe",
        "qwen3-moe",
        "olmoe",
        "deepseek-lite",
        "gpt-oss-20b",
        "gpt-oss-120b",
        "deepseek-v3",
        "kimi-k2",
        "qwen3-next",
        "glm-4.7",
        "glm-4.5-air",
        "glm-4.7-flash",
        "qwen3.5-moe",
        "qwen3.6-moe",
        "gemma-4-26b",
    }


def test_list_shows_what_runs_offline(hub, cli):
    at_commit = ["--revision", FakeHub.sha("acme/plan-only")]  # no refs/main: what a run finds is the snapshot
    for args in (["acme/tiny-olmoe"], ["acme/plan-only", "--config-only", *at_commit]):
        assert cli("pull", *args).exit_code == 0
    from huggingface_hub import snapshot_download

    snapshot_download(
        "acme/bert", endpoint=hub.url, cache_dir=os.environ["HF_HUB_CACHE"]
    )  # another tool's download of a model moespeq does not run
    assert cli("quantize", "acme/tiny-olmoe").exit_code == 0
    r = cli("list", "--json")
    assert r.exit_code == 0, r.stderr
    listed = json.loads(r.stdout)
    models = {m["name"]: m for m in listed["models"]}
    assert list(models) == ["demo", "acme/plan-only", "acme/tiny-olmoe"]  # the demo, then by name
    assert [(o["repo"], "bert" in o["reason"]) for o in listed["other_repos"]] == [("acme/bert", True)]
    olmoe, plan_only = models["acme/tiny-olmoe"], models["acme/plan-only"]
    assert olmoe["model_type"] == "olmoe" and olmoe["weights"] and not plan_only["weights"]
    assert olmoe["size_bytes"] > plan_only["size_bytes"] > 0
    assert len(olmoe["drafts"]) == 1 and olmoe["draft_bytes"] > 0 and plan_only["drafts"] == []
    assert plan_only["draft"] is None and plan_only["draft_bytes"] is None  # (it was 0 beside a null draft)

    assert Path(olmoe["path"], "config.json").is_file()
    # What `list` names, `run` takes, offline.
    r = cli("run", olmoe["name"], "-p", "hi", "-n", "2", "--backend", "cpu", "--json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)["token_ids"]) == 2
    r = cli("plan", "acme/plan-only", "--json")  # listed, so found: pulled at a commit, not main
    assert r.exit_code == 0, r.stderr
    r = cli("run", "acme/plan-only", "-n", "2")  # its weights were not pulled: say how to get them
    assert r.exit_code == 1 and "`moespeq pull acme/plan-only` downloads them" in r.stderr, r.stderr
    r = cli("list")
    rows = [line.split()[0] for line in r.stdout.splitlines()[1:]]  # a name is never cut: awk takes it
    assert rows == ["demo", "acme/plan-only", "acme/tiny-olmoe"] and "config only" in r.stdout
    assert "not listed: acme/bert: model_type 'bert'" in r.stderr


def test_list_sizes_the_draft_run_loads_and_says_when_it_is_stale(hub, cli):
    """Of two drafts with other options, DRAFT is the one `run` loads (its size alone);
    after the weights change it reads "stale", as `run` refuses it, until quantize runs."""
    from moespeq_cli.local_models import tree_size

    assert cli("pull", "acme/tiny-olmoe").exit_code == 0
    for args in ([], ["--method", "fp4", "--blocksize", "128"]):
        assert cli("quantize", "acme/tiny-olmoe", *args).exit_code == 0

    def listed():
        r = cli("list", "--json")
        assert r.exit_code == 0, r.stderr
        return next(m for m in json.loads(r.stdout)["models"] if m["name"] == "acme/tiny-olmoe")

    m = listed()
    assert len(m["drafts"]) == 2 and m["draft"].endswith("-nf4-b64") and m["draft_state"] == "ready"
    assert m["draft_bytes"] == tree_size(Path(m["draft"])) < sum(tree_size(Path(d)) for d in m["drafts"])
    config = Path(m["path"], "config.json").resolve()  # the cache's blob
    config.write_text(config.read_text() + "\n")  # other weights, as far as the draft can tell
    m = listed()
    assert m["draft_state"] == "stale" and m["draft"].endswith("-nf4-b64")
    r = cli("list")
    assert "stale: quantize again" in r.stdout
    run = ("run", "acme/tiny-olmoe", "-p", "hi", "-n", "2", "--spec-depth", "2")
    r = cli(*run)  # not asked for by name: said, and quantized again in memory
    assert r.exit_code == 0 and "was built from other weights" in r.stderr and "`moespeq quantize` rebuilds" in r.stderr
    assert json.loads(cli(*run, "--json").stdout)["draft"] == "quantized in memory"
    assert cli("quantize", "acme/tiny-olmoe", "--method", "fp4", "--blocksize", "128").exit_code == 0
    m = listed()  # a draft of these weights with other options: run loads it, not the stale default
    assert m["draft_state"] == "ready" and m["draft"].endswith("-fp4-b128")
    assert json.loads(cli(*run, "--json").stdout)["draft"] == m["draft"]
    assert "other weights" not in cli(*run).stderr
    assert cli("quantize", "acme/tiny-olmoe").exit_code == 0
    assert listed()["draft"].endswith("-nf4-b64") and listed()["draft_state"] == "ready"


def test_list_keeps_a_repo_with_a_dangling_link(cli, monkeypatch, tmp_path):
    """huggingface_hub's cache scan drops a whole repository for one dangling link; `run`
    names the link precisely, so `list` shows the model (its weights not there)."""
    from moespeq_cli.model_ref import CONFIGS_DIR

    repo = tmp_path / "models--acme--x"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snap / "config.json").write_text((CONFIGS_DIR / "mixtral.json").read_text())
    (snap / "model.safetensors").symlink_to("../../blobs/missing")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    r = cli("list", "--json")
    assert r.exit_code == 0, r.stderr
    (x,) = [m for m in json.loads(r.stdout)["models"] if m["name"] == "acme/x"]
    assert x["model_type"] == "mixtral" and not x["weights"]


def test_list_says_which_models_are_damaged_or_unreadable(cli, monkeypatch, tmp_path):
    """A weights file cut short, a broken header, a link to a blob that is gone: listed
    as damaged or incomplete (they read as healthy or "config only", and `run` then
    failed); a snapshot this user cannot read was an internal error that hid every model
    (`list`) or the one (`plan`): said, the others listed."""
    import safetensors.torch
    import torch
    from tiny_models import byte_tokenizer_json

    from moespeq_cli.model_ref import CONFIGS_DIR

    def repo(name: str) -> Path:
        snap = tmp_path / f"models--acme--{name}" / "snapshots" / ("a" * 40)
        snap.mkdir(parents=True)
        (snap.parents[1] / "refs").mkdir()
        (snap.parents[1] / "refs" / "main").write_text("a" * 40)
        (snap / "config.json").write_text((CONFIGS_DIR / "mixtral.json").read_text())
        (snap / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
        safetensors.torch.save_file({"w": torch.zeros(1000)}, snap / "model.safetensors")
        return snap

    repo("ok")
    cut = repo("cut") / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[:-1000])
    (repo("header") / "model.safetensors").write_bytes(b"\x02\x00")
    gone = repo("gone") / "model.safetensors"
    gone.unlink()
    gone.symlink_to("../../blobs/missing")
    repo("has space")
    (repo("x").parents[1]).rename(tmp_path / "models--..--x")
    (repo("notok") / "tokenizer.json").unlink()  # `run` needs it: damaged, not healthy
    gptq = repo("gptq")  # a quantization moespeq does not run: not listed, with why (list stopped on it)
    cfg = json.loads((gptq / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(cfg))
    index = repo("index")  # whole shards, an index that is not JSON: `run` refuses it
    (index / "model.safetensors").rename(index / "model-00001-of-00001.safetensors")
    (index / "model.safetensors.index.json").write_text("{oops")
    locked = repo("locked")
    repo("gpt2").parents[1].rename(tmp_path / "models--gpt2")  # a hub id without an organization
    (tmp_path / "models--acme--loop").symlink_to(tmp_path / "models--acme--loop")  # a link to itself
    repo("line").parents[1].rename(tmp_path / "models--acme--new\nline")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    real_listdir, real_stat = os.listdir, os.stat

    def closed(path) -> bool:  # (as root, chmod 000 closes nothing: the calls that would fail, failing)
        return str(path) == str(locked) or str(path).startswith(str(locked) + os.sep)

    def listdir(path="."):
        if closed(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    def stat(path, *a, **k):
        if closed(path) and str(path) != str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "stat", stat)
    r = cli("list", "--json")
    assert r.exit_code == 0, r.stderr
    listed = json.loads(r.stdout)
    models = {m["name"]: m for m in listed["models"]}
    assert models["acme/ok"]["weights"] and models["acme/ok"]["damaged"] is None
    assert models["acme/cut"]["damaged"] == "model.safetensors truncated: pull again"
    assert models["acme/header"]["damaged"] == "model.safetensors truncated: pull again"
    assert not models["acme/cut"]["weights"] and models["acme/gone"]["incomplete"]
    assert not models["acme/index"]["weights"] and "cannot be opened" in models["acme/index"]["damaged"]
    assert "acme/has space" not in models and "../x" not in models  # names `run` would not take
    others = {o["repo"]: o["reason"] for o in listed["other_repos"]}
    assert others["acme/has space"] == others["../x"] == others["acme/new\nline"] == "not a hub id `run` takes"
    # left out in silence: a model without an organization, a folder linked to itself
    assert "has no organization" in others["models--gpt2"] and "leads to no folder" in others["acme/loop"]
    assert "acme/gptq" not in models and "gptq" in others["acme/gptq"]
    assert not models["acme/notok"]["weights"] and "cannot be opened" in models["acme/notok"]["damaged"]
    (why,) = [o["reason"] for o in listed["other_repos"] if o["repo"] == "acme/locked"]
    assert "cannot be read (permission denied)" in why
    r = cli("list")
    assert "(model.safetensors truncated: pull again)" in r.stdout and "(incomplete: pull again)" in r.stdout
    assert "not listed: acme/locked:" in r.stderr
    assert "not listed: 'acme/new\\nline': not a hub id" in r.stderr  # escaped: one line a repository
    r = cli("plan", "acme/locked")
    assert r.exit_code == 1 and "cannot be read (permission denied); check its permissions" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_list_says_which_pulls_are_incomplete(hub, cli, tmp_path):
    """A pull cut short between two shards: listed as incomplete (not runnable), its
    partial file not counted; `run` names the pull that fetches the rest."""
    from moespeq_cli.local_models import tree_size

    assert cli("pull", "acme/tiny-olmoe").exit_code == 0
    snap = Path(cli("pull", "acme/tiny-olmoe").stdout.strip().splitlines()[-1])
    (snap / "model.safetensors").rename(snap / "model-00001-of-00002.safetensors")  # the first of two shards
    (snap / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    blobs = snap.parents[1] / "blobs"
    (blobs / "abc.1234.incomplete").write_bytes(b"x" * 100_000)  # a killed pull's partial file
    r = cli("list", "--json")
    (m,) = [m for m in json.loads(r.stdout)["models"] if m["name"] == "acme/tiny-olmoe"]
    assert m["incomplete"] and not m["weights"] and m["draft"] is None
    assert m["size_bytes"] == tree_size(blobs) < sum(p.stat().st_size for p in blobs.iterdir())
    assert "(incomplete: pull again)" in cli("list").stdout
    r = cli("run", "acme/tiny-olmoe", "-p", "hi", "-n", "2")
    assert r.exit_code == 1 and "the download is incomplete: `moespeq pull acme/tiny-olmoe` fetches it" in r.stderr
    (snap / "model.safetensors.index.json").unlink()  # cut short before the index arrived: the names tell
    (m,) = [m for m in json.loads(cli("list", "--json").stdout)["models"] if m["name"] == "acme/tiny-olmoe"]
    assert m["incomplete"]


def test_list_says_ages_as_ollama_does():
    from moespeq_cli.cli.listing import ago

    assert [ago(s) for s in (5, 61, 7200, 3 * 86400, 8 * 86400, 400 * 86400)] == [
        "just now",
        "1 minute ago",
        "2 hours ago",
        "3 days ago",
        "1 week ago",
        "1 year ago",
    ]


def test_list_with_a_file_for_a_cache(cli, monkeypatch, tmp_path):
    (tmp_path / "cache").write_text("not a directory")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    r = cli("list")
    assert r.exit_code == 1 and "is a file" in r.stderr and "HF_HUB_CACHE" in r.stderr


def test_a_cache_that_is_a_symlink_loop_is_one_line(cli, monkeypatch, tmp_path):
    """`ln -s hub hub`: run, plan and pull said "internal error: RuntimeError: Symlink
    loop" (huggingface_hub resolves the cache's path), list said nothing; the demo runs."""
    (tmp_path / "hub").symlink_to("hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for args in (("run", "org/x", "-n", "2"), ("plan", "org/x"), ("pull", "org/x"), ("list", "--json")):
        r = cli(*args)
        assert r.exit_code == 1 and "internal error" not in r.stderr, (args, r.stderr)
        assert "the Hugging Face cache" in r.stderr and "symbolic links" in r.stderr and r.stdout == "", args
    assert cli("run", "-n", "2", "--json").exit_code == 0


def test_a_repo_moespeq_cannot_run_is_refused_before_any_download(hub, cli, tmp_path):
    """No config.json, no safetensors, or a model_type no family implements: refused with
    what it is, and nothing written to the cache (a config-only entry would be listed)."""
    hub.repos["acme/noconfig"] = {"model.safetensors": hub.repos["acme/tiny-olmoe"]["model.safetensors"]}
    hub.repos["acme/gguf"] = {"config.json": hub.repos["acme/tiny-olmoe"]["config.json"], "model.gguf": b"GGUF"}
    for repo, needle in (
        ("acme/bert", "is a 'bert' model, not an architecture moespeq runs"),
        ("acme/noconfig", "has no config.json"),
        ("acme/gguf", "has no safetensors weights (it holds .gguf files)"),
        ("acme/bin-only", "(it holds .bin files)"),
    ):
        r = cli("pull", repo)
        assert r.exit_code == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not list((tmp_path / "cache").glob(f"models--acme--{repo.split('/')[1]}/snapshots/*/*"))
        r = cli("pull", repo, "--local-dir", str(tmp_path / repo))
        assert r.exit_code == 1 and not (tmp_path / repo).exists()
    assert cli("pull", "acme/gguf", "--config-only").exit_code == 0  # enough for plan
    r = cli("pull", "acme/gguf")  # its config is here, its weights never were: checked again
    assert r.exit_code == 1 and "(it holds .gguf files)" in r.stderr, r.stderr
    assert cli("pull", "acme/noconfig", "--config-only").exit_code == 1


def test_pull_takes_no_copies_from_subfolders(hub, cli):
    """gpt-oss keeps copies of its weights under original/ and metal/: a run loads the top
    level's, and the pull fetches only those."""
    files = hub.repos["acme/tiny-olmoe"]
    hub.repos["acme/with-original"] = {**files, "original/model.safetensors": files["model.safetensors"]}
    r = cli("pull", "acme/with-original")
    assert r.exit_code == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert (path / "model.safetensors").is_file() and not (path / "original").exists()
    assert [r for r in hub.requests if r[1].endswith("/original/model.safetensors")] == []


def test_a_place_that_is_not_a_directory_is_said_so(hub, cli, tmp_path, monkeypatch):
    """A --local-dir under a file, or a cache that is a file: not an interruption."""
    (tmp_path / "afile").write_text("x")
    r = cli("pull", "acme/tiny-olmoe", "--local-dir", str(tmp_path / "afile" / "sub"))
    assert (
        r.exit_code == 1
        and "it is not a writable directory; give --local-dir one that is" in r.stderr
        and "again" not in r.stderr
    ), r.stderr
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "afile"))
    r = cli("pull", "acme/tiny-olmoe")
    assert r.exit_code == 1 and "interrupted" not in r.stderr, r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .endswith("is a file; fix it, or point HF_HUB_CACHE (or HF_HOME) at a directory")
    )


def test_pull_without_model(cli):
    r = cli("pull")
    assert r.exit_code == 2 and "--list" in r.stderr
    r = cli("pull", "demo")  # built in: not an unknown model
    assert r.exit_code == 2 and "demo is built in: there is nothing to pull" in r.stderr, r.stderr
    r = cli("pull", "Mixtral")
    assert r.exit_code == 2 and "(did you mean 'mixtral'?)" in r.stderr, r.stderr


def test_local_dir_holding_the_users_files_is_refused(hub, cli, tmp_path):
    """A download over a directory of the user's own files would overwrite some of them and
    leave a mix of two models: refused, untouched. A directory an earlier pull wrote is
    pulled into again."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    r = cli("pull", "acme/tiny-olmoe", "--local-dir", str(mine))
    assert r.exit_code == 2 and "model files that moespeq did not pull there" in r.stderr, r.stderr
    assert [p.name for p in mine.iterdir()] == ["config.json"] and "mine" in (mine / "config.json").read_text()
    fresh = tmp_path / "fresh"
    for _ in range(2):
        r = cli("pull", "acme/tiny-olmoe", "--local-dir", str(fresh))
        assert r.exit_code == 0, r.stderr
    assert "not listed" not in cli("list").stderr  # huggingface_hub's refs/ stub in the cache: nothing to say
    # a home directory: the user's files beside huggingface_hub's own .cache/huggingface
    home = tmp_path / "home"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / "tokenizer.json").write_text("my notes")
    r = cli("pull", "acme/tiny-olmoe", "--local-dir", str(home))
    assert r.exit_code == 2 and "did not pull there ('tokenizer.json')" in r.stderr, r.stderr
    assert (home / "tokenizer.json").read_text() == "my notes" and not (home / "config.json").exists()
    # another model into the first one's directory: their files would mix
    hub.repos["acme/other"] = dict(hub.repos["acme/tiny-olmoe"])
    r = cli("pull", "acme/other", "--local-dir", str(fresh))
    assert r.exit_code == 2 and "holds a pull of acme/tiny-olmoe" in r.stderr, r.stderr
    (fresh / "notes.txt").write_text("mine")  # added by the user: no pull writes it, the pull goes on
    assert cli("pull", "acme/tiny-olmoe", "--local-dir", str(fresh)).exit_code == 0
    assert (fresh / "notes.txt").read_text() == "mine"
    import time

    time.sleep(1.1)
    (fresh / "config.json").write_text((fresh / "config.json").read_text() + " ")  # a user's edit after the pull
    r = cli("pull", "acme/tiny-olmoe", "--local-dir", str(fresh))
    assert r.exit_code == 2 and "'config.json' changed since the pull" in r.stderr, r.stderr
    assert (fresh / "config.json").read_text().endswith(" ")
    # a pull moespeq did not record (hf download's, an older moespeq's): whose is it?
    (fresh / PULLED).unlink()
    r = cli("pull", "acme/other", "--local-dir", str(fresh))
    assert r.exit_code == 2 and "did not pull there" in r.stderr, r.stderr


def test_an_offline_pull_finds_what_is_here_and_creates_nothing(hub, cli, tmp_path, monkeypatch):
    """Offline, a pull returns the cached model or the --local-dir pulled before; a new
    --local-dir is not created; unreachable, a cached model is returned without asking."""
    import huggingface_hub.constants as hc

    assert cli("pull", "acme/tiny-olmoe").exit_code == 0
    done = tmp_path / "done"
    assert cli("pull", "acme/tiny-olmoe", "--local-dir", str(done)).exit_code == 0
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert cli("pull", "acme/tiny-olmoe").exit_code == 0
    assert cli("pull", "acme/tiny-olmoe", "--local-dir", str(done)).exit_code == 0
    r = cli("pull", "acme/tiny-olmoe", "--local-dir", str(tmp_path / "new"))
    assert r.exit_code == 1 and "HF_HUB_OFFLINE" in r.stderr and not (tmp_path / "new").exists(), r.stderr
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    n = len(hub.requests)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no preflight for a cached model
    r = cli("pull", "acme/tiny-olmoe")
    assert len(hub.requests) == n


@pytest.mark.parametrize(
    "code,needle", [(28, "no space left"), (30, "cannot write"), (104, "run the same command again")]
)
def test_a_failed_write_says_why(hub, cli, monkeypatch, code, needle):
    """A full disk or a read-only cache is not an interruption a retry fixes."""
    import huggingface_hub

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    r = cli("pull", "acme/tiny-olmoe")
    assert r.exit_code == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_killed_pulls_partial_file_is_removed_once_stale(hub, cli, tmp_path):
    import time

    from moespeq_cli.hub import STALE_S

    blobs = tmp_path / "cache" / "models--acme--tiny-olmoe" / "blobs"
    blobs.mkdir(parents=True)
    old, live = blobs / "abc.1234abcd.incomplete", blobs / "def.5678abcd.incomplete"
    for f in (old, live):
        f.write_bytes(b"partial")
    then = time.time() - STALE_S - 60
    os.utime(old, (then, then))
    assert cli("pull", "acme/tiny-olmoe").exit_code == 0
    assert not old.exists() and live.exists()


def test_ctrl_c_stops_a_pull_at_once(hub, tmp_path):
    """huggingface_hub's download threads do not see Ctrl-C: the pull waited for the file in
    flight to finish (here: a transfer that stalls), now it ends at once."""
    import signal
    import subprocess
    import sys
    import time

    hub.stall.add(("acme/tiny-olmoe", "model.safetensors"))
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_HUB_DOWNLOAD_TIMEOUT="60")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moespeq_cli", "pull", "acme/tiny-olmoe"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    blobs = tmp_path / "cache" / "models--acme--tiny-olmoe" / "blobs"
    deadline = time.monotonic() + 60
    while not list(blobs.glob("*.incomplete")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert list(blobs.glob("*.incomplete")), "the download never started"
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("Ctrl-C did not stop the pull") from None
    assert proc.returncode == 130 and "pull interrupted" in err and "Traceback" not in err, err


def test_pull_list_takes_no_model(cli):
    r = cli("pull", "--list", "mixtral")
    assert r.exit_code == 2 and "takes no MODEL" in r.stderr and not r.stdout


def test_a_file_gone_during_a_download_is_no_unwritable_directory(tmp_path):
    """ENOENT in the middle of a download (a cache cleaned by another process) is worth a
    second try; a file where a directory should be is not."""
    import errno

    from moespeq_cli.hub import HubError, hub_errors

    gone = FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "blobs" / "x.incomplete"))
    with pytest.raises(HubError) as e, hub_errors("acme/tiny", None, tmp_path):
        raise gone
    assert "x.incomplete vanished" in str(e.value) and "run the same command again" in str(e.value), e.value
    with pytest.raises(HubError) as e, hub_errors("acme/tiny", None, tmp_path):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(tmp_path))
    assert "not a writable directory" in str(e.value) and "again" not in str(e.value)


def test_a_pull_that_leaves_no_whole_model_says_so(hub, cli, tmp_path, monkeypatch):
    """Without the hub, huggingface_hub hands back the cached snapshot whole or not: a pull
    said it succeeded for a model `run` then refused (a shard gone, a config damaged).
    Online, a shard cut short in the cache is fetched again."""
    import huggingface_hub.constants as hc

    r = cli("pull", "acme/tiny-olmoe")
    snap = Path(r.stdout.strip().splitlines()[-1])
    whole = (snap / "model.safetensors").read_bytes()
    blob = (snap / "model.safetensors").resolve()
    blob.write_bytes(whole[: len(whole) // 2])  # cut short outside huggingface_hub (a full disk, a copy)
    r = cli("pull", "acme/tiny-olmoe")
    assert r.exit_code == 0, r.stderr
    assert (snap / "model.safetensors").read_bytes() == whole
    for damage, needle in (
        (lambda: (snap / "config.json").resolve().write_text("{oops"), "config.json"),
        (lambda: (snap / "tokenizer.json").resolve().write_text("{"), "tokenizer.json"),
        (lambda: (snap / "model.safetensors").resolve().write_bytes(whole[:100]), "model.safetensors"),
    ):
        damage()
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
        r = cli("pull", "acme/tiny-olmoe", "--json")
        assert r.exit_code == 1 and r.stdout == "", (r.exit_code, r.stdout)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "is not whole" in lines[0] and needle in lines[0], r.stderr
        assert "unset HF_HUB_OFFLINE" in lines[0]
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens
        r = cli("pull", "acme/tiny-olmoe")
        assert r.exit_code == 1 and "is not whole" in r.stderr and "check the network" in r.stderr, r.stderr
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        r = cli("pull", "acme/tiny-olmoe")  # the hub back: the pull mends it
        assert r.exit_code == 0, r.stderr
        assert cli("run", "acme/tiny-olmoe", "-p", "hi", "-n", "2", "--backend", "cpu").exit_code == 0


def test_pull_of_a_local_directory_or_an_empty_endpoint_is_usage(cli, tmp_path, monkeypatch):
    """A local checkpoint needs no pull (it said "unknown model"); an empty HF_ENDPOINT is
    no URL (it failed on the network, exit 1); a long id is cut in the error line."""
    (tmp_path / "ck" / "mix").mkdir(parents=True)  # named like org/name, a checkpoint here: run reads it
    (tmp_path / "ck" / "mix" / "config.json").write_text("{}")
    r = cli("pull", str(tmp_path / "ck" / "mix"))
    assert r.exit_code == 2 and "needs no pull" in r.stderr and f"moespeq run {tmp_path}" in r.stderr, r.stderr
    monkeypatch.chdir(tmp_path)
    r = cli("pull", "ck/mix")
    assert r.exit_code == 2 and "needs no pull" in r.stderr, r.stderr
    monkeypatch.setenv("HF_ENDPOINT", "")
    r = cli("pull", "org/x")
    assert r.exit_code == 2 and "HF_ENDPOINT '' is not an http(s) URL" in r.stderr, r.stderr
    r = cli("pull", "a" * 5000)
    assert r.exit_code == 2 and len(r.stderr) < 500, len(r.stderr)  # (it repeated all 5,000)


def test_a_repo_without_a_tokenizer_is_refused_before_the_download(hub, cli, tmp_path):
    """moespeq reads the fast tokenizer (tokenizer.json) only: a repository without one
    was downloaded whole, then said to be "not whole" with a remedy that cannot help."""
    files = hub.repos["acme/tiny-olmoe"]
    hub.repos["acme/no-tokenizer"] = {k: v for k, v in files.items() if k != "tokenizer.json"}
    r = cli("pull", "acme/no-tokenizer")
    assert r.exit_code == 1 and "has no tokenizer.json" in r.stderr and "nothing was downloaded" in r.stderr
    assert not [p for m, p, _ in hub.requests if p.endswith("model.safetensors")]
    assert cli("pull", "acme/no-tokenizer", "--config-only").exit_code == 0  # enough for plan
