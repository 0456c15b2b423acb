"""Progress bars: off unless a terminal is watching (the CLI's --quiet/--json and redirected stderr keep
output line-oriented); when on, the executors advance one bar step per finished task."""
from __future__ import annotations

import io

import pytest

from compressor import progress
from compressor.executor import LocalExecutor


@pytest.fixture(autouse=True)
def _reset(monkeypatch):
    monkeypatch.delenv("COMPRESSOR_PROGRESS", raising=False)
    yield
    progress.configure(None)


def test_off_by_default_and_for_non_terminals(monkeypatch):
    assert not progress.enabled()
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not progress.for_terminal(quiet=False, as_json=False)
    progress.configure(True)
    assert progress.enabled()
    monkeypatch.setenv("COMPRESSOR_PROGRESS", "0")
    assert not progress.enabled()


def test_terminal_rules(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Tty())
    assert progress.for_terminal(False, False)
    assert not progress.for_terminal(True, False) and not progress.for_terminal(False, True)


def test_executor_map_draws_a_bar_when_on(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    out = LocalExecutor().map(lambda x: x * 2, [(i,) for i in range(5)], label="probes")
    assert [o.value for o in out] == [0, 2, 4, 6, 8] and err.getvalue() == ""  # off: nothing drawn
    progress.configure(True)
    seen = []
    out = LocalExecutor().map(lambda x: x * 2, [(i,) for i in range(5)], label="probes", progress=seen.append)
    assert [o.value for o in out] == [0, 2, 4, 6, 8] and len(seen) == 5  # the caller's callback still runs
    assert "probes" in err.getvalue() and "0/5" in err.getvalue()
    steps = []

    class Rec:
        def update(self, n=1):
            steps.append(n)

        def close(self):
            steps.append("closed")

    monkeypatch.setattr(progress, "bar", lambda desc, total=None, unit="task": Rec())
    LocalExecutor().map(lambda x: 1 // x, [(i,) for i in (1, 0, 2)], label="probes")  # one task fails
    assert steps == [1, 1, 1, "closed"]  # failed tasks advance the bar too
    with progress.stage("compiling for x86"):
        pass
    assert "compiling for x86" in err.getvalue()
