"""Run aarch64 bundles on this (x86-64) host under Debian's ``qemu-user``.

What an aarch64 Linux device needs to run a bundle is an aarch64 CPython, numpy and the
TVM runtime. Here they are assembled from the two registries the project may use:

* the interpreter and its shared libraries: Debian ``arm64`` packages (``python3.X-minimal``,
  ``libpython3.X-stdlib``, ``libstdc++6`` and their dependency closure, computed with
  ``apt-cache depends --recurse``), fetched with ``apt-get download`` after
  ``dpkg --add-architecture arm64`` and unpacked with ``dpkg-deb -x`` into a sysroot;
* Python packages: the aarch64 wheels of exactly the host's ``apache-tvm``,
  ``apache-tvm-ffi``, ``numpy`` and ``ml_dtypes`` versions (``pip download --platform
  manylinux_*_aarch64``), unpacked into a site directory. ``libtvm_compiler.so`` (250 MB,
  the compiler) is left out: the runner runs with ``TVM_USE_RUNTIME_LIB=1`` (runtime only,
  ``tvm.runtime.vm.VirtualMachine``), as it would on a device.

Everything lives under ``~/.cache/compressor/aarch64`` (``COMPRESSOR_AARCH64_CACHE``
overrides it), never in the repository; ``prepare()`` is idempotent, takes a file lock
(pytest-xdist workers may call it together) and is run by ``setup.sh``.

The guest runs as ``qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python3.X run_bundle.py BUNDLE``.
qemu-user passes the host's ``/proc/cpuinfo`` through, so the runner reads the guest's ISA
from ``getauxval(AT_HWCAP)``, which qemu does emulate.

Instruction counts (the performance proxy without ARM hardware): Debian's qemu-user has
plugin support but ships none of QEMU's contrib plugins, so ``targets/qemu_insn_count.c``
is compiled for the host (cc, or Zig's clang) and loaded with ``-plugin``. It counts the
instructions executed by the guest thread between the region markers the runner emits
around each inference (``COMPRESSOR_INSN_REGIONS=1``), with TVM and BLAS pinned to one
thread: the count is exactly reproducible run to run, unlike wall time under emulation.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import DependencyError

log = logging.getLogger(__name__)

PLUGIN_SOURCE = Path(__file__).resolve().parent / "qemu_insn_count.c"
# host Python packages whose aarch64 wheels (same versions) make up the guest's site dir
GUEST_WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions")
SKIP_IN_WHEELS = ("tvm/lib/libtvm_compiler.so",)  # the compiler: not needed to run
NOT_LIBRARIES = {"dpkg", "tar", "install-info", "perl", "perl-base", "debconf"}  # tools in the closure
_INSN_LINE = re.compile(r"insn_count total=(\d+) region=(\d+) regions=(\d+)")
_REGION_LINE = re.compile(r"insn_region total=(\d+) load=(\d+) store=(\d+) simd=(\d+) branch=(\d+)")


def cache_dir() -> Path:
    env = os.environ.get("COMPRESSOR_AARCH64_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "compressor" / "aarch64"


def qemu_binary() -> str | None:
    return shutil.which("qemu-aarch64")


@dataclass(frozen=True)
class GuestRuntime:
    """A prepared aarch64 userland: ``qemu`` runs ``python`` (inside ``sysroot``) with ``site``."""

    qemu: str
    sysroot: Path
    python: Path
    site: Path
    plugin: Path | None
    versions: dict

    def command(self, args: list[str], insn_log: Path | None = None) -> list[str]:
        cmd = [self.qemu, "-L", str(self.sysroot)]
        if insn_log is not None:
            if self.plugin is None:
                raise DependencyError("the qemu instruction-count plugin was not built (no C compiler)")
            cmd += ["-plugin", str(self.plugin), "-d", "plugin", "-D", str(insn_log)]
        return cmd + [str(self.python), *args]

    def env(self, count: bool = False) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
        env.update(
            PYTHONPATH=str(self.site),
            PYTHONNOUSERSITE="1",
            PYTHONHASHSEED="0",
            TVM_USE_RUNTIME_LIB="1",  # runtime only, as on a device (the compiler .so is not shipped)
            TVM_NUM_THREADS="1",  # deterministic counts; qemu-user threads would only add noise
            OPENBLAS_NUM_THREADS="1",
            OMP_NUM_THREADS="1",
        )
        if count:
            env["COMPRESSOR_INSN_REGIONS"] = "1"
        return env


def _run(cmd: list[str], what: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DependencyError(f"{what} failed: {exc}") from exc
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])[-400:]
        raise DependencyError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------- sysroot (Debian)


def _ensure_arm64_arch() -> None:
    foreign = _run(["dpkg", "--print-foreign-architectures"], "dpkg").stdout.split()
    if "arm64" in foreign:
        return
    if os.geteuid() != 0:
        raise DependencyError(
            "the arm64 architecture is not enabled in dpkg and this user is not root",
            hint="as root: dpkg --add-architecture arm64 && apt-get update (setup.sh does it)",
        )
    log.info("enabling the arm64 dpkg architecture and updating the package lists")
    _run(["dpkg", "--add-architecture", "arm64"], "dpkg --add-architecture arm64")
    _run(["apt-get", "update", "-q"], "apt-get update")


def _python_package() -> str:
    """``python3.X`` that Debian's ``python3-minimal`` (arm64) depends on."""
    out = _run(["apt-cache", "depends", "python3-minimal:arm64"], "apt-cache depends python3-minimal:arm64").stdout
    m = re.search(r"Depends:\s*(python3\.\d+)-minimal", out)
    if not m:
        raise DependencyError("cannot tell which python3.X Debian ships for arm64 (apt-cache depends python3-minimal)",
                              hint="run apt-get update")
    return m.group(1)


