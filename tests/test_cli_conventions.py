"""Output conventions of the CLI: --version, "did you mean" for mistyped subcommands and flags, plain-value
checks before the heavy imports."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import onnx

from compressor.errors import EXIT_INPUT, EXIT_USAGE
from tests.conftest import REPO, mlp_model, run_cli_subprocess
from tests.test_cli_bad_input import _assert_one_line_error

FAST = ["--no-compile", "--no-latency", "--no-gate"]
HEAVY = ("tvm", "onnxruntime", "torch", "onnx_graphsurgeon", "onnx")


def _model_file(tmp_path, name="m.onnx"):
    p = tmp_path / name
    onnx.save(mlp_model(), p)
    return p


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (nothing imported yet); it prints a JSON line last."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)


# ----------------------------------------------------------------------------- --version


def test_version(cli):
    r = cli("--version")
    assert r.code == 0 and r.err == "", r
    assert r.out == f"compress {metadata.version('compressor')}\n"


def test_version_process_imports_nothing_heavy():
    r = run_cli_subprocess("--version")
    assert r.code == 0 and r.out.strip() == f"compress {metadata.version('compressor')}", r
    p = _fresh_python("import json, sys\n"
                      "from compressor.cli import main\n"
                      "code = main(['--version'])\n"
                      f"print(json.dumps([code, sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1]) == [0, []]


# ----------------------------------------------------------------------------- did you mean


def test_mistyped_subcommand_is_not_a_model_path(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("anlyze", "m.onnx")
    _assert_one_line_error(r, EXIT_USAGE, "unknown command")
    assert r.err.strip() == "compress: error: unknown command 'anlyze' (did you mean 'analyze'?)"
    _assert_one_line_error(cli("bnech", "b"), EXIT_USAGE, "unknown command 'bnech' (did you mean 'bench'?)")


def test_first_argument_that_exists_or_is_not_close_stays_a_model_path(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "anlyze").write_text("not a model\n")  # an existing file is a model, whatever its name
    _assert_one_line_error(cli("anlyze", "-o", tmp_path / "o"), EXIT_INPUT, "not an ONNX model")
    _assert_one_line_error(cli("bench.onnx"), EXIT_INPUT, "model file not found: bench.onnx")  # a path, not a command
    _assert_one_line_error(cli("zzqqx"), EXIT_INPUT, "model file not found: zzqqx")  # close to nothing


def test_mistyped_flag_gets_a_suggestion(cli, tmp_path):
    m = _model_file(tmp_path)
    _assert_one_line_error(cli(m, "--sparsty", "0.5"), EXIT_USAGE,
                           "unrecognized arguments: --sparsty 0.5 (did you mean '--sparsity'?)")
    _assert_one_line_error(cli(m, "--sparsty=0.5"), EXIT_USAGE, "(did you mean '--sparsity'?)")
    _assert_one_line_error(cli(m, "--no-compiel", "--quantise", "int8"), EXIT_USAGE,
                           "(did you mean '--no-compile'?) (did you mean '--quantize'?)")
    r = cli(m, "--zzzzzz")
    _assert_one_line_error(r, EXIT_USAGE, "unrecognized arguments: --zzzzzz")
    assert "did you mean" not in r.err
    # subcommands too
    _assert_one_line_error(cli("analyze", m, "--calib", "c.npz", "--sampels", "3"), EXIT_USAGE, "(did you mean '--samples'?)")
    _assert_one_line_error(cli("compare", m, m, "--evl", "e.npz"), EXIT_USAGE, "(did you mean '--eval'?)")


# ----------------------------------------------------------------------------- cheap checks first


def test_plain_value_checks_fail_before_heavy_imports(tmp_path):
    """check_args (and main's path to it) rejects bad values and missing or non-file models with nothing of
    onnx / onnxruntime / TVM / torch imported."""
    m = _model_file(tmp_path)
    code = ("import json, sys\n"
            "from compressor.cli import check_args, main\n"
            "from compressor.errors import CompressorError\n"
            "from compressor.recipe import Options\n"
            "codes = []\n"
            f"for kw in [dict(model={str(m)!r}, sparsity=1.5), dict(model={str(tmp_path / 'nope.onnx')!r}), "
            f"dict(model={str(tmp_path)!r}), dict(model={str(m)!r}, quantize='int3')]:\n"
            "    try:\n"
            "        check_args(Options(**kw))\n"
            "        codes.append(0)\n"
            "    except CompressorError as e:\n"
            "        codes.append(e.exit_code)\n"
            f"codes.append(main([{str(m)!r}, '--sparsity', '1.5']))\n"
            f"codes.append(main([{str(tmp_path / 'nope.onnx')!r}, '--target', 'arm']))\n"
            f"codes.append(main([{str(tmp_path)!r}]))\n"
            f"print(json.dumps([codes, sorted(x for x in {HEAVY!r} if x in sys.modules)]))\n")
    p = _fresh_python(code)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1]) == [[EXIT_USAGE, EXIT_INPUT, EXIT_INPUT, EXIT_USAGE,
                                                       EXIT_USAGE, EXIT_INPUT, EXIT_INPUT], []], p.stderr
    assert "--sparsity must be in [0, 1), got 1.5" in p.stderr and "model path is not a file" in p.stderr


def test_cheap_checks_through_the_cli(cli, tmp_path):
    _assert_one_line_error(cli(_model_file(tmp_path), "--sparsity", "1.5"), EXIT_USAGE, "--sparsity must be in [0, 1)")
    _assert_one_line_error(cli(tmp_path, "-o", tmp_path / "o"), EXIT_INPUT, "model path is not a file")
    _assert_one_line_error(cli(tmp_path / "nope.onnx"), EXIT_INPUT, "model file not found")
    r = run_cli_subprocess(tmp_path / "nope.onnx", "--sparsity", "0.5")
    _assert_one_line_error(r, EXIT_INPUT, "model file not found")


def test_report_explains_why_not_faster(cli, tmp_path):
    """report.md lists the target's passes and every layer they kept dense with the reason, and the RESULT
    line gives the sparsity over the pruned layers beside the requested one (issue 19)."""
    model, calib = REPO / "models" / "digits_cnn.onnx", REPO / "models" / "digits_calib.npz"
    r = cli(model, "--sparsity", "0.5", "--calib", calib, "--no-latency", "-o", tmp_path / "o")
    assert r.code == 0, r
    last = r.out.strip().splitlines()[-1]
    assert "layers_sparsity=0.500/0.500" in last, last
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    md = (tmp_path / "o" / "report.md").read_text()
    assert "## Target passes" in md and "| lower.sparse" in md, md
    assert "## Why not faster" in md and "requested 0.500" in md
    kept = [lay["node"] for p in rep["target_passes"] for lay in p["stats"].get("layers", []) if not lay.get("lowered", True)]
    other = [w.split(":", 1)[0] for p in rep["target_passes"] for w in p["warnings"] if "kept dense" in w or "not lowered" in w]
    assert kept or other
    assert all(name in md for name in kept + other), (kept, other)


def test_quiet_and_json_output(cli, tmp_path):
    model = REPO / "models" / "digits_cnn.onnx"
    r = cli(model, "--sparsity", "0.5", "--no-compile", "--quiet", "-o", tmp_path / "q")
    assert r.code == 0, r
    lines = r.out.strip().splitlines()
    assert lines[-1].startswith("RESULT PASSED") and all(ln.startswith(("warning: ", "gate: ", "RESULT ")) for ln in lines), lines
    r = cli(model, "--sparsity", "0.5", "--no-compile", "--json", "-o", tmp_path / "j")
    assert r.code == 0, r
    doc = json.loads(r.out)  # stdout is exactly one JSON object; progress went to stderr
    assert doc["status"] == "PASSED" and doc["exit_code"] == 0 and doc["bundle"] == str(tmp_path / "j")
    assert doc["layers_sparsity"]["requested"] == 0.5 and 0 < doc["layers_sparsity"]["achieved"] <= 0.5
    assert doc["min_cosine"] > 0.99 and isinstance(doc["warnings"], list) and "[1/6] load" in r.err
    rep = json.loads((tmp_path / "j" / "report.json").read_text())
    assert doc["warnings"] == rep["warnings"] and doc["sparsity"] == rep["stats"]["compressed"]["sparsity"]


def test_dry_run_says_whether_int8_sparse_kernels_apply(tmp_path):
    """--dry-run with --sparsity and --quantize int8 names the target's int8 block and whether the pattern
    reaches it (unstructured zeros: onnxruntime at dense int8 speed, and the pattern that would do)."""
    from compressor import pipeline
    from compressor.recipe import Options
    from models.zoo import ensure_built

    model = ensure_built("mlp", tmp_path)
    lines = pipeline.describe(pipeline.plan(Options(model=str(model), target="x86-avx2", sparsity=0.9,
                                                    quantize="int8")))
    assert any("do not empty the 8x4 blocks" in ln and "--pattern 8x4" in ln for ln in lines)
    lines = pipeline.describe(pipeline.plan(Options(model=str(model), target="x86-avx2", sparsity=0.9,
                                                    pattern="16x4", quantize="int8")))
    assert any("16x4 zeros leave whole 8x4 blocks empty" in ln for ln in lines)
    assert not any("int8 sparse" in ln for ln in pipeline.describe(pipeline.plan(
        Options(model=str(model), target="x86-avx2", sparsity=0.9))))
