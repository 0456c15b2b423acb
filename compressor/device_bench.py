"""``compress bench BUNDLE``: run a bundle's self-check on a device and measure it.

Devices:

* ``--device host`` (default): the bundle's own ``run_bundle.py`` with this Python (its exit
  code is the verdict: ISA refusal, hash mismatch, output mismatch), then the artifact's
  median latency (``targets.tvm_backend.time_library``) when it is built for this CPU.
* ``--device qemu-aarch64``: an aarch64 bundle's ``run_bundle.py`` under Debian's
  qemu-user with an aarch64 CPython + numpy + TVM runtime (``targets.device_qemu``). Wall
  time under emulation says little, so the performance proxy is the number of guest
  instructions executed during the inferences (deterministic; qemu plugin). When the
  artifact holds sparse kernels (``lower.sparse`` lowered layers), a *dense twin* is built
  from the same weights -- the bundle's ``model.onnx`` with every ``compressor::SparseMatMul``
  turned back into ``MatMul`` + ``Add`` (+ ``Relu``) on the dense weight, compiled for the
  same target -- and run the same way; the report gives both counts and
  ``dense / sparse``. The twin must pass the same self-check.
* ``--rpc HOST:PORT [--rpc-key KEY]``: upload, run and time the artifact on a TVM RPC
  server (``targets.rpc``).

Exit codes: 0 self-check passed, 3 self-check failed (outputs differ), 4 the bundle cannot
run on that device (missing ISA feature, wrong architecture, corrupted file), 5 a tool for
the device is missing (qemu, aarch64 runtime).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compressor import ir
from compressor import sparse_ops
from compressor.errors import EXIT_DEPENDENCY, EXIT_GATE, EXIT_INPUT, EXIT_OK, InputError, TargetError, UsageError

log = logging.getLogger(__name__)

DEVICES = ("host", "qemu-aarch64")
# run_bundle.py exit codes -> compress exit codes
RUNNER_EXIT = {0: EXIT_OK, 6: EXIT_INPUT, 7: EXIT_INPUT, 8: EXIT_INPUT, 9: EXIT_GATE}
_SELFCHECK = re.compile(r"SELFCHECK (PASSED|FAILED) samples=(\d+) min_cosine=([0-9.]+)")


def read_manifest(bundle: Path) -> dict:
    mf = Path(bundle) / "manifest.json"
    if not mf.is_file():
        raise InputError(f"{bundle} is not a bundle (no manifest.json)", hint="pass the directory compress wrote")
    return json.loads(mf.read_text())


def _arch(manifest: dict) -> str:
    return str((manifest.get("target") or {}).get("triple") or "").split("-")[0]


def sparse_layers(manifest: dict, bundle: Path) -> int:
    """Layers the artifact runs as sparse kernels: BSR kernels (target lowering, or
    lower.sparse in the pass list) and fused-RNN weights run as ELL segments."""
    n = 0
    for rec in (manifest.get("passes") or []) + (manifest.get("target_passes") or []):
        if rec.get("name") == "lower.sparse":
            n += int((rec.get("stats") or {}).get("lowered", 0))
    kernels = (manifest.get("artifact") or {}).get("kernels")
    for k in (kernels.get("rnn_fused", []) if isinstance(kernels, dict) else []):
        n += sum(m == "seg" for m in k.get("modes", []))
    return n


def _selfcheck_fields(output: str) -> dict[str, Any]:
    m = _SELFCHECK.search(output)
    if not m:
        return {}
    return {"samples": int(m.group(2)), "min_cosine": float(m.group(3))}


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------- dense twin


def _all_blocks_int8(node, inits: dict, g, kdim: int | None):
    """``compressor::SparseQMatMul[Relu]`` with every R x 4 block of its weight stored (zeros included):
    the int8 kernel run densely, what the int8 layer costs without sparsity."""
    from onnx import helper, numpy_helper

    from targets.sparse_int8 import BSRInt8, to_bsr_int8

    if kdim is None:
        raise TargetError(f"cannot rebuild the dense int8 weight of {node.name or node.op_type} (unknown input width)")
    data, indices, indptr = (numpy_helper.to_array(inits[t]) for t in node.input[1:4])
    r = int(data.shape[1])
    n = (len(indptr) - 1) * r
    sparse = BSRInt8((n, int(kdim)), r, data, indices, indptr, np.ones(n, np.float32))
    full = to_bsr_int8(sparse.dense(), sparse.row_scale, r, keep_all=True)
    base = (node.name or node.output[0]).replace("/", "_")
    names = [f"{base}_dense8_data", f"{base}_dense8_indices", f"{base}_dense8_indptr"]
    for nm, a in zip(names, (full.data, full.indices, full.indptr)):
        g.initializer.append(numpy_helper.from_array(a, nm))
    return helper.make_node(node.op_type, [node.input[0], *names, *node.input[4:]], list(node.output),
                            name=f"{base}_dense8", domain=node.domain)


def densify_sparse_ops(model):
    """``compressor::SparseMatMul[Relu](X, data, indices, indptr, bias)`` -> ``MatMul(X, W^T)``,
    ``Add(bias)`` (, ``Relu``) and ``compressor::SparseConv1x1[Relu]`` -> ``Conv(X, W[:, :, None, None], bias)``
    (, ``Relu``), with ``W`` rebuilt from the BSR initializers; the model-local function definitions go
    too. Returns a new ModelProto (same outputs, dense weights)."""
    import onnx
    from onnx import helper, numpy_helper

    from targets.sparse_kernels import BSR, from_bsr

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    inferred = ir.inferred_structure(model)
    dims = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    new_nodes, used = [], set()
    for node in g.node:
        if node.domain == sparse_ops.DOMAIN and node.op_type in sparse_ops.QMATMUL_OPS:
            xd = dims.get(node.input[0]) or []
            kdim = xd[-1] if xd and xd[-1] else None
            new_nodes.append(_all_blocks_int8(node, inits, g, kdim))  # the dense int8 build: every block stored
            continue
        if not sparse_ops.is_sparse_op(node.domain, node.op_type):
            new_nodes.append(node)
            continue
        x, d_name, i_name, p_name, b_name = (list(node.input) + [""] * 5)[:5]
        arr = {k: numpy_helper.to_array(inits[k]) for k in (d_name, i_name, p_name) if k in inits}
        conv = node.op_type in sparse_ops.CONV_OPS + sparse_ops.KXK_OPS
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ksz = int(np.prod(attrs.get("kernel_shape", [1, 1])))
        xd = dims.get(x) or []
        kdim = ((xd[1] * ksz if xd[1] else None) if conv else xd[-1]) if len(xd) >= (2 if conv else 1) else None
        if len(arr) != 3 or kdim is None:
            raise TargetError(f"cannot rebuild the dense weight of {node.name or node.op_type} (non-constant BSR "
                              "arrays or unknown input width)")
        data, indices, indptr = arr[d_name], arr[i_name], arr[p_name]
        n = (len(indptr) - 1) * int(data.shape[1])
        w = from_bsr(BSR(data.astype(np.float32), indices.astype(np.int32), indptr.astype(np.int32), (n, kdim)))
        base = (node.name or node.output[0]).replace("/", "_")
        relu = sparse_ops.has_relu(node.op_type)
        used.update((d_name, i_name, p_name))
        if conv:
            kh, kw = attrs.get("kernel_shape", [1, 1])
            w4 = numpy_helper.from_array(np.ascontiguousarray(w.reshape(n, -1, kh, kw)), f"{base}_dense_w")
            g.initializer.append(w4)
            conv_out = f"{base}_dense_pre" if relu else node.output[0]
            geo = {k: attrs[k] for k in ("strides", "pads") if k in attrs}
            new_nodes.append(helper.make_node("Conv", [x, w4.name] + ([b_name] if b_name else []), [conv_out],
                                              name=f"{base}_dense_conv", **geo))
            if relu:
                new_nodes.append(helper.make_node("Relu", [conv_out], [node.output[0]], name=f"{base}_dense_relu"))
            continue
        wt = numpy_helper.from_array(np.ascontiguousarray(w.T), f"{base}_dense_wT")
        g.initializer.append(wt)
        mm_out = f"{base}_dense_mm"
        new_nodes.append(helper.make_node("MatMul", [x, wt.name], [mm_out], name=f"{base}_dense_matmul"))
        out = node.output[0]
        if b_name:
            add_out = f"{base}_dense_add" if relu else out
            new_nodes.append(helper.make_node("Add", [mm_out, b_name], [add_out], name=f"{base}_dense_bias"))
            mm_out = add_out
        if relu:
            new_nodes.append(helper.make_node("Relu", [mm_out], [out], name=f"{base}_dense_relu"))
        elif mm_out != out:
            new_nodes.append(helper.make_node("Identity", [mm_out], [out], name=f"{base}_dense_out"))
    del g.node[:]
    g.node.extend(new_nodes)
    still = {i for nd in g.node for i in nd.input}
    keep = [t for t in g.initializer if t.name not in used or t.name in still]
    del g.initializer[:]
    g.initializer.extend(keep)
    still_ops = {nd.op_type for nd in g.node if nd.domain == sparse_ops.DOMAIN}
    funcs = [f for f in model.functions if f.domain != sparse_ops.DOMAIN or f.name in still_ops]
    del model.functions[:]
    model.functions.extend(funcs)
    if not still_ops:
        ops = [o for o in model.opset_import if o.domain != "compressor"]
        del model.opset_import[:]
        model.opset_import.extend(ops)
    onnx.checker.check_model(model)
    return model


def build_dense_twin(bundle: Path, manifest: dict, out_dir: Path) -> Path:
    """Copy of the bundle whose artifact is compiled from the same weights without sparse kernels."""
    import onnx

    import targets
    from targets.base import CompileOptions
    from compressor.pass_base import PassContext
    from compressor.pass_manager import PassManager
    from passes import PASSES

    twin = Path(out_dir) / "dense_twin"
    shutil.copytree(bundle, twin)
    tgt, spec = targets.resolve(manifest["target"]["tag"])
    model = onnx.load(str(Path(bundle) / "model.onnx"))
    if manifest.get("runtime", {}).get("quantized_ops") or any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        from targets.lower_sparse import lower_int8_all

        model = lower_int8_all(model, spec)  # int8 layers: the int8 kernel with every block (densified below)
    model = densify_sparse_ops(model)
    needed = [(PASSES.get(n)(), PASSES.entry(n).provider) for n in tgt.required_passes if n != "lower.sparse"]
    if needed:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        model, _ = PassManager(needed, []).run(model, PassContext(target=spec, opset=opset, template=model))
    src = Path(out_dir) / "dense_source.onnx"
    onnx.save(model, str(src))
    shapes = {i["name"]: list(i["shape"]) for i in manifest["inputs"]}
    art = tgt.compile(src, spec, twin, shapes, CompileOptions(rnn_modes=("dense", "dense")))
    name = manifest["artifact"]["path"]
    if str(art.path) != name:
        shutil.move(str(twin / art.path), str(twin / name))
    m2 = json.loads((twin / "manifest.json").read_text())
    m2["artifact"]["sha256"] = art.sha256
    if name in m2.get("files", {}):
        m2["files"][name]["sha256"] = art.sha256
        m2["files"][name]["bytes"] = (twin / name).stat().st_size
    (twin / "manifest.json").write_text(json.dumps(m2, indent=2))
    return twin


# ----------------------------------------------------------------------- devices


def bench_host(bundle: Path, manifest: dict) -> dict[str, Any]:
    from targets.host import detect_host

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(bundle) / "run_bundle.py"), str(bundle)],
                          capture_output=True, text=True, timeout=1800)
    out = (proc.stdout + proc.stderr).strip()
    rep: dict[str, Any] = {"device": "host", "runner_exit": proc.returncode, "passed": proc.returncode == 0,
                           "message": _last_line(out), "selfcheck_seconds": round(time.perf_counter() - t0, 3),
                           **_selfcheck_fields(out)}
    art = manifest.get("artifact")
    if proc.returncode == 0 and art and _arch(manifest) == detect_host().arch:
        from targets import tvm_backend

        with np.load(Path(bundle) / "selfcheck" / "inputs.npz") as z:
            feed = {k: z[k][0] for k in z.files}
        rep["median_ms"] = round(tvm_backend.time_library(Path(bundle) / art["path"], feed, repeat=20) * 1e3, 4)
    return rep


def modelled_ratios(dense: dict[str, int], sparse: dict[str, int]) -> dict[str, float]:
    """Dense-twin / sparse cycles per named core (``targets.arm_cores``) from the per-inference
    instruction classes: the issue bound only (the whole model's cache traffic is not modelled here;
    the per-layer cost model adds it)."""
    from targets.arm_cores import CORES

    if not dense.get("total") or not sparse.get("total"):
        return {}
    return {c.llvm_cpu: round(c.cycles(dense, 0) / c.cycles(sparse, 0), 3) for c in CORES.values()}


def bench_qemu(bundle: Path, manifest: dict, count: bool = True, twin: bool = True,
               say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    from targets import device_qemu

    arch = _arch(manifest)
    if arch != "aarch64":
        raise UsageError(f"--device qemu-aarch64 runs aarch64 bundles; this bundle is for {arch or 'no target'}",
                         hint="compress MODEL --target arm")
    rt = device_qemu.prepare()
    count = count and rt.plugin is not None
    say(f"running the self-check under {rt.qemu} ({rt.versions['python']}, tvm {rt.versions['apache-tvm']} runtime)")
    run = device_qemu.run_bundle(rt, bundle, count=count)
    rep: dict[str, Any] = {"device": "qemu-aarch64", "runner_exit": run.returncode, "passed": run.returncode == 0,
                           "message": _last_line(run.output), "selfcheck_seconds": round(run.seconds, 3),
                           "guest": rt.versions, **_selfcheck_fields(run.output)}
    if not count:
        rep["notes"] = ["instruction counts not measured (no qemu plugin)"]
        return rep
    per = run.regions or 1
    rep["insns"] = {"artifact": run.insns_region, "inferences": run.regions, "artifact_per_inference": run.insns_region // per,
                    "process_total": run.insns_total,
                    "classes_per_inference": {c: v // per for c, v in run.class_totals().items()}}
    n_sparse = sparse_layers(manifest, bundle)
    rep["sparse_layers"] = n_sparse
    if run.returncode != 0 or not twin:
        return rep
    if n_sparse == 0:
        rep["notes"] = ["the artifact has no sparse kernel (lower.sparse kept every layer dense, no fused-RNN weight "
                        "runs sparse): no dense twin to compare"]
        return rep
    with tempfile.TemporaryDirectory(prefix="dense_twin_") as tmp:
        say(f"building the dense twin ({n_sparse} sparse layer(s) compiled dense) and running it the same way")
        t = build_dense_twin(Path(bundle), manifest, Path(tmp))
        drun = device_qemu.run_bundle(rt, t, count=True)
    dper = drun.regions or 1
    rep["dense_twin"] = {"runner_exit": drun.returncode, "passed": drun.returncode == 0, "message": _last_line(drun.output),
                         "insns": drun.insns_region, "artifact_per_inference": drun.insns_region // dper,
                         "classes_per_inference": {c: v // dper for c, v in drun.class_totals().items()}}
    if drun.returncode == 0 and run.insns_region:
        rep["insns"]["dense_over_sparse"] = round(drun.insns_region / run.insns_region, 3)
        rep["insns"]["modelled_dense_over_sparse"] = modelled_ratios(rep["dense_twin"]["classes_per_inference"],
                                                                     rep["insns"]["classes_per_inference"])
    return rep


def bench(bundle: Path, device: str = "host", rpc: str | None = None, rpc_key: str = "",
          say: Callable[[str], None] = lambda s: None, twin: bool = True) -> tuple[int, dict[str, Any]]:
    """Run the bench; returns (exit code, report dict). Raises CompressorError for usage/dependency errors."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if rpc:
        from targets import rpc as trpc

        host, port = trpc.parse_address(rpc)
        res = trpc.bench_rpc(bundle, host, port, key=rpc_key)
        rep = {"device": f"rpc {res.address}", **res.to_dict()}
        return (EXIT_OK if res.passed else EXIT_GATE), rep
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}", hint=f"one of {', '.join(DEVICES)}, or --rpc HOST:PORT")
    rep = bench_host(bundle, manifest) if device == "host" else bench_qemu(bundle, manifest, say=say, twin=twin)
    code = RUNNER_EXIT.get(rep["runner_exit"], EXIT_DEPENDENCY if rep["runner_exit"] else EXIT_OK)
    if rep.get("dense_twin") and not rep["dense_twin"]["passed"]:
        code = code or EXIT_GATE
    return code, rep


