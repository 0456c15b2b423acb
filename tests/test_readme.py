"""The two commands at the top of README.md: the first is executed as written,
the second must be exactly what .ci/run runs."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.conftest import REPO


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_test_command_is_what_ci_runs():
    second = _bash_blocks()[1].strip()
    ci_lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines()]
    assert second in ci_lines


@pytest.mark.slow
def test_readme_first_command_runs_demo():
    first = _bash_blocks()[0].strip()
    assert "compress demo" in first
    p = subprocess.run(["bash", "-c", first], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT PASSED") and "accuracy=" in last, last
    rep = json.loads((REPO / "demo.bundle" / "report.json").read_text())
    assert rep["accuracy"]["n"] == 360 and rep["accuracy"]["artifact"] is not None
    assert rep["stats"]["compressed"]["sparsity"] > 0.45
