"""`python -m build` gives a wheel that carries the presets and assets, installs into a clean venv, and runs.

The venv is created without site packages and the wheel installed with ``--no-deps --no-index`` (nothing is
downloaded). Its dependencies (torch, transformers, …) are then borrowed from the environment running the
tests through a ``.pth`` line, which puts them *after* the venv's own site-packages: `soul` is the installed
wheel, not the source tree (checked), and only the dependencies come from outside.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    # No PYTHONPATH: the test run's own (e.g. PYTHONPATH=src) would put the source tree before the wheel.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, **kwargs)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="the wheel test needs the 'build' package (pip install 'soul[dev]')")
    src = tmp_path_factory.mktemp("src")
    # Build from a copy so the checkout gets no build/ or *.egg-info directories.
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)])
    wheels = list(dist.glob("soul-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_the_package_presets_and_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.name for p in (ROOT / "src" / "soul" / "presets").glob("*.yaml"))
    assets = sorted(p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "soul" / "assets").rglob("*")
                    if p.is_file())
    assert presets and assets
    assert {f"soul/presets/{p}" for p in presets} <= names
    assert set(assets) <= names
    for module in ("soul/cli.py", "soul/eval/interop.py", "soul/integrations/transformers.py",
                   "soul/train/trackers.py", "soul/data/tofu_authors.py"):
        assert module in names, module
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "soul = soul.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_wheel_installs_into_a_clean_venv_and_soul_help_runs(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
         str(wheel)])
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = run([str(python), "-c", "import soul, pathlib; print(pathlib.Path(soul.__file__).resolve())"],
                cwd=tmp_path).stdout
    assert Path(where.strip()).is_relative_to(site.resolve()), where  # the wheel's soul, not the source tree
    help_text = run([str(venv / "bin" / "soul"), "--help"], cwd=tmp_path).stdout
    for command in ("finetune", "unlearn", "eval", "reproduce"):
        assert command in help_text, command
    presets = run([str(python), "-c", "from soul.train import list_presets; print(' '.join(list_presets()))"],
                  cwd=tmp_path).stdout.split()
    assert "cpu_smollm2_finetune" in presets
    refusals = run([str(python), "-c", "from soul.data import load_refusals; print(len(load_refusals()))"],
                   cwd=tmp_path).stdout
    assert int(refusals) > 0