def _closure(roots: list[str]) -> list[str]:
    out = _run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
         "--no-breaks", "--no-replaces", "--no-enhances", *[f"{r}:arm64" for r in roots]],
        "apt-cache depends --recurse",
    ).stdout
    names = set()
    for line in out.splitlines():
        if line.startswith(" ") or not line.endswith(":arm64"):
            continue
        name = line[: -len(":arm64")]
        if name not in NOT_LIBRARIES and not name.startswith("<"):
            names.add(name)
    return sorted(names)


def _build_sysroot(root: Path) -> tuple[Path, str]:
    _ensure_arm64_arch()
    pyname = _python_package()
    pkgs = _closure([f"{pyname}-minimal", f"lib{pyname}-stdlib", "libstdc++6", "libgcc-s1"])
    debs = root / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    log.info("downloading %d Debian arm64 packages", len(pkgs))
    _run(["apt-get", "download", "-q", *[f"{p}:arm64" for p in pkgs]], "apt-get download (arm64)", cwd=debs)
    sysroot = root / "sysroot"
    tmp = root / "sysroot.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"dpkg-deb -x {deb.name}")
    shutil.rmtree(sysroot, ignore_errors=True)
    tmp.rename(sysroot)
    shutil.rmtree(debs, ignore_errors=True)
    python = sysroot / "usr" / "bin" / pyname
    if not python.exists():
        raise DependencyError(f"{python} missing after unpacking the arm64 packages")
    return python, pyname


# ----------------------------------------------------------------------- wheels (PyPI)


def _host_versions() -> dict[str, str]:
    out = {}
    for name in GUEST_WHEELS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError as exc:
            raise DependencyError(f"{name} is not installed on the host") from exc
    return out


def _glibc_minor(sysroot: Path) -> int:
    libs = sorted(sysroot.glob("usr/lib/aarch64-linux-gnu/libc.so.6")) + sorted(sysroot.glob("lib/aarch64-linux-gnu/libc.so.6"))
    for lib in libs:
        m = re.search(rb"GNU C Library[^\n]*?release version 2\.(\d+)", lib.read_bytes())
        if m:
            return int(m.group(1))
    return 28


