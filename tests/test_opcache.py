"""Op counts of a forward pass remembered across runs (runtime/planning/opcache.py)."""

import json

import pytest

from moespeq_cli.models import build_model
from moespeq_cli.models.checkpoint import Checkpoint
from moespeq_cli.runtime.planning import estimate, opcache
from moespeq_cli.runtime.planning.estimate import StepModel
from moespeq_cli.runtime.planning.hardware import load_profile


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "moespeq" / "op-counts.json"


def meta_model(path, context=64):
    ck = Checkpoint(path)
    return build_model(ck.arch, ck.raw_config, context, str(ck.path / "config.json")), ck.config


def step(path, context=64):
    model, cfg = meta_model(path, context)
    return StepModel(model, cfg, load_profile("rtx3060-12gb"), cfg.dtype, context)


def test_a_count_is_made_once_and_then_read(tiny, cache, monkeypatch):
    """The first plan counts a pass on the meta device and stores it; a later run (a new
    StepModel) reads it without running the model, and gets the same figure."""
    path, _ = tiny("mixtral", "wide")
    calls = []
    real = estimate.count_pass_ops

    def counting(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(estimate, "count_pass_ops", counting)
    first = step(path).pass_ops(3)
    assert calls == [3] and cache.exists()
    assert step(path).pass_ops(3) == first and calls == [3]
    assert step(path).pass_ops(1) and calls == [3, 1]  # another pass: counted
    assert len(json.loads(cache.read_text())) == 2


def test_what_a_count_depends_on_changes_its_key(tiny):
    path, _ = tiny("mixtral", "wide")
    other, _ = tiny("qwen3_moe", "base")
    model, cfg = meta_model(path)
    key = opcache.count_key(model, cfg, 3, False)
    assert key == opcache.count_key(*meta_model(path), 3, False)  # the same model again
    assert key != opcache.count_key(model, cfg, 4, False)
    assert key != opcache.count_key(model, cfg, 3, True)
    assert key != opcache.count_key(*meta_model(path, context=128), 3, False)
    assert key != opcache.count_key(*meta_model(other), 3, False)
    # a figure of the raw config that neither the modules' repr nor the parsed fields show
    from moespeq_cli.models import parse_config

    ck = Checkpoint(path)
    raw = dict(ck.raw_config, sliding_window=7 if ck.raw_config.get("sliding_window") != 7 else 9)
    windowed = build_model(ck.arch, raw, 64, "config.json")
    assert key != opcache.count_key(windowed, parse_config(raw, "config.json")[1], 3, False)


def test_a_broken_or_unwritable_cache_only_means_counting_again(cache, tmp_path, monkeypatch):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    assert opcache.remembered("k", lambda: 7) == 7
    assert json.loads(cache.read_text()) == {"k": 7}
    cache.write_text(json.dumps({"k": "seven", "j": True}))  # not counts: counted afresh
    assert opcache.remembered("k", lambda: 8) == 8 and opcache.remembered("j", lambda: 9) == 9
    assert opcache.remembered("none", lambda: None) is None and "none" not in json.loads(cache.read_text())
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert opcache.remembered("k", lambda: 5) == 5
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "odd"))
    (tmp_path / "odd" / "moespeq" / "op-counts.json").mkdir(parents=True)  # a directory where the file would be
    assert opcache.remembered("k", lambda: 6) == 6


def test_the_oldest_counts_go_first(cache, monkeypatch):
    monkeypatch.setattr(opcache, "KEEP", 3)
    for i in range(5):
        opcache.remembered(f"k{i}", lambda i=i: i)
    assert json.loads(cache.read_text()) == {"k2": 2, "k3": 3, "k4": 4}
