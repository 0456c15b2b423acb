"""Which architectures compile for a cuda target (compile only: no GPU needed, nvcc is).

    .venv/bin/python bench/cuda_coverage.py                      # everything, table on stdout
    .venv/bin/python bench/cuda_coverage.py --md bench/cuda.md   # and write the table section
    .venv/bin/python bench/cuda_coverage.py --only hf_mobilenetv2 light_resnet50 --pruned

Architectures: the models/ zoo (``models.build.MODEL_NAMES`` + digits_cnn), the tiny
transformers models (``models.hf_zoo.HF_MODELS``, used by the structured-pruning tests) and
their 224 px bench variants (``HF_BENCH``), the benchmark-scale models of ``models.large``,
the structured-pruning tests' hand-built topologies (tests/passes/test_prune_channels.py),
and the onnx package's light model-zoo models (``onnx/backend/test/data/light``: ResNet-50,
Inception, DenseNet-121, ...; ConstantOfShape weights, folded at load). ``--pruned`` also
compiles each after ``prune.channels`` at ratio 0.3 (odd channel counts).

Each model goes through the load stage, the target's lowering passes and
``CudaTarget.compile`` (dlight schedules per function, nvcc fatbin, cubin verified in the
.so), as ``compress MODEL --target cuda`` does after its passes. Per model: result, seconds,
CUDA kernels, functions per dlight rule, and the functions whose first matching rule failed.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOPOLOGIES = ["ops_zoo_cnn", "ops_zoo_seq", "ops_zoo_seq_cumsum", "concat_model"]
LIGHT = ["light_resnet50", "light_inception_v1", "light_inception_v2", "light_densenet121", "light_squeezenet",
         "light_shufflenet", "light_bvlc_alexnet", "light_zfnet512", "light_vgg19"]
LARGE = ["mlp-large", "gru-large", "transformer-large", "mobilenetv2-large"]


def all_names() -> list[str]:
    from models.build import MODEL_NAMES
    from models.hf_zoo import HF_BENCH, HF_MODELS

    return [*MODEL_NAMES, "digits", *HF_MODELS, *HF_BENCH, *LARGE, *TOPOLOGIES, *LIGHT]


def source(name: str, cache: Path):
    """ONNX path or ModelProto of ``name``."""
    import onnx

    if name.startswith("light_"):
        return Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light" / f"{name}.onnx"
    if name.startswith("hf_"):
        from models.hf_zoo import ensure_built

        return ensure_built(name, cache)
    if name in TOPOLOGIES:
        tp = importlib.import_module("tests.passes.test_prune_channels")
        return tp.ops_zoo_seq(cumsum=True) if name == "ops_zoo_seq_cumsum" else getattr(tp, name)()
    if name in LARGE:
        from models import large

        path = cache / f"{name}.onnx"
        if not path.is_file():
            getattr(large, "build_" + name.replace("-", "_"))(path)
        return path
    from models.zoo import ensure_built

    return ensure_built(name, cache)


def compile_one(name: str, tag: str, cache: Path, pruned: bool) -> dict:
    import onnx

    from compressor import ir
    from compressor.errors import CompressorError
    from compressor.pipeline import lower_for_target
    from targets import resolve

    tgt, spec = resolve(tag)
    row: dict = {"model": name + (" (pruned 0.3)" if pruned else "")}
    t0 = time.perf_counter()
    try:
        model = source(name, cache)
        if not isinstance(model, onnx.ModelProto):
            model = ir.load(Path(model), {})
        if pruned:
            from tests.passes.prune_channels_util import zero_then_remove

            model = zero_then_remove(model, ratio=0.3, round_to=1)["pruned"]
        lowered, _ = lower_for_target(model, tgt, spec, lambda *a, **k: None)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "model.onnx"
            onnx.save(lowered, str(src))
            art = tgt.compile(src, spec, Path(tmp), {})
        sch = art.details["schedules"]
        row.update(ok=True, kernels=art.details["kernels"], by_rule=sch["by_rule"],
                   fallbacks=[f"{f['function']} ({f['failed'][0][0]} -> {f['rule']})" for f in sch["fallbacks"]])
    except CompressorError as exc:
        row.update(ok=False, error=exc.one_line())
    except Exception as exc:  # noqa: BLE001 - a bench row, not a crash
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def table(rows: list[dict]) -> str:
    out = ["| model | artifact | s | CUDA kernels | functions per dlight rule | fell back (first failing rule -> rule used) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        if r["ok"]:
            rules = ", ".join(f"{k} {v}" for k, v in r["by_rule"].items())
            fb = "; ".join(r["fallbacks"]) or "none"
            out.append(f"| {r['model']} | yes | {r['seconds']} | {r['kernels']} | {rules} | {fb} |")
        else:
            out.append(f"| {r['model']} | **no**: {r['error']} | {r['seconds']} | | | |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", default="cuda")
    ap.add_argument("--only", nargs="+", help="model names (default: all)")
    ap.add_argument("--pruned", action="store_true", help="also compile each after prune.channels at ratio 0.3")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "compressor-cuda-coverage")
    ap.add_argument("--md", type=Path, help="replace the table between the coverage markers of this file")
    a = ap.parse_args(argv)
    from targets.cuda import find_nvcc

    if find_nvcc() is None:
        print("no nvcc: cannot build CUDA device code; nothing to check")
        return 0
    a.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.only or all_names():
        for pruned in (False, True) if a.pruned else (False,):
            if pruned and (name.startswith("light_") or name in LARGE or name.endswith("_224")):
                continue
            rows.append(compile_one(name, a.tag, a.cache, pruned))
            r = rows[-1]
            print(f"{r['model']}: {'ok' if r['ok'] else 'FAILED ' + r['error']} ({r['seconds']} s)", flush=True)
    text = table(rows)
    print(text)
    if a.md:
        begin, end = "<!-- coverage:begin -->", "<!-- coverage:end -->"
        doc = a.md.read_text() if a.md.is_file() else f"{begin}\n{end}\n"
        head, _, rest = doc.partition(begin)
        _, _, tail = rest.partition(end)
        cmd = "bench/cuda_coverage.py " + " ".join(argv if argv is not None else sys.argv[1:])
        a.md.write_text(f"{head}{begin}\ncommand: `{cmd.strip()}`\n\n{text}\n{end}{tail}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
