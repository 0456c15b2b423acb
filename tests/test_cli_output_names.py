"""Default bundle names carry the variant: runs of other variants of one model (no -o) do not collide."""
from __future__ import annotations

from pathlib import Path

import pytest

from compressor.errors import EXIT_INPUT
from tests.conftest import REPO
from tests.test_cli_bad_input import _assert_one_line_error

FAST = ["--no-compile", "--no-latency", "--no-gate"]
DIGITS = REPO / "models" / "digits_cnn.onnx"


@pytest.mark.parametrize("flags,name", [
    ({}, "m.x86.bundle"),
    ({"sparsity": 0.9}, "m.x86.s90.bundle"),
    ({"sparsity": 0.5, "pattern": "2:4"}, "m.x86.s50.2of4.bundle"),
    ({"sparsity": 0.875, "pattern": "8x1"}, "m.x86.s87p5.8x1.bundle"),
    ({"pattern": "2:4"}, "m.x86.bundle"),  # a pattern without --sparsity does nothing
    ({"structured": 0.2}, "m.x86.st20.bundle"),
    ({"sparsity": 0.9, "structured": 0.2, "quantize": "int8", "finetune": "d.npz"}, "m.x86.s90.st20.int8.ft.bundle"),
    ({"quantize": "fp16"}, "m.x86.fp16.bundle"),
    ({"quantize": "int4"}, "m.x86.int4.bundle"),
])
def test_default_output_name(flags, name):
    from compressor.pipeline import default_output_name
    from compressor.recipe import Options

    assert default_output_name(Options(model="dir/m.onnx", **flags), Path("dir/m.onnx"), "x86") == name
    assert default_output_name(Options(model="m.onnx"), Path("m.onnx"), "x86:odd/tag") == "m.x86_odd_tag.bundle"


def test_two_variants_without_o_get_two_bundles(cli, tmp_path, monkeypatch):
    import targets

    tag = targets.resolve("x86")[1].tag
    monkeypatch.chdir(tmp_path)
    r1 = cli(DIGITS, "--sparsity", "0.5", *FAST)
    assert r1.code == 0, r1
    r2 = cli(DIGITS, "--sparsity", "0.5", "--pattern", "2:4", *FAST)
    assert r2.code == 0, r2  # was: "output directory exists" (exit 4)
    bundles = {p.name for p in tmp_path.iterdir()}
    assert bundles == {f"digits_cnn.{tag}.s50.bundle", f"digits_cnn.{tag}.s50.2of4.bundle"}, bundles
    assert all((tmp_path / b / "manifest.json").is_file() for b in bundles)
    # the same variant again still stops: nothing is overwritten without --force
    _assert_one_line_error(cli(DIGITS, "--sparsity", "0.5", *FAST), EXIT_INPUT, "output directory exists")
