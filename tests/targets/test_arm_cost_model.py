"""aarch64 cost model: named core models over qemu instruction counts, per-core fits, the arm target
variants that select them, and the target-chosen default sparsity pattern."""
from __future__ import annotations

import json

import pytest

from targets import lower_sparse as ls
from targets.arm_cores import CORES, core_for


def test_core_model_cycles_exact():
    a76, a55 = CORES["a76"], CORES["a55"]
    counts = {"total": 400, "load": 100, "store": 10, "simd": 300, "branch": 5}
    # a76: the SIMD pipes bind (300 / 2 = 150 > 400 / 4, 100 / 2, 10, 5), over the 0.85 efficiency
    assert a76.cycles(counts, 0) == pytest.approx(150 / 0.85)
    # 1 MiB of weights on the a76: 448 KiB from L2 at 32 B/cycle, 512 KiB from L3 at 16 B/cycle
    assert a76.memory_cycles(1 << 20) == pytest.approx((448 << 10) / 32 + (512 << 10) / 16)
    assert a76.cycles(counts, 1 << 20) == pytest.approx(a76.memory_cycles(1 << 20))  # out of order: the max
    # a55: in order, issue 2 (400 / 2 = 200 < 300 SIMD ops on one pipe), misses add half their cycles
    assert a55.cycles(counts, 0) == pytest.approx(300 / 0.65)
    mem = (96 << 10) / 16 + (896 << 10) / 8 + (1 << 20) / (5.0 / 1.8)
    assert a55.memory_cycles(2 << 20) == pytest.approx(mem)
    assert a55.cycles(counts, 2 << 20) == pytest.approx(300 / 0.65 + mem / 2)
    assert a76.seconds(counts, 0) == pytest.approx(150 / 0.85 / 2.6e9)


def test_core_for_mcpu():
    assert core_for(None) is CORES["a76"] and core_for("generic") is CORES["a76"]
    assert core_for("cortex-a55") is CORES["a55"] and core_for("neoverse-n1") is None


def test_arm_fits_are_chosen_by_core():
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    assert ls.cost_isa(arm) == "arm"
    assert ls.cost_isa({**arm, "mcpu": "cortex-a55"}) == "arm-cortex-a55"
    a55 = ls.fit_for("arm-cortex-a55")
    assert a55.isa == "arm-cortex-a55" and a55.cache_bytes == CORES["a55"].l2_bytes
    assert a55.llc_bytes == CORES["a55"].l3_bytes
    # plain arm and an mcpu without a core model decide as the default core, and say so
    assert ls.fit_for("arm").isa == ls.fit_for("arm-neoverse-n1").isa == ls.ARM_DEFAULT_FIT
    _, basis = ls.predict("MatMul", 1024, 1024, 1, 1, 0.1, (8, 1), "arm", isa="arm")
    assert basis == "arm-cortex-a76 core model (qemu instruction counts), default for arm"
    _, basis = ls.predict("MatMul", 1024, 1024, 1, 1, 0.1, (8, 1), "arm", isa="arm-cortex-a55")
    assert basis == "arm-cortex-a55 core model (qemu instruction counts)"


def test_kernel_time_uses_the_fit_cache_sizes():
    """A fit's L2/L3 features are computed with the caches of the core it was fitted for."""
    f = ls.fit_for("arm-cortex-a55")
    args = ("MatMul", "dense", 512, 512, 1, 1.0, (1, 1))  # 1 MiB: past the a55's 128 KiB L2
    feats = ls.time_features(*args, caches=(f.cache_bytes, f.llc_bytes))
    assert feats != ls.time_features(*args)  # the x86 fit's 2 MiB "L2" would hold it
    coef = f.models[ls.model_key("MatMul", "dense", 1, (1, 1))]
    assert ls.kernel_time(*args, isa="arm-cortex-a55") == pytest.approx(sum(a * b for a, b in zip(coef, feats)))


def test_arm_target_variants_and_explained_patterns():
    import targets

    _, spec = targets.resolve("arm-a55")
    assert spec.tvm_target["mcpu"] == "cortex-a55" and spec.extra["core_model"] == "cortex-a55"
    assert targets.resolve("arm-cortex-a55")[1].tvm_target == spec.tvm_target
    # the int8 sdot kernels need the dot-product extension: recorded, so the runner refuses a CPU without it
    assert "asimddp" in spec.isa_features and "asimddp" not in targets.resolve("arm")[1].isa_features
    pats = spec.extra["patterns"]
    assert pats["cost_model"] == "arm-cortex-a55" and spec.preferred_pattern == "unstructured"
    # the figures explain-target shows come from the fit: block rows beat unstructured on a GEMV
    assert pats["8x1"]["gemv 1024x1024"] > pats["unstructured"]["gemv 1024x1024"] > 1.0
    assert targets.resolve("arm")[1].extra["patterns"]["cost_model"] == ls.ARM_DEFAULT_FIT