def _build_site(root: Path, pyname: str, versions: dict[str, str], glibc_minor: int) -> Path:
    wheels = root / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    pyver = pyname.removeprefix("python")
    plats = ["manylinux2014_aarch64"] + [f"manylinux_2_{m}_aarch64" for m in range(17, glibc_minor + 1)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", pyver, "-d", str(wheels)]
    for p in plats:
        cmd += ["--platform", p]
    cmd += [f"{n}=={v}" for n, v in versions.items()]
    log.info("downloading aarch64 wheels: %s", ", ".join(f"{n}=={v}" for n, v in versions.items()))
    _run(cmd, "pip download (aarch64 wheels)")
    site = root / "site"
    tmp = root / "site.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as zf:
            for info in zf.infolist():
                if info.filename in SKIP_IN_WHEELS:
                    continue
                path = zf.extract(info, tmp)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(path, mode)
    shutil.rmtree(site, ignore_errors=True)
    tmp.rename(site)
    shutil.rmtree(wheels, ignore_errors=True)
    return site


# ----------------------------------------------------------------------- plugin


def _build_plugin(root: Path) -> Path | None:
    src = PLUGIN_SOURCE.read_bytes()
    out = root / f"insn_count-{hashlib.sha256(src).hexdigest()[:12]}.so"
    if out.exists():
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    base = [cc] if cc else [sys.executable, "-m", "ziglang", "cc"]
    tmp = out.with_suffix(".tmp")
    try:
        _run([*base, "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-o", str(tmp), str(PLUGIN_SOURCE)],
             "compiling the qemu instruction-count plugin")
    except DependencyError as exc:
        log.warning("%s", exc)
        return None
    tmp.rename(out)
    return out


# ----------------------------------------------------------------------- entry points


def prepare(root: Path | None = None) -> GuestRuntime:
    """Make (or reuse) the aarch64 guest userland; raises DependencyError saying what is missing."""
    qemu = qemu_binary()
    if not qemu:
        raise DependencyError("qemu-aarch64 is not installed", hint="apt-get install qemu-user (setup.sh does it as root)")
    root = Path(root) if root else cache_dir()
    versions = _host_versions()
    with _locked(root):
        stamp = root / "READY.json"
        ready = json.loads(stamp.read_text()) if stamp.exists() else {}
        python = Path(ready.get("python", "/nonexistent"))
        if not python.exists() or ready.get("pyname") is None:
            python, pyname = _build_sysroot(root)
            ready = {"python": str(python), "pyname": pyname}
            stamp.write_text(json.dumps(ready))
        pyname = ready["pyname"]
        site = root / "site"
        if ready.get("wheels") != versions or not site.is_dir():
            _build_site(root, pyname, versions, _glibc_minor(root / "sysroot"))
            ready["wheels"] = versions
            stamp.write_text(json.dumps(ready))
        plugin = _build_plugin(root)
    return GuestRuntime(qemu=qemu, sysroot=root / "sysroot", python=python, site=site, plugin=plugin,
                        versions={"python": pyname, **versions})


INSN_CLASSES = ("total", "load", "store", "simd", "branch")  # the plugin's per-region classes


@dataclass
class GuestRun:
    returncode: int
    output: str
    seconds: float
    insns_region: int | None = None  # instructions executed inside the runner's inference regions
    insns_total: int | None = None  # whole process (interpreter start-up included)
    regions: int | None = None
    region_classes: list[dict[str, int]] | None = None  # per region, in order: INSN_CLASSES counts

    def class_totals(self) -> dict[str, int]:
        """INSN_CLASSES counts summed over the regions."""
        return {c: sum(r[c] for r in self.region_classes or ()) for c in INSN_CLASSES}


def run_guest(rt: GuestRuntime, argv: list[str], count: bool = False, timeout: float = 1800,
              log_dir: Path | None = None) -> GuestRun:
    """Run ``python argv...`` in the aarch64 guest; ``count``: with the instruction-count plugin
    (its log goes to ``log_dir``, default the system temp dir, and is removed after parsing)."""
    import tempfile

    log_path = None
    if count:
        log_path = Path(log_dir or tempfile.gettempdir()) / f".insn.{os.getpid()}.{time.monotonic_ns()}.log"
        log_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(rt.command(argv, log_path), env=rt.env(count), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise DependencyError(f"the aarch64 guest program did not finish within {timeout:.0f} s under qemu") from exc
    run = GuestRun(proc.returncode, (proc.stdout + proc.stderr).strip(), time.perf_counter() - t0)
    if log_path is not None:
        text = log_path.read_text() if log_path.exists() else ""
        log_path.unlink(missing_ok=True)
        m = _INSN_LINE.search(text)
        if m is None:
            raise DependencyError(f"the qemu instruction-count plugin wrote no count ({text.strip()[:200]!r})")
        run.insns_total, run.insns_region, run.regions = (int(g) for g in m.groups())
        run.region_classes = [dict(zip(INSN_CLASSES, map(int, r.groups()))) for r in _REGION_LINE.finditer(text)]
    return run


KERNEL_GUEST = r'''
import ctypes, json, sys
import numpy as np
import tvm

libc = ctypes.CDLL(None, use_errno=True)
mark = lambda p: libc.syscall(0x4321, ctypes.c_ulong(0xC0FFEE), ctypes.c_ulong(p))
work = sys.argv[1]
man = json.load(open(work + "/manifest.json"))
dev = tvm.cpu()
errs = {}
for lib_name, names in man["libs"]:
    lib = tvm.runtime.load_module(work + "/" + lib_name)
    for name in names:
        z = np.load(work + "/" + name + ".npz")
        n_args = len([f for f in z.files if f.startswith("a")])
        args = [tvm.runtime.tensor(z["a%d" % i], dev) for i in range(n_args)]
        f = lib[name]
        f(*args)
        mark(1)
        f(*args)
        mark(2)
        ref = z["ref"]
        got = args[-1].numpy().reshape(ref.shape)
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()
        errs[name] = float(diff / (np.abs(ref).max() or 1.0))
print("GUEST_ERRORS " + json.dumps(errs))
'''
KERNEL_CHUNK = 24  # kernels per compiled library


def run_kernels(kernels: list[dict], tvm_target: dict, work: Path, count: bool = True, timeout: float = 3600,
                say=lambda s: None) -> list[tuple[dict[str, int] | None, float]]:
    """Compile standalone TIR kernels for an aarch64 ``tvm_target``, run each once (after a warm-up call)
    in the guest and compare its last argument with the reference: per kernel ``(instruction classes of
    the counted call or None, max |got - ref| / max |ref|)``. ``kernels``: dicts with ``name`` (a C
    symbol), ``func`` (PrimFunc), ``args`` (numpy arrays, the output buffer last) and ``ref``."""
    import shlex

    import numpy as np
    import tvm

    from targets.arm import find_cross_linker
    from targets.tvm_backend import link_command_fcompile

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    linker = find_cross_linker()
    if not linker:
        raise DependencyError("no aarch64 linker: neither aarch64-linux-gnu-gcc on PATH nor the ziglang package")
    target = tvm.target.Target(tvm_target)
    libs = []
    for c0 in range(0, len(kernels), KERNEL_CHUNK):
        chunk = kernels[c0:c0 + KERNEL_CHUNK]
        mod = tvm.IRModule({g["name"]: g["func"].with_attr("global_symbol", g["name"]) for g in chunk})
        with target:
            lib = tvm.compile(mod, target=target)
        lib_name = f"lib{c0 // KERNEL_CHUNK}.so"
        lib.export_library(str(work / lib_name), fcompile=link_command_fcompile(shlex.split(linker)))
        for g in chunk:
            np.savez(work / f"{g['name']}.npz", ref=g["ref"], **{f"a{i}": a for i, a in enumerate(g["args"])})
        libs.append((lib_name, [g["name"] for g in chunk]))
        say(f"compiled {c0 + len(chunk)}/{len(kernels)} kernels")
    (work / "manifest.json").write_text(json.dumps({"libs": libs}))
    (work / "guest.py").write_text(KERNEL_GUEST)
    rt = prepare()
    run = run_guest(rt, [str(work / "guest.py"), str(work)], count=count, timeout=timeout, log_dir=work)
    if run.returncode != 0 or "GUEST_ERRORS " not in run.output:
        raise DependencyError(f"the aarch64 kernel run failed: {run.output[-1500:]}")
    errs = json.loads(run.output.split("GUEST_ERRORS ", 1)[1].splitlines()[0])
    classes: list = list(run.region_classes or []) if count else [None] * len(kernels)
    if len(classes) != len(kernels):
        raise DependencyError(f"{len(classes)} counted regions for {len(kernels)} kernels")
    return [(c, errs[g["name"]]) for g, c in zip(kernels, classes)]


def run_bundle(rt: GuestRuntime, bundle: Path, count: bool = False, timeout: float = 1800) -> GuestRun:
    """Run the bundle's own ``run_bundle.py`` self-check in the aarch64 guest."""
    bundle = Path(bundle).resolve()
    return run_guest(rt, [str(bundle / "run_bundle.py"), str(bundle)], count, timeout, log_dir=bundle.parent)


def _main(argv: list[str]) -> int:
    """``python -m targets.device_qemu [--prepare]``: build the cache (setup.sh) and print it."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        rt = prepare()
    except DependencyError as exc:
        print(f"aarch64 guest runtime not prepared: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    print(f"aarch64 guest runtime ready: {rt.python} ({', '.join(f'{k} {v}' for k, v in rt.versions.items())}); "
          f"instruction-count plugin: {rt.plugin or 'not built'}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
