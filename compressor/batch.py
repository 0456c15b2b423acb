"""``compress batch``: many models x several targets in one run, locally or on a Ray cluster.

    compress batch a.onnx b.onnx ... --target x86,arm [flags shared by all jobs] -o OUTDIR [--executor ray]

One job per (model, target). Each job is the ordinary pipeline
(``pipeline.plan`` + ``pipeline.execute``) on a copy of the shared options, so a
batch bundle is the bundle ``compress MODEL --target T`` would write. Jobs are
tasks of a ``compressor.executor.Executor``: a model's bytes and the data files
go into the object store once (``Executor.put``) and every job of that model
gets references; the job runs in a private temporary folder on whichever node
picks it, and sends its bundle back as a tar archive, which is unpacked into
``OUTDIR/<model>.<target>.bundle``. The files that name paths (manifest.json,
report.json, report.md, recipe.yaml; none of them is in the manifest's hashed
file list) are rewritten with the driver-side paths.

A job that fails (bad model, pass refused, worker lost after its retries,
timeout) is a FAILED row with its one-line error; the others go on. A job whose
accuracy gate fails keeps its bundle (marked failed, as with ``compress``).

Resuming: each finished job writes ``OUTDIR/.batch/<bundle>.json`` with a key,
sha256 over (model sha256, the resolved recipe with every input path replaced
by its file's sha256, the tool version). A re-run skips a job whose bundle
exists and whose key is unchanged; ``--force`` redoes everything.

Outputs: ``summary.md`` and ``summary.json`` (size, sparsity, latency, accuracy,
status per row, plus the executor's task statistics), and a final line
``RESULT PASSED|FAILED batch ...``. Exit 0 when every job passed, 3 otherwise.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import compressor
from compressor.digest import sha256_bytes
from compressor.errors import CompressorError, InputError, UsageError
from compressor.recipe import Options

log = logging.getLogger(__name__)
Say = Callable[[str], None]

STATE_DIR = ".batch"
_FILE_FLAGS = ("calib", "eval", "finetune")





def _read_arr(path: Path) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), dtype=np.uint8)


def job_key(model_sha: str, recipe: dict[str, Any], file_hashes: dict[str, Any]) -> str:
    """Identity of a job's inputs and flags: same key, same bundle."""
    r = {k: v for k, v in recipe.items() if k not in ("model", "output", "plugin", *_FILE_FLAGS)}
    blob = json.dumps({"model": model_sha, "recipe": r, "files": file_hashes, "tool": compressor.__version__},
                      sort_keys=True, default=str)
    return sha256_bytes(blob.encode())


