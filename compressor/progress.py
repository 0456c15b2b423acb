"""Progress bars (tqdm) on stderr for the stages that can take more than a few seconds.

Shown only where a person is watching: the CLI turns them on when stderr is a terminal and neither
``--quiet`` nor ``--json`` was given (:func:`configure`); ``COMPRESSOR_PROGRESS=1`` / ``0`` forces
them on or off. Everywhere else (library use, tests, CI logs, redirected stderr) every call here is a
no-op, so the tool's own output stays one line per event.

* :func:`bar` counts tasks: the executors' ``map`` (sensitivity sweep, OBS solves, accuracy-search
  probes, batch jobs) updates one per completed task.
* :func:`stage` shows the elapsed time of one long call whose progress cannot be counted (the
  compile, the tuning run), refreshed once a second.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

_enabled: bool | None = None


def configure(enabled: bool | None) -> None:
    """Turn the bars on/off for this process (None: back to the default, off)."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    env = os.environ.get("COMPRESSOR_PROGRESS")
    if env in ("0", "1"):
        return env == "1"
    return bool(_enabled)


def for_terminal(quiet: bool, as_json: bool) -> bool:
    """What the CLI passes to :func:`configure`: a terminal on stderr and no --quiet / --json."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and not quiet and not as_json


class _Null:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def bar(desc: str, total: int | None = None, unit: str = "task") -> Any:
    """A tqdm bar on stderr (``update(n)``, ``set_postfix_str``, ``close``), or a no-op object."""
    if not enabled():
        return _Null()
    from tqdm import tqdm

    return tqdm(total=total or None, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def stage(desc: str) -> Iterator[None]:
    """Elapsed time of one long call, on stderr while it runs (no-op when bars are off)."""
    if not enabled():
        yield
        return
    from tqdm import tqdm

    b = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", file=sys.stderr, leave=False)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            b.refresh()

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        b.close()
