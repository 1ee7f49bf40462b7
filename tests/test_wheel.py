"""longtrain as users on a cluster get it: a wheel pip-installed into a fresh virtual environment,
used from an empty folder outside the repository.

Builds the wheel once (module fixture), checks it carries every file of recipes/ and slurm/ and
every module of the source tree, installs it (reusing this environment's torch and other
dependencies through a .pth line, so nothing is downloaded), then trains the shipped tiny-cpu
recipe by name on 2 processes and renders a 2-node Slurm script, both from an empty folder.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import REPO, cli_env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # no build isolation: the setuptools of this environment, nothing downloaded
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (whl,) = out.glob("longtrain-*.whl")
    return whl


def test_wheel_carries_recipes_templates_and_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in (REPO / "recipes").iterdir():
        assert f"longtrain/recipes/{f.name}" in names, f"recipes/{f.name} is not in the wheel"
    for f in (REPO / "slurm").iterdir():
        assert f"longtrain/slurm_templates/{f.name}" in names, f"slurm/{f.name} is not in the wheel"
    for f in (REPO / "longtrain").rglob("*.py"):
        rel = f.relative_to(REPO).as_posix()
        assert rel in names, f"{rel} is not in the wheel (add its package to pyproject.toml)"


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed and this environment's site-packages for the dependencies."""
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    py = root / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # a plain path line: the dependencies, but not this environment's editable longtrain (its
    # finder is only activated by .pth files processed in a site dir, which this path is not)
    Path(site, "zz_reuse_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root


def _run(venv: Path, cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = cli_env()
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(venv / "bin" / "longtrain"), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def test_installed_package_works_from_an_empty_folder(venv, tmp_path):
    where = _run(venv, tmp_path, "--version")
    assert where.returncode == 0 and where.stdout.startswith("longtrain ")
    loc = subprocess.run([str(venv / "bin" / "python"), "-c", "import longtrain; print(longtrain.__file__)"],
                         capture_output=True, text=True, cwd=tmp_path).stdout
    assert str(venv) in loc, f"longtrain imported from {loc}, not from the installed wheel"

    listed = _run(venv, tmp_path, "recipes")
    assert listed.returncode == 0 and "tiny-cpu" in listed.stdout and str(venv) in listed.stdout

    train = _run(venv, tmp_path, "train", "tiny-cpu", "--nproc", "2",
                 "--set", "training.steps=3", "data.max_documents=40", "data.seq_len=64", "metrics.log_every=1")
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    assert "done: 3 steps" in train.stdout
    assert (tmp_path / "runs" / "tiny-cpu" / "checkpoints" / "latest").exists()

    slurm = _run(venv, tmp_path, "slurm", "tiny-cpu", "--nodes", "2", "--gpus-per-node", "8")
    assert slurm.returncode == 0, slurm.stderr[-3000:]
    assert "#SBATCH --nodes=2" in slurm.stdout
    assert str(venv) in slurm.stdout  # the shipped recipe, by its installed path

    bad = _run(venv, tmp_path, "train", "tiny-cpy")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "closest shipped recipes: tiny-cpu" in lines[0], bad.stderr
