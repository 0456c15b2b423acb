"""The import direction (.importlinter, checked by import-linter): the core imports no pass, target or
application module; passes import no target except the two lowerings that are to move under targets/."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports (import-linter) is not installed: ./setup.sh installs it")
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([exe, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_repository_keeps_its_import_contracts():
    r = _lint(REPO, REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def test_a_violating_import_is_reported(tmp_path):
    """The same kind of contract on a two-module package whose core imports its application: broken."""
    pkg = tmp_path / "toy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text("from toy import app\n")
    (pkg / "app.py").write_text("X = 1\n")
    (tmp_path / ".importlinter").write_text(
        "[importlinter]\nroot_packages =\n    toy\n\n[importlinter:contract:c]\nname = core is the floor\n"
        "type = forbidden\nsource_modules =\n    toy.core\nforbidden_modules =\n    toy.app\n")
    r = _lint(tmp_path, tmp_path)
    assert r.returncode != 0 and "BROKEN" in r.stdout and "toy.core -> toy.app" in r.stdout, r.stdout