def report_lines(rep: dict[str, Any]) -> list[str]:
    lines = [f"device: {rep['device']}"]
    if "message" in rep:
        lines.append(f"self-check: {rep['message']} (runner exit {rep['runner_exit']}, {rep['selfcheck_seconds']} s)")
    if "median_ms" in rep:
        lines.append(f"latency: median {rep['median_ms']} ms" + (f", mean {rep['mean_ms']} ms over {rep['runs']} runs"
                                                               if "mean_ms" in rep else ""))
    if "upload_seconds" in rep:
        lines.append(f"rpc: upload {rep['upload_seconds']} s, load {rep['load_seconds']} s, "
                     f"{rep['samples']} samples min_cosine={rep['min_cosine']}")
    ins = rep.get("insns")
    if ins:
        lines.append(f"instructions (artifact, {ins['inferences']} inferences): {ins['artifact']:,} "
                     f"({ins['artifact_per_inference']:,} per inference)")
    twin = rep.get("dense_twin")
    if twin:
        lines.append(f"dense twin: {twin['message']}; instructions {twin['insns']:,} "
                     f"({twin['artifact_per_inference']:,} per inference)")
        if ins and "dense_over_sparse" in ins:
            lines.append(f"dense / sparse instructions: {ins['dense_over_sparse']}x ({rep['sparse_layers']} sparse layer(s))")
            if ins.get("modelled_dense_over_sparse"):
                lines.append("dense / sparse modelled cycles (issue bound, targets/arm_cores.py): " + ", ".join(
                    f"{core} {r}x" for core, r in ins["modelled_dense_over_sparse"].items()))
    lines += [f"note: {n}" for n in rep.get("notes", [])]
    return lines
