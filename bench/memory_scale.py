"""Wall time and peak resident memory of whole `compress` runs as the model grows (issue 19).

Generated ReLU MLPs with external data (``models.large.build_mlp_external``: weights in one
page-aligned ``.data`` file beside the model) at about 16M, 140M and 1B parameters, each compressed
with ``--sparsity 0.9``, ``--structured 0.2`` and ``--quantize int8`` for ``--target x86``, one
``compress`` process per run. Peak memory is the child's ``ru_maxrss`` (``os.wait4``: that process
alone, its whole lifetime); the time and memory per stage come from the run's report.json
(``stages``). ``--no-gate``: random weights fail any accuracy bound at 90%, and the accuracy search
would then do a different amount of work at each size; the gate's measurements still run.

A tiny model of the same family gives the fixed cost (interpreter, onnxruntime, TVM, torch imports),
reported beside the ratio over the weight bytes.

    .venv/bin/python bench/memory_scale.py [--sizes 16M,140M,1B] [--modes sparsity,structured,int8]
                                           [--no-compile] [--out bench/memory_scale.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZES = {"tiny": (64, 2), "16M": (2048, 4), "140M": (4096, 8), "1B": (8192, 15)}  # (width, hidden layers)
MODES = {"sparsity": ["--sparsity", "0.9"], "structured": ["--structured", "0.2"], "int8": ["--quantize", "int8"]}
DEFAULT_CACHE = Path.home() / ".cache" / "compressor" / "scale"


def model_for(size: str, cache: Path) -> Path:
    from models.large import build_mlp_external

    width, layers = SIZES[size]
    path = cache / size / f"mlp_{size}.onnx"
    if not path.exists() or not (path.parent / (path.name + ".data")).exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_mlp_external(path, width, layers)
    return path


def run_one(model: Path, flags: list[str], out: Path, timeout: float, max_mb: float = 0.0) -> dict:
    cmd = [str(REPO / ".venv" / "bin" / "compress"), str(model), "--target", "x86", "--no-gate", "--force", "--quiet",
           "-o", str(out), *flags]
    t0 = time.perf_counter()
    errf = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf, text=True)
    deadline = t0 + timeout
    tree_peak = 0.0
    try:
        import psutil

        root = psutil.Process(proc.pid)
    except Exception:  # noqa: BLE001 - no psutil: the process's own peak only
        root = None
    import threading

    stop, killed = threading.Event(), threading.Event()

    def sample() -> None:  # the run's processes together (compile and measure run in child processes)
        nonlocal tree_peak
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                tree_peak = max(tree_peak, sum(p.memory_info().rss for p in procs) / 2**20)
                if max_mb and tree_peak > max_mb:  # stop before the kernel's OOM killer picks a process
                    killed.set()
                    for p in procs[::-1]:
                        p.kill()
            except Exception:  # noqa: BLE001 - a child ended between listing and reading
                pass
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True) if root is not None else None
    if sampler:
        sampler.start()
    # stderr to a file, not a pipe: a long run's output would fill the pipe and stall it
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, ru = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    stop.set()
    if sampler:
        sampler.join()
    wall = time.perf_counter() - t0
    errf.seek(0)
    err = errf.read()
    errf.close()
    code = os.waitstatus_to_exitcode(status)
    row = {"exit": code, "wall_s": round(wall, 1), "peak_mb": round(ru.ru_maxrss / 1024, 1),
           "tree_peak_mb": round(tree_peak, 1) if root is not None else None, "cmd": " ".join(cmd)}
    rep = out / "report.json"
    if rep.exists() and code in (0, 3):
        r = json.loads(rep.read_text())
        row["stages"] = r.get("stages", [])
        row["runtime"] = (r.get("runtime") or {}).get("name")
    elif killed.is_set():
        row["error"] = f"stopped at {tree_peak:.0f} MB resident (--max-mb {max_mb:.0f})"
    else:
        row["error"] = " ".join(err.strip().splitlines()[-1:])[:300] if err.strip() else f"exit {code}"
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="16M,140M,1B")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--no-compile", action="store_true", help="pass --no-compile (the TVM stage left out)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--max-mb", type=float, default=0.0,
                    help="stop a run whose processes hold more than this (MB); default: 85%% of the machine's memory")
    ap.add_argument("--results", type=Path, default=None, help="JSON of every row (resumes: rows done are kept)")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    a = ap.parse_args(argv)
    from targets.host import detect_host

    results = json.loads(a.results.read_text()) if a.results and a.results.exists() else {}
    extra = ["--no-compile"] if a.no_compile else []
    max_mb = a.max_mb or 0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    for size in ["tiny", *a.sizes.split(",")]:
        model = model_for(size, a.cache)
        wbytes = (model.parent / (model.name + ".data")).stat().st_size
        for mode in a.modes.split(","):
            key = f"{size}/{mode}{'/nc' if a.no_compile else ''}"
            if key in results:
                continue
            row = run_one(model, MODES[mode] + extra, a.cache / size / f"out_{mode}", a.timeout, max_mb)
            row.update(size=size, mode=mode, weight_mb=round(wbytes / 2**20, 1))
            results[key] = row
            print(json.dumps({k: v for k, v in row.items() if k != "stages"}), flush=True)
            if a.results:
                a.results.write_text(json.dumps(results, indent=1))
    h = detect_host()
    lines = report(results, f"{h.model_name}, {os.cpu_count()} logical CPUs, {h.arch} ({h.simd_summary})")
    print("\n".join(lines))
    if a.out:
        a.out.write_text("\n".join(lines) + "\n")
    return 0


def report(results: dict, host: str) -> list[str]:
    def peak(r: dict) -> float:
        return max(r["peak_mb"], r.get("tree_peak_mb") or 0.0)

    fixed = {r["mode"] + ("/nc" if k.endswith("/nc") else ""): peak(r) for k, r in results.items() if k.startswith("tiny/")}
    lines = ["# Whole `compress` runs as the model grows: wall time and peak resident memory", "",
             f"Measured by `bench/memory_scale.py` on {host}. Models: `models.large.build_mlp_external` (ReLU MLP, "
             "random weights, external data). Every run: `compress MODEL --target x86 --no-gate --force --quiet` + the "
             "mode's flags. peak = the largest sum of resident memory over the run's processes (the CLI and the "
             "compile / measurement children it starts; sampled every 0.1 s), else the CLI process's ru_maxrss; "
             "x weights = peak / weight bytes (lower is better; the "
             f"issue's bound is 3x); fixed = the same command (same mode) on a {SIZES['tiny'][0]}-wide model "
             f"(interpreter, libraries, the compile child: "
             f"{', '.join(f'{k} {v:.0f} MB' for k, v in fixed.items()) or '?'}), over weights = "
             "(peak - fixed) / weight bytes.", "",
             "| size | mode | compile | exit | weights MB | wall s | peak MB | x weights | over weights | runtime | "
             "slowest stages (s) | peak after stage (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        if key.startswith("tiny/"):
            continue
        stages = r.get("stages") or []
        slow = ", ".join(f"{s['stage']} {s['seconds']:.0f}" for s in sorted(stages, key=lambda s: -s["seconds"])[:3])
        peaks = ", ".join(f"{s['stage']} {s['peak_rss_mb']:.0f}" for s in stages)
        f = fixed.get(r["mode"] + ("/nc" if key.endswith("/nc") else ""))
        over = "" if f is None else f"{(peak(r) - f) / r['weight_mb']:.2f}"
        lines.append(f"| {r['size']} | {r['mode']} | {'no' if key.endswith('/nc') else 'yes'} | "
                     f"{r['exit']}{': ' + r['error'] if r.get('error') else ''} | {r['weight_mb']:.0f} | {r['wall_s']:.0f} | "
                     f"{peak(r):.0f} | {peak(r) / r['weight_mb']:.2f} | {over} | {r.get('runtime') or ''} | "
                     f"{slow} | {peaks} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
