"""cuda: TVM CUDA codegen + dlight schedules, nvcc fatbin embedded for the sm_ arch.
Compile-only (no GPU needed); skipped with a reason when nvcc is missing."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from targets import NotRunnableHere, resolve
from targets.cuda import find_fatbins, find_nvcc, rewrite_blob

pytest.importorskip("tvm")
needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc (CUDA toolkit) not found: cannot build device code")


@needs_nvcc
@pytest.mark.parametrize("tag,arch", [("cuda", 80), ("cuda-sm90", 90)])
@pytest.mark.parametrize("model", ["gemm_relu", "conv_relu"])
def test_cuda_artifact_contains_sm_device_code(tag, arch, model, request, tmp_path, make_inputs):
    path = request.getfixturevalue(model)
    tgt, spec = resolve(tag)
    art = tgt.compile(path, spec, tmp_path, {})
    so = tmp_path / art.path
    assert art.path.name == f"model_cuda_sm_{arch}.so"
    dev = art.details["device_code"]
    assert f"sm_{arch}" in dev["sass"] and f"compute_{arch}" in dev["ptx"]
    assert art.details["kernels"] >= 1 and art.details["cuda_arch"] == f"sm_{arch}"
    # independent check on the written bytes: an EM_CUDA cubin for the arch is embedded,
    # and the TVM CUDA source format was replaced (no lazy JIT on the target machine).
    fatbins = find_fatbins(so.read_bytes())
    assert any(e["kind"] == "elf" and e["arch"] == arch and e.get("e_machine") == 190 for fb in fatbins for e in fb)
    with pytest.raises(NotRunnableHere):
        tgt.run(so, spec, make_inputs(path))


def test_blob_rewrite_replaces_cuda_source_and_keeps_structure():
    def s(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    src = 'extern "C" __global__ void k(float* a) {}'
    fmap = struct.pack("<Q", 1) + s(b"k") + b"\x01\x02\x03"
    cuda_payload = s(b"cuda") + fmap + s(src.encode())
    body = struct.pack("<Q", 4) + struct.pack("<4Q", 0, 1, 2, 2) + struct.pack("<Q", 2) + struct.pack("<2Q", 1, 2)
    body += s(b"relax.VMExecutable") + s(b"EXE") + s(b"_lib") + s(b"cuda") + s(cuda_payload)
    blob = struct.pack("<Q", len(body)) + body
    new, info = rewrite_blob(blob, lambda code: ("fatbin", b"BIN:" + code.encode()), [src])
    assert info == [{"kernels": 1, "bytes": 4 + len(src), "format": "fatbin"}]
    want_payload = s(b"fatbin") + fmap + s(b"BIN:" + src.encode())
    assert new.endswith(s(b"cuda") + s(want_payload))
    assert struct.unpack_from("<Q", new)[0] == len(new) - 8
    assert s(b"relax.VMExecutable") + s(b"EXE") + s(b"_lib") in new


def test_asm_blob_packer_loads_with_tvm_runtime(gemm_relu, tmp_path, make_inputs, ort_run):
    """The .incbin packer used for CUDA, exercised on a CPU build where it can be loaded
    and run: proves the symbol/layout matches what the TVM loader expects."""
    import tvm_ffi

    from targets import tvm_backend
    from targets.cuda import _asm_blob_source
    from targets.host import detect_host

    if detect_host().arch != "x86_64":
        pytest.skip("x86_64 host only")
    calls = []

    def fpack(rt_mod, is_system_lib, prefix, workspace_dir):
        blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(rt_mod).numpy().tobytes()
        new, info = rewrite_blob(blob, lambda code: ("fatbin", b""), [])
        assert new == blob and info == []
        binp = tmp_path / "blob.bin"
        binp.write_bytes(new)
        asm = tmp_path / "blob.S"
        asm.write_text(_asm_blob_source(binp))
        calls.append(asm)
        return str(asm)

    _, spec = resolve("x86")
    mod = tvm_backend.import_onnx(gemm_relu, {})
    out = tmp_path / "packed.so"
    tvm_backend.compile_library(mod, spec.tvm_target, out, fpack_imports=fpack)
    assert calls
    inputs = make_inputs(gemm_relu)
    got = tvm_backend.run_library(out, inputs)
    np.testing.assert_allclose(got[0], ort_run(gemm_relu, inputs)[0], rtol=1e-4, atol=1e-4)
