"""A non-editable install (`pip install .`) works from anywhere, the repository root included: the source tree
imports exactly as the installed package does (kernels/ and csrc/ live in sae_fast/), and the installed copy
holds every subpackage and every data file the repository tracks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import sae_fast, sae_fast.csrc, sae_fast.kernels; from importlib.resources import files; "
         "assert files('sae_fast.csrc').joinpath('sparse.cpp').is_file(); print(sae_fast.__file__)")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    return target


def probe(cwd: Path, site: Path) -> str:
    """`python -S` (no site-packages: only the installed copy, and the cwd) runs PROBE in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-S", "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_imports_from_the_repository_root(installed):
    """In the repository root the source folder shadows the installed package; it must import all the same."""
    assert Path(probe(ROOT, installed)) == ROOT / "sae_fast" / "__init__.py"


def test_imports_from_elsewhere(installed, tmp_path):
    assert Path(probe(tmp_path, installed)) == installed / "sae_fast" / "__init__.py"


def test_installed_copy_has_every_tracked_file(installed):
    tracked = subprocess.run(["git", "ls-files", "sae_fast"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    missing = [f for f in tracked if not (installed / f).is_file()]
    assert not missing, f"pip install . leaves out: {missing[:10]}"