def test_pattern_auto_is_the_target_default(monkeypatch, tmp_path):
    """--pattern left at auto takes the target's preferred_pattern (a plugin target can change it)."""
    import dataclasses

    import targets
    from compressor import pipeline
    from compressor.recipe import Options

    model = tmp_path / "m.onnx"
    from models.zoo import ensure_built

    model = ensure_built("mlp", tmp_path)
    plan = pipeline.plan(Options(model=str(model), target="x86", sparsity=0.5))
    assert plan.opts.pattern == "unstructured"
    real = targets.resolve

    def blocky(tag):
        t, spec = real(tag)
        return t, dataclasses.replace(spec, preferred_pattern="8x1")

    monkeypatch.setattr(targets, "resolve", blocky)
    plan = pipeline.plan(Options(model=str(model), target="x86", sparsity=0.5))
    cfg = [p for p, _ in plan.passes if p.name.startswith("sparsify.")][0].config
    assert plan.opts.pattern == "8x1" and cfg.pattern == "8x1" and ".8x1." in plan.output.name
    plan = pipeline.plan(Options(model=str(model), target="x86", sparsity=0.5, pattern="unstructured"))
    assert plan.opts.pattern == "unstructured"


@pytest.mark.slow
def test_demo_on_arm_lowers_its_eligible_layer(cli, tmp_path):
    """The README demo on arm: the one sparse layer left after the gate (the hidden Gemm, 88.5% zeros)
    gets a sparse kernel by the arm fit (the x86 fit borrowed before predicted 0.84x)."""
    out = tmp_path / "demo.arm.bundle"
    r = cli("demo", "--target", "arm", "--sparsity", "0.9", "-o", out)
    assert r.code == 0, r
    rep = json.loads((out / "report.json").read_text())
    layers = [L for p in rep["target_passes"] if p["name"] == "lower.sparse" for L in p["stats"]["layers"]]
    lowered = [L for L in layers if L["lowered"]]
    assert lowered and all("arm-cortex-a76 core model" in L["cost_model"] for L in layers)


@pytest.mark.emulated
@pytest.mark.slow
def test_calibration_counts_classes_and_checks_kernels_on_aarch64(tmp_path):
    """bench/cost_model_arm.py --quick: the grid's kernels run in the aarch64 guest (outputs checked
    against numpy there), each call counted by instruction class."""
    from compressor.errors import DependencyError
    from targets import device_qemu

    try:
        device_qemu.prepare()
    except DependencyError as exc:
        pytest.skip(f"no aarch64 guest under qemu: {exc.one_line()}")
    from bench import cost_model_arm as cma

    saved = tmp_path / "k.json"
    assert cma.main(["--quick", "--work", str(tmp_path / "w"), "--save", str(saved)]) == 0
    kernels = json.loads(saved.read_text())
    assert len(kernels) == 6
    for k in kernels:
        c = k["insns"]
        assert c["total"] > 0 and c["simd"] > 0 and c["load"] > 0 and k["rel_err"] <= 1e-4
        assert c["load"] + c["store"] + c["simd"] + c["branch"] <= c["total"]
    by = {(k["op"], k["block"]): k["insns"]["total"] for k in kernels}
    assert by[("MatMul", "8x1")] < by[("MatMul", "dense")] / 2  # 90% 8x1: far fewer instructions
    assert by[("Conv", "8x1")] < by[("Conv", "dense")] / 2


def test_explain_target_names_the_int8_sparse_block():
    """explain-target tells which block pattern the int8 sparse kernel takes for the target's code."""
    import targets

    assert targets.resolve("x86-avx2")[1].extra["patterns"]["int8_sparse"] == {"kernel": "avx2", "pattern": "8x4"}
    assert targets.resolve("x86-avx512vnni")[1].extra["patterns"]["int8_sparse"] == {"kernel": "vnni", "pattern": "16x4"}
    assert targets.resolve("arm-a76")[1].extra["patterns"]["int8_sparse"] == {"kernel": "sdot", "pattern": "4x4"}
