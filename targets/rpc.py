"""Run and time a bundle's artifact on a remote device through TVM RPC.

The device runs TVM's RPC server (``python -m tvm.exec.rpc_server --host 0.0.0.0
--port 9091 [--key KEY]`` on the board, or behind a tracker/proxy with a key). This side:

1. ``tvm.rpc.connect(host, port, key=...)`` opens a session;
2. ``remote.upload(artifact)`` copies the compiled ``.so`` into the server's temp dir and
   ``remote.load_module(name)`` dlopens it there (the library must match the device's
   architecture: an x86 bundle for an x86 server, an arm bundle for an aarch64 board);
3. a Relax ``VirtualMachine`` is built over the remote module and device, the bundle's
   self-check inputs are copied to the device one sample at a time and every output is
   compared with ``selfcheck/expected.npz`` (same cosine criterion as ``run_bundle.py``);
4. the first sample is timed with the VM's ``time_evaluator`` (``invoke_stateful`` on the
   remote side: the wall time excludes the network round trip).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compressor.errors import DependencyError, InputError, TargetError, UsageError
from compressor.metrics import cosine

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999  # run_bundle.py's self-check criterion


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--rpc wants HOST:PORT, got {text!r}", hint="e.g. --rpc 192.168.1.20:9091")
    return host.strip("[]"), int(port)


def load_bundle(bundle: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    bundle = Path(bundle)
    mf = bundle / "manifest.json"
    if not mf.is_file():
        raise InputError(f"{bundle} is not a bundle (no manifest.json)", hint="pass the directory compress wrote")
    manifest = json.loads(mf.read_text())
    with np.load(bundle / "selfcheck" / "inputs.npz") as z:
        inputs = {k: z[k] for k in z.files}
    with np.load(bundle / "selfcheck" / "expected.npz") as z:
        expected = {k: z[k] for k in z.files}
    return manifest, inputs, expected


@dataclass
class RpcResult:
    address: str
    passed: bool
    samples: int
    min_cosine: float
    upload_seconds: float
    load_seconds: float
    median_ms: float
    mean_ms: float
    runs: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def bench_rpc(bundle: Path, host: str, port: int, key: str = "", number: int = 10, repeat: int = 5,
              session_timeout: float = 300) -> RpcResult:
    import tvm
    from tvm import rpc
    from tvm.runtime.vm import VirtualMachine

    manifest, inputs, expected = load_bundle(bundle)
    art = manifest.get("artifact")
    if not art:
        raise InputError(f"{bundle} has no compiled artifact (runtime {manifest.get('runtime', {}).get('name')}); "
                         "nothing to run over RPC")
    lib_path = Path(bundle) / art["path"]
    order = [i["name"] for i in manifest["inputs"]]
    names = [o["name"] for o in manifest["outputs"]]
    address = f"{host}:{port}"
    try:
        remote = rpc.connect(host, port, key=key, session_timeout=session_timeout)
    except Exception as exc:  # TVM raises its own error types for refused/failed connections
        raise DependencyError(f"cannot open a TVM RPC session to {address}: {' '.join(str(exc).split())[:300]}",
                              hint="is `python -m tvm.exec.rpc_server` running there (and --rpc-key right)?") from exc
    t0 = time.perf_counter()
    remote.upload(str(lib_path))
    t1 = time.perf_counter()
    try:
        rlib = remote.load_module(lib_path.name)
    except Exception as exc:
        raise TargetError(f"the RPC device at {address} cannot load {lib_path.name} "
                          f"(built for {manifest.get('target', {}).get('triple')}): {' '.join(str(exc).split())[:300]}") from exc
    dev = remote.cpu()
    vm = VirtualMachine(rlib, dev)
    t2 = time.perf_counter()
    n = len(next(iter(inputs.values())))
    worst = 1.0
    for i in range(n):
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[k][i]), dev) for k in order]
        out = vm["main"](*args)
        outs = [out] if hasattr(out, "numpy") else list(out)
        for name, got in zip(names, outs):
            worst = min(worst, cosine(got.numpy(), expected[name][i]))
    args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[k][0]), dev) for k in order]
    vm.set_input("main", *args)
    timer = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat, min_repeat_ms=0)
    res = timer("main")
    results_ms = [r * 1e3 for r in res.results]
    try:
        remote.remove(lib_path.name)
    except Exception as exc:  # cleanup only; the server deletes its temp dir on exit anyway
        log.debug("could not remove %s on the server: %s", lib_path.name, exc)
    return RpcResult(
        address=address, passed=worst >= MIN_COSINE, samples=n, min_cosine=round(worst, 6),
        upload_seconds=round(t1 - t0, 4), load_seconds=round(t2 - t1, 4),
        median_ms=round(float(np.median(results_ms)), 4), mean_ms=round(float(res.mean) * 1e3, 4),
        runs=number * repeat,
    )
