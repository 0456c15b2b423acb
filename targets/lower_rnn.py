"""``lower.rnn``: unroll ONNX ``LSTM`` and ``GRU`` into MatMul and elementwise ops,
for targets whose importer has no recurrent ops (e.g. TVM's Relax ONNX frontend).

Notation (ONNX spec, opset 14+): X_t is one time step [batch, input], H the hidden
state [batch, hidden], C the LSTM cell state, W/R/B the input / recurrence weights
and biases split per gate (Wb*, Rb*), sigma = Sigmoid, "*" elementwise.

LSTM (gate order in W/R/B: i, o, f, c):
    i_t = sigma(X_t Wi^T + H_{t-1} Ri^T + Wbi + Rbi)
    f_t = sigma(X_t Wf^T + H_{t-1} Rf^T + Wbf + Rbf)
    g_t = tanh (X_t Wc^T + H_{t-1} Rc^T + Wbc + Rbc)
    o_t = sigma(X_t Wo^T + H_{t-1} Ro^T + Wbo + Rbo)
    C_t = f_t * C_{t-1} + i_t * g_t
    H_t = o_t * tanh(C_t)

GRU (gate order in W/R/B: z, r, h):
    z_t = sigma(X_t Wz^T + H_{t-1} Rz^T + Wbz + Rbz)
    r_t = sigma(X_t Wr^T + H_{t-1} Rr^T + Wbr + Rbr)
    linear_before_reset = 0:  h_t = tanh(X_t Wh^T + (r_t * H_{t-1}) Rh^T + Rbh + Wbh)
    linear_before_reset = 1:  h_t = tanh(X_t Wh^T + r_t * (H_{t-1} Rh^T + Rbh) + Wbh)
    H_t = (1 - z_t) * h_t + z_t * H_{t-1}      (emitted as h_t + z_t * (H_{t-1} - h_t))

Lowering. W, R, B must be constants; at rewrite time they are transposed per
direction into W^T [input, G*hidden] and R^T [hidden, G*hidden] (gate order kept,
so all gates of a step come out of one MatMul and a Split), and the biases that sit
outside the reset gate are pre-summed. The input part X W^T + b is computed for all
time steps with one MatMul per direction and split along time; each step then costs
one or two MatMuls (H_{t-1} R^T) plus elementwise ops. States are carried as
[1, batch, hidden]. With no initial state (or an all-zero constant one) the first
step drops the H_{t-1} / C_{t-1} terms. The reverse direction runs t = S-1 .. 0 and
writes H_t at time index t (ONNX semantics). layout=1 transposes X / initial states in
and Y / Y_h / Y_c out. Only outputs that are read or are graph outputs are built.

Fused (``fuse="auto"``, CPU targets): a float32 node with a static batch whose fused
kernel runs at most ``fuse_max_macs`` multiply-adds per time step is left whole (listed in the
``fused`` metric): the backend runs it as one fused recurrence kernel
(``targets/rnn_kernels.py``), where unrolling would cost a VM call per op per step.

Left in place (listed in the pass warnings): non-default activations, clip,
input_forget, LSTM peepholes P (unless an all-zero constant), non-constant W/R/B,
sequence_lens that is not a constant equal to the sequence length everywhere,
unknown sequence length, more than ``max_steps`` time steps, non-float tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from compressor.errors import UsageError
from compressor.pass_base import Pass, PassContext, PassResult
from targets.rnn_kernels import CELLS, RNNSpec, attr_problem, step_macs  # shared with the fused kernel



FUSE_MODES = ("auto", "never")
FUSE_FAMILIES = ("x86", "arm")  # targets with a fused recurrence kernel (targets/rnn_kernels.py)


@dataclass(frozen=True)
class LowerRNNConfig:
    max_steps: int = 512
    # "auto": on CPU targets, a float32 node whose fused kernel runs at most fuse_max_macs
    # multiply-adds per time step (all directions and batch rows; a weight the kernel runs
    # sparse counts its padded steps x ELL_STEP_COST) is kept whole for the backend's fused
    # recurrence kernel instead of unrolled; "never": always unroll. bench/rnn_kernels.md:
    # fused wins up to 33 K dense MACs per step and loses from 98 K
    fuse: str = "auto"
    fuse_max_macs: int = 1 << 16

    def __post_init__(self):
        if self.max_steps < 1:
            raise UsageError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.fuse not in FUSE_MODES:
            raise UsageError(f"fuse must be one of {FUSE_MODES}, got {self.fuse!r}")
        if self.fuse_max_macs < 0:
            raise UsageError(f"fuse_max_macs must be >= 0, got {self.fuse_max_macs}")


class _Skip(Exception):
    """A node that cannot be lowered; the message is the reason."""


def _present(node: gs.Node, i: int) -> gs.Tensor | None:
    if i < len(node.inputs) and node.inputs[i] is not None and node.inputs[i].name:
        return node.inputs[i]
    return None


def _out(node: gs.Node, i: int) -> gs.Tensor | None:
    if i < len(node.outputs) and node.outputs[i] is not None and node.outputs[i].name:
        return node.outputs[i]
    return None


def _const(t: gs.Tensor | None, what: str) -> np.ndarray | None:
    if t is None:
        return None
    if not isinstance(t, gs.Constant):
        raise _Skip(f"{what} is not a constant")
    return np.asarray(t.values)


class _Builder:
    """Creates uniquely named nodes / tensors and appends them to the graph."""

    def __init__(self, graph: gs.Graph, prefix: str, taken: set[str]):
        self.graph, self.prefix, self.taken = graph, prefix, taken
        self.count = 0
        self.nodes_added = 0

    def name(self, hint: str) -> str:
        while True:
            self.count += 1
            n = f"{self.prefix}/{hint}_{self.count}"
            if n not in self.taken:
                self.taken.add(n)
                return n

    def const(self, hint: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.name(hint), np.ascontiguousarray(value))

    def ints(self, hint: str, values) -> gs.Constant:
        return self.const(hint, np.asarray(values, dtype=np.int64))

    def op(self, op: str, inputs: list, attrs: dict | None = None, n_out: int = 1, hint: str | None = None):
        hint = hint or op.lower()
        outs = [gs.Variable(self.name(hint)) for _ in range(n_out)]
        self.graph.nodes.append(gs.Node(op, self.name(op), attrs=attrs or {}, inputs=inputs, outputs=outs))
        self.nodes_added += 1
        return outs if n_out > 1 else outs[0]

    # helpers -----------------------------------------------------------
    def split(self, x, sizes: list[int], axis: int, hint: str = "split"):
        if len(sizes) == 1:
            return [x]
        return self.op("Split", [x, self.ints("split_sizes", sizes)], {"axis": axis}, n_out=len(sizes), hint=hint)

    def concat(self, xs: list, axis: int, hint: str = "concat"):
        return xs[0] if len(xs) == 1 else self.op("Concat", xs, {"axis": axis}, hint=hint)

    def transpose(self, x, perm: list[int], hint: str = "transpose"):
        return self.op("Transpose", [x], {"perm": perm}, hint=hint)


def _static_len(x: gs.Tensor, axis: int) -> int | None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 3:
        return None
    s = shape[axis]
    return int(s) if isinstance(s, (int, np.integer)) and s > 0 else None


def _float_dtype(w: np.ndarray) -> np.dtype:
    if w.dtype.kind != "f":
        raise _Skip(f"weights have dtype {w.dtype}, not float")
    return w.dtype


def _check_attrs(node: gs.Node, num_dir: int) -> None:
    problem = attr_problem(node.op, node.attrs, num_dir)
    if problem:
        raise _Skip(problem)


def _initial_states(b: _Builder, t: gs.Tensor | None, layout: int, num_dir: int, what: str) -> list:
    """Per-direction [1, batch, hidden] states (None = zeros)."""
    if t is None:
        return [None] * num_dir
    if isinstance(t, gs.Constant):
        v = np.asarray(t.values)
        if layout == 1:
            v = v.transpose(1, 0, 2)
        return [None if not np.any(v[d]) else b.const(f"{what}_d{d}", v[d : d + 1]) for d in range(num_dir)]
    if layout == 1:
        t = b.transpose(t, [1, 0, 2], hint=f"{what}_t")
    return b.split(t, [1] * num_dir, axis=0, hint=what)


def _lower(node: gs.Node, graph: gs.Graph, b: _Builder, max_steps: int, fuse_max_macs: int | None = None,
           fuse_target: Any = None) -> str:
    """Unroll ``node`` (returns "unrolled"), or, when ``fuse_max_macs`` is given and the node
    is a float32 recurrence with a static batch whose fused kernel for ``fuse_target`` runs
    at most that many multiply-adds per step (``targets.rnn_kernels.step_macs``), leave it
    whole for that kernel (returns "fused"). Raises _Skip before changing anything when the
    node can be neither."""
    op = node.op
    G = CELLS[op]
    direction = node.attrs.get("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction not in ("forward", "reverse", "bidirectional"):
        raise _Skip(f"unknown direction {direction!r}")
    num_dir = 2 if direction == "bidirectional" else 1
    layout = int(node.attrs.get("layout", 0))
    if layout not in (0, 1):
        raise _Skip(f"unknown layout {layout}")
    _check_attrs(node, num_dir)
    lbr = int(node.attrs.get("linear_before_reset", 0)) if op == "GRU" else 0

    x = _present(node, 0)
    W = _const(_present(node, 1), "W")
    R = _const(_present(node, 2), "R")
    if x is None or W is None or R is None:
        raise _Skip("missing X, W or R")
    dtype = _float_dtype(W)
    Bias = _const(_present(node, 3), "B")
    seq_lens_t = _present(node, 4)
    h0_t = _present(node, 5)
    c0_t = _present(node, 6) if op == "LSTM" else None
    if op == "LSTM" and _present(node, 7) is not None:
        P = _present(node, 7)
        if not isinstance(P, gs.Constant) or np.any(np.asarray(P.values)):
            raise _Skip("peepholes (P) are not supported")
    hidden = R.shape[-1]
    if W.ndim != 3 or W.shape[0] != num_dir or W.shape[1] != G * hidden or R.shape != (num_dir, G * hidden, hidden):
        raise _Skip(f"unexpected W/R shapes {W.shape}/{R.shape}")
    if Bias is None:
        Bias = np.zeros((num_dir, 2 * G * hidden), dtype)
    if Bias.shape != (num_dir, 2 * G * hidden):
        raise _Skip(f"unexpected B shape {Bias.shape}")

    S = _static_len(x, 1 if layout == 1 else 0)
    if S is None:
        raise _Skip("sequence length is not static (run shape inference / fix input shapes)")
    if S > max_steps:
        raise _Skip(f"sequence length {S} exceeds max_steps={max_steps}")
    if seq_lens_t is not None:
        if not isinstance(seq_lens_t, gs.Constant):
            raise _Skip("sequence_lens is not a constant")
        if np.any(np.asarray(seq_lens_t.values) != S):
            raise _Skip(f"sequence_lens {np.asarray(seq_lens_t.values).tolist()} differ from the sequence length {S}")
    for t, what in ((h0_t, "initial_h"), (c0_t, "initial_c")):
        if t is not None and isinstance(t, gs.Constant) and np.asarray(t.values).ndim != 3:
            raise _Skip(f"{what} is not rank 3")

    batch = _static_len(x, 0 if layout == 1 else 1)
    if fuse_max_macs is not None and dtype == np.float32 and batch is not None:
        spec = RNNSpec(op, S, batch, int(W.shape[2]), hidden, direction, lbr)
        # the kernel never runs more than the dense MACs: pack the weights only when that is over
        if spec.macs_per_step() <= fuse_max_macs or step_macs(spec, W, R, fuse_target) <= fuse_max_macs:
            return "fused"

    outs = [_out(node, i) for i in range(3 if op == "LSTM" else 2)]
    wanted = [t if t is not None and (t.outputs or t in graph.outputs) else None for t in outs]

    # ---- build ---------------------------------------------------------------------
    h_init = _initial_states(b, h0_t, layout, num_dir, "h0")
    c_init = _initial_states(b, c0_t, layout, num_dir, "c0") if op == "LSTM" else [None] * num_dir
    xs = b.transpose(x, [1, 0, 2], hint="x_sbi") if layout == 1 else x  # [S, batch, input]
    H = hidden
    ys, y_h, y_c = [], [], []
    for d in range(num_dir):
        wt = W[d].T.astype(dtype)  # [input, G*H]
        rt = R[d].T.astype(dtype)  # [H, G*H]
        wb, rb = Bias[d, : G * H].astype(dtype), Bias[d, G * H :].astype(dtype)
        if op == "LSTM" or lbr == 0:
            xbias, rbias_h = wb + rb, None
        else:  # GRU, linear_before_reset: Rbh stays inside r * (...)
            xbias = wb + np.concatenate([rb[: 2 * H], np.zeros(H, dtype)])
            rbias_h = rb[2 * H :] if np.any(rb[2 * H :]) else None
        xw = b.op("MatMul", [xs, b.const(f"W_T_d{d}", wt)], hint=f"xw_d{d}")
        if np.any(xbias):
            xw = b.op("Add", [xw, b.const(f"xbias_d{d}", xbias)], hint=f"xwb_d{d}")
        steps = b.split(xw, [1] * S, axis=0, hint=f"xw_t_d{d}")  # each [1, batch, G*H]
        reverse = direction == "reverse" or d == 1
        order = range(S - 1, -1, -1) if reverse else range(S)
        h, c = h_init[d], c_init[d]
        hs: list[Any] = [None] * S
        if op == "LSTM":
            r_c = b.const(f"R_T_d{d}", rt)
            for t in order:
                g = steps[t]
                if h is not None:
                    g = b.op("Add", [g, b.op("MatMul", [h, r_c], hint="hr")], hint="gates")
                i_, o_, f_, c_ = b.split(g, [H] * 4, axis=2, hint="iofc")
                i_ = b.op("Sigmoid", [i_], hint="i")
                o_ = b.op("Sigmoid", [o_], hint="o")
                c_ = b.op("Tanh", [c_], hint="g")
                ic = b.op("Mul", [i_, c_], hint="ig")
                if c is not None:
                    f_ = b.op("Sigmoid", [f_], hint="f")
                    ic = b.op("Add", [b.op("Mul", [f_, c], hint="fc"), ic], hint="c")
                c = ic
                h = b.op("Mul", [o_, b.op("Tanh", [c], hint="tanh_c")], hint="h")
                hs[t] = h
        else:
            r_zr = b.const(f"R_zr_T_d{d}", rt[:, : 2 * H]) if lbr == 0 else None
            r_h = b.const(f"R_h_T_d{d}", rt[:, 2 * H :]) if lbr == 0 else None
            r_all = b.const(f"R_T_d{d}", rt) if lbr else None
            rbh = b.const(f"Rbh_d{d}", rbias_h) if rbias_h is not None else None
            for t in order:
                gzr, gh = b.split(steps[t], [2 * H, H], axis=2, hint="g_zr_h")
                if h is None:
                    z, r = b.split(b.op("Sigmoid", [gzr], hint="zr"), [H, H], axis=2, hint="z_r")
                    if lbr and rbh is not None:
                        gh = b.op("Add", [gh, b.op("Mul", [r, rbh], hint="r_rbh")], hint="gh")
                    hh = b.op("Tanh", [gh], hint="hh")
                    h = b.op("Sub", [hh, b.op("Mul", [z, hh], hint="z_hh")], hint="h")
                else:
                    if lbr:
                        hr_zr, hr_h = b.split(b.op("MatMul", [h, r_all], hint="hr"), [2 * H, H], axis=2, hint="hr_zr_h")
                    else:
                        hr_zr = b.op("MatMul", [h, r_zr], hint="hr_zr")
                    zr = b.op("Sigmoid", [b.op("Add", [gzr, hr_zr], hint="zr_pre")], hint="zr")
                    z, r = b.split(zr, [H, H], axis=2, hint="z_r")
                    if lbr:
                        if rbh is not None:
                            hr_h = b.op("Add", [hr_h, rbh], hint="hr_h_b")
                        rec = b.op("Mul", [r, hr_h], hint="r_hr")
                    else:
                        rec = b.op("MatMul", [b.op("Mul", [r, h], hint="r_h"), r_h], hint="rh_r")
                    hh = b.op("Tanh", [b.op("Add", [gh, rec], hint="hh_pre")], hint="hh")
                    diff = b.op("Sub", [h, hh], hint="h_minus_hh")
                    h = b.op("Add", [hh, b.op("Mul", [z, diff], hint="z_diff")], hint="h")
                hs[t] = h
        if wanted[0] is not None:
            seq = b.concat(hs, axis=0, hint=f"y_d{d}")  # [S, batch, H]
            ys.append(b.op("Unsqueeze", [seq, b.ints("axes", [1])], hint=f"y4_d{d}"))  # [S, 1, batch, H]
        y_h.append(h)
        y_c.append(c)

    results = []
    if wanted[0] is not None:
        y = b.concat(ys, axis=1, hint="y")
        results.append((wanted[0], b.transpose(y, [2, 0, 1, 3], hint="y_bsdh") if layout == 1 else y))
    for k, states in ((1, y_h), (2, y_c)):
        if k < len(wanted) and wanted[k] is not None:
            s = b.concat(states, axis=0, hint=f"state{k}")
            results.append((wanted[k], b.transpose(s, [1, 0, 2], hint=f"state{k}_t") if layout == 1 else s))

    # ---- rewire: the new tensors take over the names of the node's outputs ----------
    node.inputs.clear()
    node.outputs.clear()
    for orig, new in results:
        if new is orig:
            continue
        for consumer in list(orig.outputs):
            for i, inp in enumerate(consumer.inputs):
                if inp is orig:
                    consumer.inputs[i] = new
        for i, go in enumerate(graph.outputs):
            if go is orig:
                graph.outputs[i] = new
        oname = orig.name
        orig.name = b.name("replaced")  # free the name for the replacement (orig is now dangling)
        new.name, new.dtype, new.shape = oname, orig.dtype, orig.shape
    return "unrolled"


class LowerRNN(Pass):
    name = "lower.rnn"
    description = ("unroll LSTM/GRU into MatMul and elementwise ops (targets without recurrent ops); "
                   "small ones stay whole for a CPU target's fused recurrence kernel")
    Config = LowerRNNConfig

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg: LowerRNNConfig = self.config
        lowered, skipped, added, warnings = 0, 0, 0, []
        fused: list[str] = []
        rnns = [n for n in graph.nodes if n.op in ("LSTM", "GRU") and n.domain in ("", "ai.onnx", None)]
        if not rnns:
            return PassResult(False, {"lowered": 0, "skipped": 0, "fused": [], "nodes_added": 0}, [])
        family = getattr(ctx.target, "family", None)
        fuse_max = cfg.fuse_max_macs if cfg.fuse == "auto" and family in FUSE_FAMILIES else None
        taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes if n.name}
        opset = graph.opset or ctx.opset
        for idx, node in enumerate(rnns):
            label = node.name or f"{node.op}#{idx}"
            if opset < 13:
                skipped += 1
                warnings.append(f"{node.op} {label} kept: opset {opset} < 13")
                continue
            b = _Builder(graph, f"{label}/lower_rnn", taken)
            try:
                # all checks run before the first node is added
                how = _lower(node, graph, b, cfg.max_steps, fuse_max, getattr(ctx.target, "tvm_target", None))
            except _Skip as exc:
                skipped += 1
                warnings.append(f"{node.op} {label} kept: {exc}")
                continue
            if how == "fused":
                fused.append(label)
                continue
            lowered += 1
            added += b.nodes_added
        if lowered:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(lowered > 0, {"lowered": lowered, "skipped": skipped, "fused": fused,
                                        "nodes_added": added}, warnings)
