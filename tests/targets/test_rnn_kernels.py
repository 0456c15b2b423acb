"""Fused GRU/LSTM recurrence kernels (targets/rnn_kernels.py): segment packing, the kernel
against a float64 numpy oracle for every cell / direction / weight mode, the Relax converter
against onnxruntime, and lower.rnn's fuse-or-unroll choice."""
from __future__ import annotations

import numpy as np
import pytest

from compressor.pass_base import PassContext, make_config
from compressor.pass_manager import PassManager
from targets.lower_rnn import LowerRNN
from targets import resolve
from targets import rnn_kernels as rk
from targets.host import detect_host
from tests.targets.test_lower_rnn import as_layout0, helper_rnn

tvm = pytest.importorskip("tvm")
X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mattr": ["+avx2", "+fma"]}  # every x86-64 host CI runs on
on_x86 = pytest.mark.skipif(detect_host().arch != "x86_64", reason="runs x86 code")


def test_fast_tanh_bound():
    v = np.linspace(-12, 12, 200_001, dtype=np.float32)
    assert np.abs(rk.fast_tanh_np(v) - np.tanh(v.astype(np.float64))).max() < 1e-6


def test_pack_segments_round_trip_and_skips_zero_segments():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 48, 5)).astype(np.float32)
    w[0, 8:16, 1] = 0  # one whole 8-row segment of direction 0
    w[1, :, 3] = 0  # a whole input column of direction 1
    s = rk.pack_segments(w, 8, phases=(32,))
    assert s.dense == 2 * 6 * 5 and s.stored == s.dense - 1 - 6
    back = np.zeros_like(w)
    c = 0
    for d in range(2):
        for lo, hi in ((0, 32), (32, 48)):  # phase 1 starts at row 32: its own chunks
            u = rk.tile(hi - lo, 8)
            for r0 in range(lo, hi, u * 8):
                slots = int(s.ptr[c + 1] - s.ptr[c])
                assert slots % u == 0
                for st in range(slots // u):
                    for q in range(u):
                        i = s.ptr[c] + st * u + q
                        back[d, r0 + q * 8:r0 + q * 8 + 8, s.k[i]] += s.val[i]  # padding: zeros at k 0
                c += 1
    assert c == len(s.ptr) - 1
    np.testing.assert_array_equal(back, w)
    assert s.steps <= s.dense_steps == 2 * (1 + 1) * 5  # u = 4 (32 rows), u = 2 (16 rows): one chunk each
    empty = rk.pack_segments(np.zeros((1, 8, 2), np.float32), 4)
    assert empty.stored == 0 and empty.val.shape == (1, 4)  # a dummy row: buffers may not be empty


def test_weight_mode_follows_stored_fraction():
    rng = np.random.default_rng(1)
    dense = rng.standard_normal((1, 96, 32)).astype(np.float32)
    blocks = dense * np.repeat(rng.random((1, 6, 32)) < 0.1, 16, axis=1)  # 16x1 blocks, 90% zero
    assert rk.pack_segments(blocks, 16).steps * rk.ELL_STEP_COST <= 32
    assert rk.weight_mode(rk.pack_segments(dense, 16)) == "dense"
    assert rk.weight_mode(rk.pack_segments(blocks, 16)) == "seg"
    assert rk.weight_mode(rk.pack_segments(blocks, 16), "dense") == "dense"


CASES = [  # cell, direction, lbr, seq, batch, input, hidden, sparsity
    ("GRU", "forward", 1, 6, 1, 8, 32, 0.9),
    ("GRU", "bidirectional", 0, 5, 2, 6, 16, 0.5),
    ("GRU", "reverse", 1, 4, 3, 3, 12, 0.0),  # hidden 12: 4-lane segments
    ("LSTM", "reverse", 0, 7, 3, 5, 8, 0.0),
    ("LSTM", "bidirectional", 0, 4, 1, 4, 12, 0.7),
]


@on_x86
@pytest.mark.parametrize("modes", [("seg", "seg"), ("dense", "dense"), ("dense", "seg")])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-lbr{c[2]}-h{c[6]}")
def test_kernel_matches_float64_oracle(case, modes):
    cell, direction, lbr, S, B, I, H, sp = case
    spec = rk.RNNSpec(cell, S, B, I, H, direction, lbr)
    G, D = spec.gates, spec.dirs
    rng = np.random.default_rng(hash(case) % 2**32)
    w = rng.standard_normal((D, G * H, I)).astype(np.float32)
    r = (rng.standard_normal((D, G * H, H)) * 0.3).astype(np.float32)
    w[rng.random(w.shape) < sp] = 0
    r[rng.random(r.shape) < sp] = 0
    b = rng.standard_normal((D, 2 * G * H)).astype(np.float32)
    x = rng.standard_normal((S, B, I)).astype(np.float32)
    h0 = rng.standard_normal((D, B, H)).astype(np.float32)
    c0 = rng.standard_normal((D, B, H)).astype(np.float32)
    f, consts = rk.build(spec, w, r, b, X86, modes)
    outs = [np.zeros((S, D, B, H), np.float32), np.zeros((D, B, H), np.float32)]
    outs += [np.zeros((D, B, H), np.float32)] if cell == "LSTM" else []
    args = [tvm.runtime.tensor(a) for a in [x, h0] + ([c0] if cell == "LSTM" else []) + consts + outs]
    f(*args)
    want = rk.reference(spec, x, w, r, b, h0, c0)
    for got, ref in zip(args[-len(outs):], want):
        np.testing.assert_allclose(got.numpy(), ref, atol=5e-6, rtol=0)
    assert np.abs(want[0]).max() > 0.1  # the oracle is not trivially zero


@on_x86
@pytest.mark.parametrize("cell,layout,init,direction", [("GRU", 1, "input", "bidirectional"),
                                                        ("LSTM", 0, "const", "forward"),
                                                        ("LSTM", 1, "none", "reverse")])
def test_converter_matches_onnxruntime(cell, layout, init, direction, tmp_path, ort_run):
    """The whole node through the x86 target's compile (import converter -> TIR -> .so)."""
    model, feeds = helper_rnn(cell, direction=direction, layout=layout, init=init, lbr=1, seq=5, batch=2,
                              inp=3, hidden=8)
    import onnx

    path = tmp_path / "rnn.onnx"
    onnx.save(model, str(path))
    tgt, spec = resolve("x86")
    art = tgt.compile(path, spec, tmp_path, {})
    assert [k["cell"] for k in art.details["kernels"]["rnn_fused"]] == [cell]
    ref_path = tmp_path / "ref.onnx"
    onnx.save(as_layout0(model), str(ref_path))
    want = ort_run(ref_path, feeds)
    got = tgt.run(tmp_path / art.path, spec, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=0)


class _Spec:
    def __init__(self, family):
        self.family = family


def _lower(model, family, **cfg):
    p = LowerRNN(make_config(LowerRNN, cfg))
    out, recs = PassManager([(p, "builtin:test")]).run(model, PassContext(target=_Spec(family) if family else None))
    return out, recs[0]


@pytest.mark.parametrize("family,cfg,fused", [
    ("x86", {}, True), ("arm", {}, True),
    ("cuda", {}, False),  # no fused kernel for CUDA
    (None, {}, False),  # the pass alone (no target): unroll, as before
    ("x86", {"fuse": "never"}, False),
    ("x86", {"fuse_max_macs": 3 * 4 * 4 * (4 + 5) - 1}, False),  # one MAC over the limit (batch 4)
    ("x86", {"fuse_max_macs": 3 * 4 * 4 * (4 + 5)}, True),
])
def test_lower_rnn_fuses_small_cpu_rnns(family, cfg, fused):
    model, _ = helper_rnn("GRU", batch=4, inp=5, hidden=4)
    out, rec = _lower(model, family, **cfg)
    ops = [n.op_type for n in out.graph.node]
    if fused:
        assert "GRU" in ops and rec.stats["fused"] == ["gru0"] and rec.stats["lowered"] == 0
    else:
        assert "GRU" not in ops and rec.stats["fused"] == [] and rec.stats["lowered"] == 1


def test_lower_rnn_unrolls_nodes_the_kernel_cannot_take_only_when_it_can():
    """A node with a non-default activation is neither fused nor unrolled: kept with a warning."""
    model, _ = helper_rnn("GRU", extra_attrs={"activations": ["Relu", "Tanh"]})
    out, rec = _lower(model, "x86")
    assert rec.stats["fused"] == [] and rec.stats["skipped"] == 1 and "non-default activations" in rec.warnings[0]


def test_lower_rnn_fuse_config_is_validated():
    from compressor.errors import UsageError

    with pytest.raises(UsageError, match="fuse"):
        make_config(LowerRNN, {"fuse": "always"})
