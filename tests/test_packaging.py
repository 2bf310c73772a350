"""A non-editable install (pip install ., pip install git+..., a wheel) holds the whole package
and its configs, and trains from any directory."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_train import SMALL

from twolevel_dist.engine.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", minversion="68")     # the dev extra's; the build's own
    out = tmp_path_factory.mktemp("wheel")
    # From a copy of what the build reads: setuptools writes build/ and egg-info beside it.
    source = out / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source)
    for name in ("twolevel_dist", "configs"):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(source)],
                   check=True, capture_output=True, text=True, cwd=out)
    (path,) = out.glob("twolevel_dist-*.whl")
    return path


def test_the_wheel_holds_every_module_and_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "twolevel_dist").rglob("*.py")}
    configs = {"twolevel_dist/" + p.relative_to(ROOT).as_posix()
               for p in (ROOT / "configs").rglob("*.yaml")}
    assert len(configs) > 20
    assert modules - names == set(), "add the subpackage to pyproject.toml's packages"
    assert configs - names == set()


def test_an_installed_wheel_trains_from_any_directory(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    run_dir = tmp_path / "run"
    # What the twolevel-train console script runs, with the unpacked wheel first on the path.
    script = ("import sys, twolevel_dist; print(twolevel_dist.__file__, flush=True); "
              "from twolevel_dist.train import cli; sys.argv = sys.argv[1:]; cli()")
    out = subprocess.run([sys.executable, "-c", script, "twolevel-train", f"run_dir={run_dir}",
                          *SMALL, "train.max_steps=2", "groups=2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith(str(site / "twolevel_dist")), out.stdout[:300]
    assert [m["step"] for m in read_metrics(run_dir)] == [2]
