"""Pass-manager instruments through the CLI: --check-each-pass, --dump-ir, --print-pass-times."""
from __future__ import annotations

import onnx
import pytest

from compressor.errors import PassError
from compressor.pass_base import Pass, PassContext, PassResult
from compressor.pass_manager import PassManager, ValidityInstrument
from tests.conftest import conv_bn_model


def test_dump_ir_and_pass_times(cli, tmp_path):
    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    r = cli(tmp_path / "m.onnx", "--dump-ir", tmp_path / "ir", "--print-pass-times", "--check-each-pass",
            "-o", tmp_path / "o", "--no-compile", "--no-latency", "--sparsity", "0.5", "--no-gate")
    assert r.code == 0, r
    dumps = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert dumps == ["01_cleanup.fold_constants.onnx", "02_cleanup.remove_identity.onnx", "03_cleanup.fold_batchnorm.onnx",
                     "04_cleanup.dead_code.onnx", "05_sparsify.magnitude.onnx"]
    assert "BatchNormalization" in [n.op_type for n in onnx.load(tmp_path / "ir" / dumps[1]).graph.node]
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(tmp_path / "ir" / dumps[2]).graph.node]
    assert "| pass " in r.out and "cleanup.fold_batchnorm" in r.out


class _Breaker(Pass):
    name = "test.break_graph"

    def run(self, graph, ctx):
        graph.nodes[0].op = "NoSuchOp"
        return PassResult(True)


def test_check_each_pass_names_the_breaking_pass():
    with pytest.raises(PassError, match="after pass test.break_graph"):
        PassManager([(_Breaker(), "builtin:test")], [ValidityInstrument(conv_bn_model())]).run(conv_bn_model(), PassContext())


def test_broken_graph_never_leaves_even_without_instrument():
    with pytest.raises(PassError, match="graph invalid"):
        PassManager([(_Breaker(), "builtin:test")]).run(conv_bn_model(), PassContext())
