import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# moespeq's cache (drafts of read-only checkpoints, lock files) goes to a fresh directory,
# never the user's ~/.cache; subprocesses inherit it.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="moespeq-test-cache-")
# scripts/gpu_check.sh calibrates the GPU once and names the profiles here, so that the
# cuda tests (runs without --hardware) price it without each test process recalibrating.
if os.path.isdir(os.environ.get("MOESPEQ_TEST_PROFILES") or ""):
    import shutil

    shutil.copytree(os.environ["MOESPEQ_TEST_PROFILES"], Path(os.environ["XDG_CACHE_HOME"]) / "moespeq" / "profiles")

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(family, variant, dtype=float32) -> (checkpoint dir, transformers reference model)."""
    import torch

    built = {}

    def get(family: str, variant: str, dtype=torch.float32):
        key = (family, variant, dtype)
        if key not in built:
            out = tmp_path_factory.mktemp(f"{family}-{variant}")
            ref = tiny_models.build(family, variant, out, dtype=dtype)
            built[key] = (out, ref)
        return built[key]

    return get


@pytest.fixture
def cli():
    """cli(*args) -> result with exit_code, stdout, stderr; runs through the error mapping."""
    from typer.testing import CliRunner

    from moespeq_cli.cli.app import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args))

    return invoke


@pytest.fixture
def ckpt(tiny, tmp_path):
    """A private copy of the tiny Mixtral checkpoint, to corrupt at will."""
    import shutil

    src, _ = tiny("mixtral", "gqa")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst
