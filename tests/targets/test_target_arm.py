"""arm: cross-compile to an aarch64 ELF shared object (not executed on x86)."""
from __future__ import annotations

import onnx
import pytest

from compressor.errors import TargetError
from targets import NotRunnableHere, resolve
from targets.elf import EM_AARCH64, read_elf_header
from targets.host import detect_host

pytest.importorskip("tvm")


@pytest.mark.parametrize("model", ["gemm_relu", "two_in_two_out"])
def test_arm_artifact_is_aarch64_elf(model, request, tmp_path, make_inputs):
    path = request.getfixturevalue(model)
    tgt, spec = resolve("arm")
    art = tgt.compile(path, spec, tmp_path, {})
    so = tmp_path / art.path
    assert art.path.name == "model_aarch64.so"
    hdr = read_elf_header(so)
    assert hdr.e_machine == EM_AARCH64 and hdr.bits == 64 and hdr.e_type == 3  # ET_DYN
    assert art.details["elf_machine"] == "AArch64" and art.details["elf_e_machine"] == 183
    if detect_host().arch != "aarch64":
        with pytest.raises(NotRunnableHere):
            tgt.run(so, spec, make_inputs(path))


def test_arm_compiles_lstm_as_fused_kernel(lstm_model, tmp_path):
    """The Relax importer has no LSTM: the backend's fused recurrence kernel takes it."""
    tgt, spec = resolve("arm64-linux")
    art = tgt.compile(lstm_model, spec, tmp_path, {})
    fused = art.details["kernels"]["rnn_fused"]
    assert [k["cell"] for k in fused] == ["LSTM"] and fused[0]["hidden"] == 4


def test_arm_unsupported_rnn_is_a_clear_error(lstm_model, tmp_path):
    m = onnx.load(str(lstm_model))
    m.graph.node[0].attribute.append(onnx.helper.make_attribute("clip", 1.0))
    path = tmp_path / "lstm_clip.onnx"
    onnx.save(m, str(path))
    tgt, spec = resolve("arm64-linux")
    with pytest.raises(TargetError, match="LSTM.*clip is set"):
        tgt.compile(path, spec, tmp_path / "out", {})
