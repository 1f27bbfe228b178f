"""The wheel carries everything moespeq reads beside its code: an install that is not
editable once lacked the hardware profiles (they lay outside the package), and every
run and plan then failed with "unknown hardware profile 'rtx3060-12gb'"."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moespeq_cli"


def package_files() -> set[str]:
    """The package's files as a wheel names them (build outputs and caches left out)."""
    out = set()
    for root, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
        for f in files:
            if not f.endswith((".pyc", ".so")) and not f.startswith("."):  # (an editor's swap file)
                out.add(Path(root, f).relative_to(ROOT).as_posix())
    return out


def test_what_the_runtime_reads_lies_inside_the_package(monkeypatch):
    monkeypatch.delenv("MOESPEQ_PROFILES", raising=False)
    from moespeq_cli.kernels.build import SOURCE
    from moespeq_cli.model_ref import CONFIGS_DIR, DEMO_DIR
    from moespeq_cli.quant.draft_store import ASSETS
    from moespeq_cli.runtime.planning.hardware import available_profiles, profiles_dir

    for path in (profiles_dir(), DEMO_DIR, CONFIGS_DIR, ASSETS, SOURCE):
        assert PACKAGE.resolve() in path.resolve().parents, path
    assert "rtx3060-12gb" in available_profiles()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    setuptools = pytest.importorskip("setuptools")  # the dev extra installs it for this test
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("pyproject's build needs setuptools 77 or later")
    out = tmp_path_factory.mktemp("wheel")
    # From a copy of the sources: setuptools builds in the tree and would reuse an earlier
    # build's build/lib, files and all.
    src = out / "src"
    skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "*.pyc", "*.so")
    shutil.copytree(ROOT, src, ignore=skip, symlinks=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, cwd=out)
    (whl,) = out.glob("moespeq-*.whl")
    return whl


def test_the_wheel_holds_every_file_of_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = package_files() - names
    assert not missing, f"left out of the wheel: {sorted(missing)}"


def test_an_installed_wheel_runs_and_plans_from_anywhere(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "MOESPEQ_KERNELS": "off"}

    def moespeq(*args):
        r = subprocess.run(
            [sys.executable, "-m", "moespeq_cli", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    where = subprocess.run(
        [sys.executable, "-c", "import moespeq_cli; print(moespeq_cli.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert Path(where.strip()).is_relative_to(site)  # the wheel's copy, not this checkout's
    plan = moespeq("plan", "mixtral", "--vram", "12GB", "--json")
    assert plan["hardware"] == "rtx3060-12gb"
    assert len(moespeq("run", "-n", "2", "--json")["token_ids"]) == 2
