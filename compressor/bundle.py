"""Bundle directory: staged in a temporary sibling folder and moved into
place at the end, so a reader never sees a half-written bundle, and an
existing output is replaced only with ``--force`` and only after success.

Layout:
  model.onnx                  compressed model
  model_<arch>.so             compiled artifact (TVM Relax VM library), when produced
  manifest.json               hashes, target spec, ISA needs, pass history, metrics, status
  report.json / report.md     the full report
  recipe.yaml                 the resolved recipe (``compress run`` accepts it)
  selfcheck/inputs.npz        sample inputs
  selfcheck/expected.npz      compressed-model outputs on them (what the artifact must give)
  selfcheck/original.npz      original-model outputs on them
  run_bundle.py               on-device runner: ISA check + self-check
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from compressor.errors import InputError

MANIFEST_SCHEMA_VERSION = 1


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise InputError(f"output directory exists: {out}", hint="pass --force to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise InputError(f"output path exists and is not a directory: {out}")
    parent = out.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create output folder {parent}: {exc.strerror}") from exc


class StagedDir:
    """A temporary directory next to ``final`` that becomes ``final`` on commit()."""

    def __init__(self, final: Path):
        self.final = final
        self.path = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.resolve().parent))

    def commit(self) -> None:
        trash = None
        if self.final.exists():
            trash = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, trash)
        os.replace(self.path, self.final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