def _tar_dir(d: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(d, arcname=".")
    return buf.getvalue()


def run_job(spec: dict[str, Any], model: np.ndarray, files: dict[str, Any]) -> dict[str, Any]:
    """One (model, target) job; a task of the executor (runs on any node).

    ``spec``: {"options": Options fields, "model_name", "bundle_name"}; ``model``: the ONNX bytes
    (uint8 array); ``files``: {flag: (name, uint8 array)} and {"plugin": [(name, array)]}.
    Returns the report's summary fields and the bundle as a tar archive, or the one-line error."""
    from compressor import pipeline

    tmp = Path(tempfile.mkdtemp(prefix="compress-batch-"))
    lines: list[str] = []
    try:
        (tmp / "in").mkdir()
        src = tmp / "in" / spec["model_name"]
        src.write_bytes(model.tobytes())
        kw = dict(spec["options"])
        for flag in _FILE_FLAGS:
            if files.get(flag) is not None:
                name, arr = files[flag]
                p = tmp / "in" / f"{flag}-{name}"
                p.write_bytes(arr.tobytes())
                kw[flag] = str(p)
        plugins = []
        for i, (name, arr) in enumerate(files.get("plugin") or []):
            p = tmp / "in" / f"plugin{i}-{name}"
            p.write_bytes(arr.tobytes())
            plugins.append(str(p))
        kw.update(model=str(src), output=str(tmp / "out" / spec["bundle_name"]), plugin=plugins, force=False, dry_run=False)
        (tmp / "out").mkdir()
        opts = Options(**kw)
        t0 = time.perf_counter()
        try:
            rep, code = pipeline.execute(pipeline.plan(opts), lines.append)
        except CompressorError as exc:  # name the user's files, not this worker's copies
            msg = exc.one_line().replace(str(src), spec["model_path"])
            for flag in _FILE_FLAGS:
                if kw.get(flag) and spec["options"].get(flag):
                    msg = msg.replace(kw[flag], spec["options"][flag])
            return {"error": msg, "code": exc.exit_code, "log_tail": lines[-20:]}
        return {"code": code, "report": rep, "seconds": round(time.perf_counter() - t0, 2), "worker": os.uname().nodename,
                "pid": os.getpid(), "tar": _tar_dir(tmp / "out" / spec["bundle_name"]), "tmp": str(tmp), "log_tail": lines[-20:]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _row(model: str, tag: str, bundle: Path, rep: dict[str, Any] | None, status: str, note: str = "",
         seconds: float | None = None, attempts: int = 1) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "target": tag, "status": status, "bundle": str(bundle), "note": note,
                           "size_bytes": None, "original_bytes": None, "sparsity": None, "latency_ms": None,
                           "latency_source": None, "accuracy": None, "original_accuracy": None,
                           "seconds": seconds, "attempts": attempts}
    if rep:
        comp, orig = rep["stats"]["compressed"], rep["stats"]["original"]
        row.update(size_bytes=comp.get("bytes_on_disk"), original_bytes=orig.get("bytes_on_disk"), sparsity=comp.get("sparsity"))
        lat = rep.get("latency") or {}
        if lat.get("artifact_s") is not None:
            row.update(latency_ms=lat["artifact_s"] * 1000, latency_source=f"artifact ({tag})")
        elif lat.get("ort_compressed_s") is not None:
            row.update(latency_ms=lat["ort_compressed_s"] * 1000, latency_source="onnxruntime")
        acc = rep.get("accuracy") or {}
        if acc:
            row.update(accuracy=acc.get("artifact") if acc.get("artifact") is not None else acc.get("compressed"),
                       original_accuracy=acc.get("original"))
        if rep["status"] != "PASSED" and not note:
            row["note"] = "; ".join(rep["gate"]["failures"])[:300]
    return row


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "bytes":
        return f"{v / 1024:.1f} KiB"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "ms":
        return f"{v:.3f} ms"
    if kind == "acc":
        return f"{v:.4f}"
    if kind == "s":
        return f"{v:.1f}"
    return str(v)


def summary_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "target", "status", "size", "original", "sparsity", "latency", "accuracy", "time (s)", "note"]
    out = []
    for r in rows:
        out.append([r["model"], r["target"], r["status"], _fmt(r["size_bytes"], "bytes"), _fmt(r["original_bytes"], "bytes"),
                    _fmt(r["sparsity"], "pct"), _fmt(r["latency_ms"], "ms") + (f" ({r['latency_source']})" if r["latency_source"] else ""),
                    _fmt(r["accuracy"], "acc"), _fmt(r["seconds"], "s"), r["note"] or ""])
    return header, out


