"""Run one call in a child Python process, so that a crash in native code becomes an error.

LLVM aborts the whole process (``report_fatal_error``) on a kernel it cannot legalize for an
ISA, and a bad kernel can segfault on its first run; in the tool's own process either ends the
run with no bundle and no report (issue 16: exit 134 on a Zen 3). :func:`call` pickles a
module-level function and its arguments, runs them in ``python -m compressor.isolated`` and
returns the result, re-raises the child's exception, or raises :class:`ChildCrashed` with the
signal and the child's last meaningful stderr line (e.g. ``LLVM ERROR: Do not know how to split
the result of this operator!``).

The child inherits stdout (progress lines appear as they are printed); its stderr goes to a
file that is read back only for the crash message (TVM/onnxruntime noise stays out of the
terminal). Plugin files are loaded in the child before the arguments are unpickled, so plugin
targets and passes can cross the boundary.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from compressor.errors import TargetError

_ROOT = Path(__file__).resolve().parents[1]


class ChildCrashed(TargetError):
    """The child process died (signal or exit without a result)."""

    def __init__(self, message: str, signal_name: str | None = None, detail: str = ""):
        super().__init__(message)
        self.signal_name = signal_name
        self.detail = detail


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for key in ("LLVM ERROR", "Fatal Python error", "Segmentation fault", "Error", "error"):
        hits = [ln for ln in lines if key in ln]
        if hits:
            return hits[-1 if key != "LLVM ERROR" else 0][:300]
    return lines[-1][:300] if lines else ""


def call(fn: Callable[..., Any], args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, *,
         label: str, plugins: Sequence[str | Path] = (), timeout: float | None = None,
         on_line: Callable[[str], None] | None = None) -> Any:
    """``fn(*args, **kwargs)`` in a child process. ``fn`` must be importable by name (a
    module-level function); ``label`` names the work in the crash message; ``on_line`` gets each
    line the child prints on stdout as it comes (default: this process's stdout)."""
    with tempfile.TemporaryDirectory(prefix="compressor-child-") as tmp:
        inp, out, err = Path(tmp) / "in.pkl", Path(tmp) / "out.pkl", Path(tmp) / "stderr.txt"
        try:
            payload = pickle.dumps((fn, tuple(args), dict(kwargs or {})))
        except Exception as exc:  # a closure or an object from an unimportable module
            raise TypeError(f"cannot hand {label} to a child process: {exc}") from exc
        inp.write_bytes(pickle.dumps({"plugins": [str(p) for p in plugins], "payload": payload}))
        env = dict(os.environ)
        # the parent's import path, so that ``fn`` and the pickled objects resolve the same way
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(_ROOT), *[p for p in sys.path if p]]))
        emit = on_line or (lambda line: print(line, flush=True))
        with open(err, "wb") as ferr:
            proc = subprocess.Popen([sys.executable, "-m", "compressor.isolated", str(inp), str(out)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=ferr, env=env,
                                    text=True, bufsize=1)
            timer = threading.Timer(timeout, proc.kill) if timeout else None
            if timer:
                timer.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    emit(line.rstrip("\n"))
                proc.wait()
            finally:
                if timer:
                    timer.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        stderr = err.read_text(errors="replace")
        if timer and proc.returncode == -signal.SIGKILL and not out.exists():
            raise ChildCrashed(f"{label}: no result within {timeout:.0f} s (child killed)")
        if out.exists():
            ok, value = pickle.loads(out.read_bytes())
            if ok:
                return value
            raise value
        rc = proc.returncode
        sig = None
        if rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = f"signal {-rc}"
        detail = _last_error_line(stderr)
        how = f"crashed ({sig})" if sig else f"exited with status {rc} and no result"
        raise ChildCrashed(f"{label} {how}" + (f": {detail}" if detail else ""), sig, detail)


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it pickles round-trip, else a TargetError with its one line."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        msg = " ".join(str(exc).split())[:300]
        return TargetError(f"{type(exc).__name__}: {msg}")


def _child(inp: str, out: str) -> int:
    spec = pickle.loads(Path(inp).read_bytes())
    try:
        if spec["plugins"]:
            from compressor.plugins import load_plugin_file

            for p in spec["plugins"]:
                load_plugin_file(Path(p))
        fn, args, kwargs = pickle.loads(spec["payload"])
        result = (True, fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        result = (False, _portable(exc))
    tmp = Path(out + ".tmp")
    try:
        tmp.write_bytes(pickle.dumps(result))
    except Exception as exc:  # an unpicklable result
        tmp.write_bytes(pickle.dumps((False, TargetError(f"child result not picklable: {exc}"))))
    os.replace(tmp, out)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2]))
