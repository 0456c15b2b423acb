"""Model-zoo CNNs (the onnx package's own test models) through ``compress``: the x86 artifact's latency
beside onnxruntime on the original, dense and sparse, on the host's ISA and on AVX2 code.

    .venv/bin/python bench/cnn_zoo.py                                  # the default grid (~15 min, 2 cores)
    .venv/bin/python bench/cnn_zoo.py --models resnet50 --sparsities 0,0.9 --patterns unstructured
    .venv/bin/python bench/cnn_zoo.py --md bench/cnn_zoo.md            # and write the table

Models: ``onnx/backend/test/data/light/light_<name>.onnx`` (ResNet-50, Inception v1, DenseNet-121,
SqueezeNet, VGG-19, ...: the model-zoo graphs at opset 8-9, their weights replaced by ConstantOfShape
nodes). Every ConstantOfShape weight is materialised with seeded random values shaped for the layer
(He-normal conv/Gemm weights; BatchNormalization scale 0.3, variance ~1, small shifts and biases) so
that the activations stay finite through 50+ layers and magnitude pruning has something to rank. The
graph, shapes and FLOPs are the model zoo's; the values are not pretrained (accuracy is not measured
here: bench/real_models.md is the quality suite).

Each cell is one in-process ``compress MODEL --target T --sparsity S [--pattern P] --no-gate
--verify-samples 2`` (gate off: random weights and random inputs give near-uniform softmax outputs).
After all builds of a model, its artifacts and onnxruntime (ORT_ENABLE_ALL, default threads) on the
original are timed interleaved, ``--rounds`` rounds, median of 15 calls each, best round reported;
``TVM_NUM_THREADS`` = physical cores (as the bundle runner sets it). ``x ORT`` = onnxruntime time /
artifact time (> 1: the artifact is faster).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_MODELS = ("resnet50", "inception_v1", "densenet121", "squeezenet")


def light_path(name: str) -> Path:
    import onnx

    return Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


# models that are not light model-zoo graphs: built by models.large with seeded weights
GENERATED = {
    # BERT-base width (d_model 768, 12 heads, MLP 3072, seq 128; 2 of its 12 layers): issue 20's encoder row
    "encoder-base": dict(seq=128, dim=768, heads=12, layers=2, mlp_dim=3072),
}


def materialize(name: str, out: Path, seed: int = 0) -> Path:
    """The light model with every ConstantOfShape weight replaced by a seeded random initializer (or a
    ``GENERATED`` model, built with seeded weights)."""
    import onnx

    if name in GENERATED:
        from models.large import build_transformer_large

        return out if out.is_file() else build_transformer_large(out, seed=seed, **GENERATED[name])
    from onnx import numpy_helper

    model = onnx.load(str(light_path(name)))
    g = model.graph
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}

    def value(t: str) -> np.ndarray:
        return inits[t] if t in inits else numpy_helper.to_array(consts[t].attribute[0].t)

    role: dict[str, str] = {}
    for n in g.node:
        if n.op_type == "BatchNormalization":
            for k, r in zip(n.input[1:], ("scale", "shift", "mean", "var")):
                role[k] = r
    rng = np.random.default_rng(seed)
    new = []
    for n in g.node:
        if n.op_type != "ConstantOfShape":
            continue
        shape = [int(d) for d in value(n.input[0])]
        out_name = n.output[0]
        if len(shape) >= 2:
            fan = int(np.prod(shape[1:]))
            a = rng.standard_normal(shape) * np.sqrt(2.0 / fan)
        else:
            r = role.get(out_name, "bias")
            a = {"scale": 0.3 + 0.05 * rng.standard_normal(shape), "var": 1 + 0.1 * np.abs(rng.standard_normal(shape))
                 }.get(r, 0.05 * rng.standard_normal(shape))
        new.append(numpy_helper.from_array(a.astype(np.float32), out_name))
    made = {t.name for t in new}
    keep = [n for n in g.node if not (n.op_type == "ConstantOfShape" and n.output[0] in made)]
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new)
    used = {i for n in g.node for i in n.input}
    live = [n for n in g.node if n.op_type != "Constant" or n.output[0] in used]
    del g.node[:]
    g.node.extend(live)
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    names = {i.name for i in g.initializer} | set(inits)  # (IR 3 lists initializers as inputs too)
    ins = [i for i in g.input if i.name not in names and i.name in used]
    del g.input[:]
    g.input.extend(ins)
    model.ir_version = max(model.ir_version, 4)  # initializers no longer listed as inputs
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def compile_cell(model: Path, target: str, sparsity: float, pattern: str, out: Path) -> dict:
    from compressor.cli import main as compress

    args = [str(model), "--target", target, "-o", str(out), "--force", "--no-gate", "--verify-samples", "2"]
    if sparsity > 0:
        args += ["--sparsity", str(sparsity)] + (["--pattern", pattern] if pattern != "unstructured" else [])
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = compress(args)
    wall = time.perf_counter() - t0
    rep = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    lowered = kept = 0
    for p in rep.get("target_passes", []):
        if p.get("name") == "lower.sparse":
            lowered = int((p.get("stats") or {}).get("lowered", 0))
            kept = int((p.get("stats") or {}).get("kept_dense", 0))
    libs = sorted(out.glob("model_*.so"))
    return {"code": code, "wall_s": round(wall, 1), "lowered": lowered, "kept_dense": kept,
            "so": str(libs[0]) if libs else None, "sparsity": ((rep.get("stats") or {}).get("compressed") or {}).get("sparsity"),
            "tail": buf.getvalue().strip().splitlines()[-1:] if code not in (0, 3) else []}


def time_all(model: Path, libs: list[str], rounds: int) -> tuple[float, dict[str, float]]:
    import onnxruntime as ort

    from targets import tvm_backend

    sess = ort.InferenceSession(str(model))
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    best = {lib: float("inf") for lib in libs}
    ort_best = float("inf")
    for _ in range(rounds):
        for lib in libs:
            time.sleep(0.3)
            best[lib] = min(best[lib], tvm_backend.time_library(lib, {inp.name: x}, repeat=15))
        time.sleep(0.5)  # TVM's pool workers spin a while after a call: let them sleep before onnxruntime
        for _ in range(3):
            sess.run(None, {inp.name: x})
        ts = []
        for _ in range(15):
            t0 = time.perf_counter()
            sess.run(None, {inp.name: x})
            ts.append(time.perf_counter() - t0)
        ort_best = min(ort_best, float(np.median(ts)))
    return ort_best, best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--sparsities", default="0,0.7,0.9")
    ap.add_argument("--patterns", default="unstructured,8x1")
    ap.add_argument("--targets", default="x86,x86-avx2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", help="folder for models and bundles (default: a temporary folder)")
    ap.add_argument("--md", default="", help="write the table to this markdown file")
    a = ap.parse_args(argv)
    from targets.dense_kernels import default_runtime_threads, physical_cores

    default_runtime_threads()
    from bench.real_models import host_cpu, host_isa

    work = Path(a.work or tempfile.mkdtemp(prefix="cnn_zoo."))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.models.split(","):
        model = materialize(name, work / f"{name}.onnx")
        cells = []
        for tgt in a.targets.split(","):
            for sp in (float(s) for s in a.sparsities.split(",")):
                for pat in (a.patterns.split(",") if sp > 0 else ["unstructured"]):
                    tag = f"{name}.{tgt}.s{int(round(sp * 100))}.{pat.replace(':', '_')}"
                    c = compile_cell(model, tgt, sp, pat, work / f"{tag}.bundle")
                    c.update(model=name, target=tgt, req=sp, pattern=pat)
                    cells.append(c)
                    print(f"built {tag}: exit {c['code']}, {c['lowered']} lowered, {c['wall_s']} s {c['tail']}",
                          flush=True)
        libs = [c["so"] for c in cells if c["so"]]
        ort_s, best = time_all(model, libs, a.rounds)
        for c in cells:
            c["ort_ms"] = ort_s * 1e3
            c["tvm_ms"] = best.get(c["so"], float("nan")) * 1e3 if c["so"] else float("nan")
            rows.append(c)
            print(f"{c['model']:13s} {c['target']:9s} {int(c['req'] * 100):3d}% {c['pattern']:12s} "
                  f"lowered {c['lowered']:3d} artifact {c['tvm_ms']:8.2f} ms  ORT {c['ort_ms']:8.2f} ms  "
                  f"x ORT {c['ort_ms'] / c['tvm_ms']:5.2f}", flush=True)
    head = (f"Host: {host_cpu()}, {host_isa()}; TVM threads {physical_cores()}, onnxruntime default threads. "
            f"Command: `.venv/bin/python bench/cnn_zoo.py --models {a.models} --sparsities {a.sparsities} "
            f"--patterns {a.patterns} --targets {a.targets}`.\n\n")
    table = ["| model | target | sparsity | pattern | actual | sparse layers (kept dense) | artifact ms | onnxruntime ms "
             "(original) | x onnxruntime |", "|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        table.append(f"| {c['model']} | {c['target']} | {int(c['req'] * 100)}% | {c['pattern'] if c['req'] else '-'} | "
                     f"{(c['sparsity'] or 0):.3f} | {c['lowered']} ({c['kept_dense']}) | {c['tvm_ms']:.2f} | "
                     f"{c['ort_ms']:.2f} | {c['ort_ms'] / c['tvm_ms']:.2f}x |")
    text = head + "\n".join(table) + "\n"
    print(text)
    if a.md:
        Path(a.md).write_text("# Model-zoo CNNs: x86 artifact vs onnxruntime, dense and sparse\n\n"
                              + (__doc__ or "").split("\n\n", 1)[1] + "\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