def _markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    header, body = summary_table(rows)
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["# compress batch summary", "",
             f"{info['jobs']} jobs: {info['passed']} passed, {info['failed']} failed, {info['reused']} reused unchanged; "
             f"executor {info['executor']['describe']}; {info['executor']['tasks']} tasks, {info['executor']['retries']} retried; "
             f"wall {info['wall_seconds']:.1f} s", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def _fix_paths(bdir: Path, plan: Any, rep: dict[str, Any], model_path: Path) -> dict[str, Any]:
    """Rewrite the path-bearing, unhashed bundle files with the driver-side paths."""
    from compressor import bundle as bundle_mod
    from compressor import report as report_mod
    from compressor.recipe import dump_recipe

    rep = dict(rep)
    rep["model"] = {**rep["model"], "path": str(model_path)}
    rep["bundle"] = str(plan.output)
    man = json.loads((bdir / "manifest.json").read_text())
    man["source_model"] = {**man["source_model"], "path": str(model_path)}
    bundle_mod.write_json(bdir / "manifest.json", man)
    bundle_mod.write_json(bdir / "report.json", rep)
    (bdir / "report.md").write_text(report_mod.markdown(rep))
    (bdir / "recipe.yaml").write_text(dump_recipe(plan.recipe(plan.output.resolve())))
    return rep


def run_batch(models: list[str], targets_arg: str, base: Options, out_dir: Path, executor: Any, say: Say) -> int:
    from compressor import pipeline
    from compressor.executor import progress_printer

    if not models:
        raise UsageError("compress batch needs at least one model")
    tags = [t.strip() for t in targets_arg.split(",") if t.strip()]
    if not tags:
        raise UsageError("--target is empty", hint="e.g. --target x86,arm")
    if base.dump_ir:
        raise UsageError("--dump-ir is not supported by compress batch (jobs run on other nodes)")
    stems = [Path(m).name.rsplit(".", 1)[0] for m in models]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise UsageError(f"two models share the name {dup[0]!r}; bundles are named MODEL.TARGET", hint="rename or copy one of them")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output {out_dir} exists and is not a directory")
    t_start = time.perf_counter()

    # shared files: hashed once, put once
    files: dict[str, Any] = {}
    file_hashes: dict[str, Any] = {}
    for flag in _FILE_FLAGS:
        v = getattr(base, flag)
        if v:
            p = Path(v)
            if not p.is_file():
                raise InputError(f"--{flag} file not found: {p}")
            arr = _read_arr(p)
            files[flag] = (p.name, executor.put(arr))
            file_hashes[flag] = sha256_bytes(arr.tobytes())
    if base.plugin:
        files["plugin"] = [(Path(p).name, executor.put(_read_arr(Path(p)))) for p in base.plugin]
        file_hashes["plugin"] = [sha256_bytes(Path(p).read_bytes()) for p in base.plugin]

    state = out_dir / STATE_DIR
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    todo: list[tuple[tuple[int, int], dict[str, Any], Any, Any, Path]] = []  # (slot, spec, model ref, plan, model path)
    for mi, m in enumerate(models):
        mpath = Path(m)
        try:
            if not mpath.is_file():
                raise InputError(f"model file not found: {mpath}")
            arr = _read_arr(mpath)
        except (CompressorError, OSError) as exc:
            msg = exc.one_line() if isinstance(exc, CompressorError) else f"cannot read {mpath}: {exc}"
            for ti, t in enumerate(tags):
                rows[(mi, ti)] = _row(mpath.name, t, Path("-"), None, "FAILED", msg)
            continue
        msha = sha256_bytes(arr.tobytes())
        mref = None
        for ti, t in enumerate(tags):
            opts = dataclasses.replace(base, model=str(mpath), target=t, output=None, force=False, dry_run=False,
                                       ignore=list(base.ignore), input_shape=list(base.input_shape), plugin=list(base.plugin),
                                       passes=None if base.passes is None else [dict(p) for p in base.passes])
            plan = pipeline.plan(opts)  # flags and targets resolved here: a usage error stops the batch before any work
            bundle = out_dir / f"{stems[mi]}.{plan.spec.tag}.bundle"
            plan.output = bundle
            opts.output = str(bundle)
            key = job_key(msha, plan.recipe(out_dir.resolve()), file_hashes)
            side = state / f"{bundle.name}.json"
            if not base.force and (bundle / "manifest.json").is_file() and side.is_file():
                try:
                    prev = json.loads(side.read_text())
                except ValueError:
                    prev = {}
                if prev.get("key") == key and prev.get("row"):
                    rows[(mi, ti)] = {**prev["row"], "note": ("reused: inputs and flags unchanged; " + (prev["row"].get("note") or "")).rstrip("; ")}
                    rows[(mi, ti)]["reused"] = True
                    continue
            if bundle.exists() and not (bundle / "manifest.json").is_file() and not base.force:
                rows[(mi, ti)] = _row(mpath.name, plan.spec.tag, bundle, None, "FAILED",
                                      f"{bundle} exists and is not a bundle (use --force to replace it)")
                continue
            if mref is None:
                mref = executor.put(arr)
            spec = {"options": {f.name: getattr(opts, f.name) for f in dataclasses.fields(Options)},
                    "model_name": mpath.name, "model_path": str(mpath), "bundle_name": bundle.name, "key": key}
            todo.append(((mi, ti), spec, mref, plan, mpath))

    n_jobs = len(models) * len(tags)
    say(f"batch: {len(models)} model(s) x {len(tags)} target(s) = {n_jobs} jobs; {len(todo)} to run, "
        f"{sum(1 for r in rows.values() if r.get('reused'))} up to date; executor {executor.describe()}")
    if base.dry_run:
        for slot, spec, _, plan, _ in todo:
            say(f"  would run: {spec['model_name']} -> {plan.output}")
        return 0

    outcomes = []
    if todo:
        outcomes = executor.map(run_job, [(spec, mref, files) for _, spec, mref, _, _ in todo], label="batch",
                                progress=progress_printer(say))
    stats = executor.last_stats
    out_dir.mkdir(parents=True, exist_ok=True)
    state.mkdir(exist_ok=True)
    for (slot, spec, _, plan, mpath), o in zip(todo, outcomes):
        tag, bundle = plan.spec.tag, plan.output
        if not o.ok or "error" in o.value:
            err = o.error if not o.ok else o.value["error"]
            rows[slot] = _row(mpath.name, tag, bundle, None, "FAILED", err, round(o.seconds, 2), o.attempts)
            say(f"  FAILED {mpath.name} -> {tag}: {err}")
            continue
        res = o.value
        stage = out_dir / f".{bundle.name}.incoming"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        with tarfile.open(fileobj=io.BytesIO(res["tar"]), mode="r") as tf:
            tf.extractall(stage, filter="data")
        rep = _fix_paths(stage, plan, res["report"], mpath)
        if bundle.exists():
            shutil.rmtree(bundle)  # a stale bundle of this batch (different key) or --force
        os.replace(stage, bundle)
        row = _row(mpath.name, tag, bundle, rep, rep["status"], "", res["seconds"], o.attempts)
        if o.attempts > 1:
            row["note"] = (row["note"] + f"; retried {o.attempts - 1}x after a worker failure").lstrip("; ")
        rows[slot] = row
        (state / f"{bundle.name}.json").write_text(json.dumps({"key": spec["key"], "row": row}, indent=2))
        say(f"  {rep['status']} {mpath.name} -> {bundle} ({res['seconds']:.1f} s on {res['worker']})")

    ordered = [rows[(mi, ti)] for mi in range(len(models)) for ti in range(len(tags))]
    passed = sum(r["status"] == "PASSED" for r in ordered)
    failed = len(ordered) - passed
    info = {"jobs": len(ordered), "passed": passed, "failed": failed, "reused": sum(bool(r.get("reused")) for r in ordered),
            "executor": {"describe": executor.describe(), **stats.to_dict()}, "wall_seconds": round(time.perf_counter() - t_start, 2),
            "tool": {"name": "compressor", "version": compressor.__version__}}
    from compressor import bundle as bundle_mod
    from compressor import report as report_mod

    bundle_mod.write_json(out_dir / "summary.json", {**info, "rows": ordered})
    (out_dir / "summary.md").write_text(_markdown(ordered, info))
    say("")
    header, body = summary_table(ordered)
    for line in report_mod.table(body, header):
        say(line)
    if stats.retries:
        say(f"warning: {stats.retries} task attempt(s) were retried after worker failures (tasks {stats.retried_tasks})")
    say(f"RESULT {'PASSED' if failed == 0 else 'FAILED'} batch jobs={len(ordered)} passed={passed} failed={failed} "
        f"reused={info['reused']} retries={stats.retries} executor={executor.name} summary={out_dir / 'summary.md'}")
    return 0 if failed == 0 else 3
