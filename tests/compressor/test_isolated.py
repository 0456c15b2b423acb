"""A crash in native code (LLVM's report_fatal_error, a segfaulting kernel) must not end a run
(issue 16): the compile and the artifact's first run happen in a child process; a crash of the
sparse kernels' code generation keeps those layers dense, any other crash is a one-line warning."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compressor import isolated
from compressor.errors import InputError


def _abort() -> None:
    os.abort()


def _segv() -> None:
    import ctypes

    ctypes.string_at(0)


def _raise_input() -> None:
    raise InputError("bad thing", hint="do this")


def _add(a: int, b: int = 0) -> int:
    print("working", flush=True)
    return a + b


def test_call_returns_reraises_and_reports_crashes():
    lines: list[str] = []
    assert isolated.call(_add, (2,), {"b": 3}, label="add", on_line=lines.append) == 5
    assert lines == ["working"]
    with pytest.raises(InputError, match="bad thing"):
        isolated.call(_raise_input, label="raiser")
    with pytest.raises(isolated.ChildCrashed, match=r"^abort test crashed \(SIGABRT\)") as e:
        isolated.call(_abort, label="abort test")
    assert e.value.signal_name == "SIGABRT"
    with pytest.raises(isolated.ChildCrashed, match=r"SIGSEGV"):
        isolated.call(_segv, label="segv test")
    with pytest.raises(TypeError, match="cannot hand"):
        isolated.call(lambda: 1, label="closure")


def _mlp(path: Path, width: int = 512) -> Path:
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in
             (("w1", rng.standard_normal((width, width)).astype(np.float32) * 0.05),
              ("w2", rng.standard_normal((width, width)).astype(np.float32) * 0.05),
              ("w3", rng.standard_normal((width, 10)).astype(np.float32) * 0.05))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["r1"], name="a1"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["r2"], name="a2"),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


# a plugin target: the x86 host target whose code generation aborts like LLVM did on a Zen 3,
# either whenever the model has the sparse kernels' ops ("sparse") or always ("always")
PLUGIN = '''
import os
import onnx
from targets.x86 import X86Target


class _Crashy(X86Target):
    name = ""
    aliases = ()
    mode = "sparse"

    def expand(self, tag, host=None):
        import dataclasses
        return dataclasses.replace(super().expand("x86", host), tag=tag)

    def compile(self, model_path, spec, out_dir, input_shapes, options=None):
        m = onnx.load(str(model_path))
        if self.mode == "always" or any(n.domain == "compressor" for n in m.graph.node):
            os.write(2, b"LLVM ERROR: Do not know how to split the result of this operator!\\n")
            os.abort()
        return super().compile(model_path, spec, out_dir, input_shapes, options)


class SparseCrash(_Crashy):
    name = "crashsparse"


class AlwaysCrash(_Crashy):
    name = "crashalways"
    mode = "always"

'''


@pytest.fixture(scope="module")
def crash_plugin(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("plugin") / "crash_targets.py"
    p.write_text(textwrap.dedent(PLUGIN))
    return p


def test_sparse_kernel_crash_falls_back_to_dense(cli, tmp_path, crash_plugin):
    model = _mlp(tmp_path / "mlp.onnx")
    out = tmp_path / "b"
    r = cli(model, "--target", "crashsparse", "--plugin", crash_plugin, "--sparsity", "0.9", "--no-gate",
            "--no-latency", "-o", out)
    assert r.code == 0, r.out + r.err
    rep = json.loads((out / "report.json").read_text())
    fb = rep["sparse_fallback"]
    assert fb and sum(fb["kernels"].values()) >= 1 and "SIGABRT" in fb["error"] and "LLVM ERROR" in fb["error"]
    warn = [w for w in rep["warnings"] if "crashed code generation" in w]
    assert len(warn) == 1 and "kept dense" in warn[0] and "crashsparse" in warn[0]
    # the dense retry produced an artifact that ran here and matches the compressed model
    assert rep["artifact"] is not None and (out / rep["artifact"]["path"]).exists()
    art = [c for c in rep["verification"] if c["candidate"].startswith("artifact(") and c["reference"] == "compressed.onnx"]
    assert art and all(c["passed"] for c in art)
    assert not any(p["name"] == "lower.sparse" for p in rep["target_passes"])


def test_crash_without_sparse_kernels_is_a_warning_not_an_abort(cli, tmp_path, crash_plugin):
    model = _mlp(tmp_path / "mlp.onnx", width=64)
    out = tmp_path / "b"
    r = cli(model, "--target", "crashalways", "--plugin", crash_plugin, "--no-latency", "-o", out)
    assert r.code == 0, r.out + r.err
    rep = json.loads((out / "report.json").read_text())
    assert rep["artifact"] is None and rep["runtime"]["name"] == "onnxruntime"
    w = [w for w in rep["warnings"] if w.startswith("artifact not produced for crashalways")]
    assert len(w) == 1 and "crashed (SIGABRT)" in w[0] and "LLVM ERROR" in w[0]
