"""Built-in channel op-handlers (see ``registry`` for the contract).

Index maps used below, for a removed index set R of a space:
  * identity: the same indices on the coupled space (elementwise ops, BN, activations, pooling),
  * Concat/Split along the axis: input i's index c <-> output index offset_i + c,
  * Slice (step 1) along the axis: output j <-> input start + j; the new start is start - |R ∩ [0, start)|,
  * Reshape/Flatten merging axes (a_major, ..., a_minor) -> o: input digit c of axis a <-> every flat
    index f of o whose digit on a is c (channel c of a Conv <-> columns c*S .. c*S+S-1 of a Gemm),
  * Reshape splitting D -> (H, Dh): d <-> head d // Dh (whole heads; Dh is never cut),
  * grouped Conv (group g): all Cin/g inputs and Cout/g outputs of one group form one unit; group -= removed;
    in balanced mode (``GraphView.balanced``) inputs and outputs are independent, each removed equally from
    the g blocks (a balance constraint), and group stays,
  * channel shuffle (Reshape C -> (g, C/g), Transpose swapping the two, Reshape back): channel c = i*C/g + j
    goes to p(c) = j*g + i. Only index j of the middle (C/g) axis can go, the same j from every one of the g
    blocks: c <-> j and j <-> the g outputs j*g .. j*g+g-1. Removing the same set from each block keeps
    the shuffle a deletion (the kept channels stay in order on both sides; equal counts with different
    indices would make it a new permutation); the Reshape shapes are rewritten, g stays,
  * GroupNormalization: the C/G channels of one group form one unit; num_groups -= removed.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from passes.channel_deps.graph import Barrier, Coupling, GraphView, Param, Space, Visit, identity
from compressor.registry import builtin
from passes.channel_deps.registry import HANDLERS

NewShape = Callable[[str], tuple[int, ...]]


def _name(t: gs.Tensor | None) -> str:
    return t.name if t is not None else ""


def _in_names(node: gs.Node) -> list[str]:
    return [t.name for t in node.inputs]


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _const_input(node: gs.Node, i: int, view: GraphView) -> np.ndarray | None:
    if len(node.inputs) <= i or not node.inputs[i].name:
        return None
    return view.const(node.inputs[i])


def _replace_const(node: gs.Node, i: int, values: np.ndarray) -> None:
    old = node.inputs[i]
    node.inputs[i] = gs.Constant(f"{old.name}__{node.name}_pruned", np.ascontiguousarray(values))


class Handler:
    name = ""
    ops: tuple[str, ...] = ()
    opsets = (1, 10**6)
    domain = ""

    def visit(self, node: gs.Node, space: Space, view: GraphView) -> Visit:  # pragma: no cover - abstract
        raise NotImplementedError


# ---------------------------------------------------------------- weighted ops (producers / consumers)

class ConvHandler(Handler):
    name, ops = "Conv", ("Conv",)

    def _w(self, node: gs.Node, view: GraphView) -> np.ndarray:
        w = _const_input(node, 1, view)
        if w is None:
            raise Barrier("weight is not constant")
        return w

    def seeds(self, node, view):
        self._w(node, view)
        return [(node.outputs[0].name, 1)]

    def visit(self, node, space, view):
        w = self._w(node, view)
        x, y = node.inputs[0].name, node.outputs[0].name
        g = int(node.attrs.get("group", 1))
        if space[1] != 1 or space[0] not in (x, y):
            raise Barrier(f"axis {space[1]} of {space[0]} is not a channel axis of Conv")
        cout, cin_g = w.shape[0], w.shape[1]
        cin = cin_g * g
        v = Visit()
        if g > 1 and cin_g > 1 and node.name in view.balanced:
            v.balance.append((space, g))
            if space == (y, 1):
                self._producer(node, space, view, v)
            else:
                v.params.append(Param(node.name, 1, 1, space, "consumer", blocks=g))
            return v
        if g > 1:
            cout_g = cout // g
            v.couplings.append(Coupling((x, 1), (y, 1), np.arange(cin), (np.arange(cin) // cin_g) * cout_g))
            v.couplings.append(Coupling((y, 1), (y, 1), np.arange(cout), (np.arange(cout) // cout_g) * cout_g))
        if space == (y, 1):
            self._producer(node, space, view, v)
        elif g == 1:
            v.params.append(Param(node.name, 1, 1, space, "consumer"))
        return v

    @staticmethod
    def _producer(node, space, view, v) -> None:
        """The conv's output channels: weight axis 0 is scored and removed, the bias follows."""
        v.params.append(Param(node.name, 1, 0, space, "producer"))
        if len(node.inputs) > 2 and node.inputs[2].name:
            if _const_input(node, 2, view) is None:
                raise Barrier("bias is not constant")
            v.params.append(Param(node.name, 2, 0, space, "aux"))

    def fix(self, node, removed, new_shape, view):
        g = int(node.attrs.get("group", 1))
        if g > 1 and node.name not in view.balanced:
            cout = view.shape(node.outputs[0].name)[1]
            node.attrs["group"] = new_shape(node.outputs[0].name)[1] // (cout // g)


class ConvTransposeHandler(Handler):
    name, ops = "ConvTranspose", ("ConvTranspose",)

    def seeds(self, node, view):
        if _const_input(node, 1, view) is None or int(node.attrs.get("group", 1)) != 1:
            raise Barrier("weight not constant or grouped")
        return [(node.outputs[0].name, 1)]

    def visit(self, node, space, view):
        if _const_input(node, 1, view) is None:
            raise Barrier("weight is not constant")
        if int(node.attrs.get("group", 1)) != 1:
            raise Barrier("grouped ConvTranspose")
        x, y = node.inputs[0].name, node.outputs[0].name
        if space == (y, 1):
            v = Visit(params=[Param(node.name, 1, 1, space, "producer")])
            if len(node.inputs) > 2 and node.inputs[2].name:
                v.params.append(Param(node.name, 2, 0, space, "aux"))
            return v
        if space == (x, 1):
            return Visit(params=[Param(node.name, 1, 0, space, "consumer")])
        raise Barrier(f"axis {space[1]} is not a channel axis of ConvTranspose")


class GemmHandler(Handler):
    name, ops = "Gemm", ("Gemm",)

    def seeds(self, node, view):
        if _const_input(node, 1, view) is None:
            raise Barrier("B not constant")
        return [(node.outputs[0].name, 1)]

    def visit(self, node, space, view):
        b = _const_input(node, 1, view)
        if b is None:
            raise Barrier("B is not constant")
        ta, tb = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
        a, y = node.inputs[0].name, node.outputs[0].name
        if space == (y, 1):
            v = Visit(params=[Param(node.name, 1, 0 if tb else 1, space, "producer")])
            c = _const_input(node, 2, view)
            if len(node.inputs) > 2 and node.inputs[2].name:
                if c is None:
                    raise Barrier("C is not constant")
                if c.ndim >= 1 and c.shape[-1] > 1:
                    v.params.append(Param(node.name, 2, c.ndim - 1, space, "aux"))
            return v
        if space == (a, 0 if ta else 1):
            return Visit(params=[Param(node.name, 1, 1 if tb else 0, space, "consumer")])
        raise Barrier("Gemm row (batch) axis")


class MatMulHandler(Handler):
    name, ops = "MatMul", ("MatMul",)

    def seeds(self, node, view):
        b = _const_input(node, 1, view)
        if b is None or b.ndim != 2 or view.const(node.inputs[0]) is not None:
            raise Barrier("not a constant-weight MatMul")
        return [(node.outputs[0].name, len(view.shape(node.outputs[0].name)) - 1)]

    def visit(self, node, space, view):
        an, bn, yn = node.inputs[0].name, node.inputs[1].name, node.outputs[0].name
        ra, rb, ry = len(view.shape(an)), len(view.shape(bn)), len(view.shape(yn))
        if ra < 2 or rb < 2:
            raise Barrier("1-D MatMul operand")
        t, ax = space
        if view.const(node.inputs[0]) is not None:
            raise Barrier("constant left operand")
        bconst = view.const(node.inputs[1])
        if bconst is not None:
            if rb != 2:
                raise Barrier("batched constant weight")
            if t == yn and ax == ry - 1:
                return Visit(params=[Param(node.name, 1, 1, space, "producer")])
            if t == an and ax == ra - 1:
                return Visit(params=[Param(node.name, 1, 0, space, "consumer")])
            if t == an:
                return Visit([identity(space, (yn, ax + ry - ra), view.shape(an)[ax])])
            if t == yn and ax - (ry - ra) >= 0:
                return Visit([identity(space, (an, ax - (ry - ra)), view.shape(yn)[ax])])
            raise Barrier("broadcast batch axis")
        # activation x activation (attention): batch axes, M, N, contraction K
        sa, sb, sy = view.shape(an), view.shape(bn), view.shape(yn)
        if an == bn:
            raise Barrier("x @ x")
        if t == yn:
            o = ax
        elif t == an:
            if ax == ra - 1:
                return Visit([identity(space, (bn, rb - 2), sa[ax])])
            o = ry - 2 if ax == ra - 2 else ax + ry - ra
        else:
            if ax == rb - 2:
                return Visit([identity(space, (an, ra - 1), sb[ax])])
            o = ry - 1 if ax == rb - 1 else ax + ry - rb
        n = sy[o]
        v = Visit()
        if o == ry - 1:
            cands = [(bn, rb - 1, sb)]
        elif o == ry - 2:
            cands = [(an, ra - 2, sa)]
        else:
            cands = [(an, o - (ry - ra), sa), (bn, o - (ry - rb), sb)]
        for name, axis, shp in cands:
            if axis < 0 or shp[axis] == 1 and n > 1:
                continue
            if shp[axis] != n:
                raise Barrier("mismatched MatMul dims")
            if (name, axis) != space:
                v.couplings.append(identity(space, (name, axis), n))
        if t != yn:
            v.couplings.append(identity(space, (yn, o), n))
        return v


class GatherHandler(Handler):
    """Gather along a non-channel axis; a constant 2-D table gathered on axis 0 (embedding) is a producer."""

    name, ops = "Gather", ("Gather",)

    def seeds(self, node, view):
        d = _const_input(node, 0, view)
        if d is None or d.ndim != 2 or int(node.attrs.get("axis", 0)) != 0 or d.dtype.kind != "f":
            raise Barrier("not an embedding")
        return [(node.outputs[0].name, len(view.shape(node.outputs[0].name)) - 1)]

    def visit(self, node, space, view):
        xn, yn = node.inputs[0].name, node.outputs[0].name
        rx = len(view.shape(xn))
        ri = len(view.shape(node.inputs[1].name))
        k = _norm(int(node.attrs.get("axis", 0)), rx)
        t, ax = space
        if t == xn:
            if ax == k:
                raise Barrier("gathers along the channel axis")
            a, o = ax, (ax if ax < k else ax - 1 + ri)
        elif t == yn:
            if k <= ax < k + ri:
                raise Barrier("gathers along the channel axis")
            o, a = ax, (ax if ax < k else ax + 1 - ri)
        else:
            raise Barrier("channel axis in the indices")
        if view.const(node.inputs[0]) is not None:
            return Visit(params=[Param(node.name, 0, a, (yn, o), "producer")])
        n = view.shape(xn)[a]
        return Visit([identity((xn, a), (yn, o), n)])


# ---------------------------------------------------------------- normalisation

class BatchNormHandler(Handler):
    name, ops = "BatchNormalization", ("BatchNormalization",)

    def visit(self, node, space, view):
        x, y = node.inputs[0].name, node.outputs[0].name
        if int(node.attrs.get("training_mode", 0)) or any(_const_input(node, i, view) is None for i in range(1, 5)):
            raise Barrier("training mode or non-constant parameters")
        t, ax = space
        n = view.shape(x)[ax]
        other = (y, ax) if t == x else (x, ax)
        v = Visit([identity(space, other, n)])
        if ax == 1:
            v.params += [Param(node.name, i, 0, (y, 1), "bn", 1.0 if i == 4 else 0.0) for i in range(1, 5)]
        return v


class InstanceNormHandler(Handler):
    name, ops = "InstanceNormalization", ("InstanceNormalization",)

    def visit(self, node, space, view):
        x, y = node.inputs[0].name, node.outputs[0].name
        if space[1] != 1:
            raise Barrier("normalised axis")
        other = (y, 1) if space[0] == x else (x, 1)
        return Visit([identity(space, other, view.shape(x)[1])],
                     [Param(node.name, i, 0, (y, 1), "aux") for i in (1, 2)])


class GroupNormHandler(Handler):
    name, ops, opsets = "GroupNormalization", ("GroupNormalization",), (18, 10**6)

    def visit(self, node, space, view):
        x, y = node.inputs[0].name, node.outputs[0].name
        if space[1] != 1:
            raise Barrier("normalised axis")
        c = view.shape(x)[1]
        g = int(node.attrs["num_groups"])
        cg = c // g
        other = (y, 1) if space[0] == x else (x, 1)
        v = Visit([identity(space, other, c), Coupling((y, 1), (y, 1), np.arange(c), (np.arange(c) // cg) * cg)])
        for i in (1, 2):
            p = _const_input(node, i, view)
            if p is None:
                raise Barrier("non-constant scale/bias")
            fn = None if p.shape[0] == c else (lambda r, cg=cg: np.asarray(r) // cg)
            v.params.append(Param(node.name, i, 0, (y, 1), "aux", 0.0, fn))
        return v

    def fix(self, node, removed, new_shape, view):
        c = view.shape(node.inputs[0].name)[1]
        cg = c // int(node.attrs["num_groups"])
        node.attrs["num_groups"] = new_shape(node.outputs[0].name)[1] // cg


class LayerNormHandler(Handler):
    name, ops = "LayerNormalization", ("LayerNormalization",)

    def visit(self, node, space, view):
        x, y = node.inputs[0].name, node.outputs[0].name
        if space[0] not in (x, y):
            raise Barrier("channel axis in the parameters")
        r = len(view.shape(x))
        k = _norm(int(node.attrs.get("axis", -1)), r)
        ax = space[1]
        other = (y, ax) if space[0] == x else (x, ax)
        v = Visit([identity(space, other, view.shape(x)[ax])])
        if ax >= k:
            v.inexact = "normalises over the pruned axis (mean/variance change)"
            v.params += [Param(node.name, i, ax - k, (y, ax), "aux") for i in (1, 2)
                         if len(node.inputs) > i and node.inputs[i].name]
            if any(_const_input(node, i, view) is None for i in (1, 2) if len(node.inputs) > i and node.inputs[i].name):
                raise Barrier("non-constant scale/bias")
        return v


class SoftmaxHandler(Handler):
    name, ops = "Softmax", ("Softmax", "LogSoftmax", "Hardmax")

    def visit(self, node, space, view):
        x, y = node.inputs[0].name, node.outputs[0].name
        r = len(view.shape(x))
        k = _norm(int(node.attrs.get("axis", -1 if view.opset >= 13 else 1)), r)
        if view.opset < 13 and space[1] >= k:
            raise Barrier("coerced 2-D softmax covers the channel axis")
        if space[1] == k:
            raise Barrier("normalises over the channel axis")
        other = (y, space[1]) if space[0] == x else (x, space[1])
        return Visit([identity(space, other, view.shape(x)[space[1]])])


# ---------------------------------------------------------------- channel-preserving

UNARY = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Softplus",
         "Softsign", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Identity", "Dropout", "Cast",
         "Mish", "Sin", "Cos", "Floor", "Ceil", "Round", "ThresholdedRelu", "Clip", "Sign", "Shrink", "Swish")


class UnaryHandler(Handler):
    name, ops = "unary", UNARY

    def visit(self, node, space, view):
        x, y = node.inputs[0].name, node.outputs[0].name
        if space[0] not in (x, y):
            raise Barrier("channel axis in a scalar input")
        if any(o.outputs for o in node.outputs[1:]):
            raise Barrier("second output used")
        other = (y, space[1]) if space[0] == x else (x, space[1])
        return Visit([identity(space, other, view.shape(x)[space[1]])])


class PoolHandler(Handler):
    name, ops = "pool", ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")

    def visit(self, node, space, view):
        x, y = node.inputs[0].name, node.outputs[0].name
        if space[1] > 1:
            raise Barrier("spatial axis")
        if any(o.outputs for o in node.outputs[1:]):
            raise Barrier("MaxPool indices used")
        other = (y, space[1]) if space[0] == x else (x, space[1])
        return Visit([identity(space, other, view.shape(x)[space[1]])])


class ElementwiseHandler(Handler):
    """Multi-input broadcasting ops; constant inputs with the full channel dim are sliced."""

    name, ops = "elementwise", ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "PRelu")

    def visit(self, node, space, view):
        yn = node.outputs[0].name
        sy = view.shape(yn)
        ry = len(sy)
        t, ax = space
        if t == yn:
            o = ax
        else:
            i = _in_names(node).index(t)
            o = ax + ry - len(view.shape(t))
            if view.shape(t)[ax] != sy[o]:
                raise Barrier("input broadcast along the channel axis")
        n = sy[o]
        v = Visit()
        for i, inp in enumerate(node.inputs):
            shp = view.shape(inp.name)
            a = o - (ry - len(shp))
            if a < 0 or (shp[a] == 1 and n > 1):
                continue
            if view.const(inp) is not None:
                fill = 1.0 if (node.op in ("Div", "Pow") and i == 1) else 0.0
                v.params.append(Param(node.name, i, a, (yn, o), "aux", fill))
            elif (inp.name, a) != space:
                v.couplings.append(identity(space, (inp.name, a), n))
        if t != yn:
            v.couplings.append(identity(space, (yn, o), n))
        return v


class TransposeHandler(Handler):
    name, ops = "Transpose", ("Transpose",)

    def visit(self, node, space, view):
        x, y = node.inputs[0].name, node.outputs[0].name
        r = len(view.shape(x))
        perm = list(node.attrs.get("perm", list(range(r))[::-1]))
        if space[0] == x:
            return Visit([identity(space, (y, perm.index(space[1])), view.shape(x)[space[1]])])
        return Visit([identity(space, (x, perm[space[1]]), view.shape(y)[space[1]])])


def _segments(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    segs, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        si, sj, pa, pb = i, j, 1, 1
        if i < len(a):
            pa *= a[i]
            i += 1
        if j < len(b):
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]
                i += 1
            elif j < len(b):
                pb *= b[j]
                j += 1
            else:
                raise Barrier("reshape sizes do not match")
        segs.append((list(range(si, i)), list(range(sj, j))))
    return segs


def reshape_coupling(space: Space, x: str, y: str, sx: tuple[int, ...], sy: tuple[int, ...]) -> Coupling:
    """Index map of one channel axis through a Reshape-like op (Reshape, Flatten, Squeeze, Unsqueeze)."""
    t, ax = space
    for ins, outs in _segments(sx, sy):
        if (t == x and ax in ins) or (t == y and ax in outs):
            break
    else:
        raise Barrier("axis not found in reshape")
    ins_nz = [d for d in ins if sx[d] != 1]
    outs_nz = [d for d in outs if sy[d] != 1]
    if len(ins_nz) == 1 and len(outs_nz) == 1:
        return identity((x, ins_nz[0]), (y, outs_nz[0]), sx[ins_nz[0]])
    if len(outs_nz) == 1:  # merge: input digits -> flat output index
        o = outs_nz[0]
        dims = [sx[d] for d in ins_nz]
        flat = np.arange(int(np.prod(dims)))
        digits = np.unravel_index(flat, dims)
        if t == x:
            return Coupling((x, ax), (y, o), digits[ins_nz.index(ax)], flat)
        return Coupling((x, ins_nz[0]), (y, o), digits[0], flat)
    if len(ins_nz) == 1:  # split: input index -> major output axis (whole heads)
        a = ins_nz[0]
        if t == y and ax != outs_nz[0]:
            raise Barrier("minor axis of a split reshape (e.g. head dim)")
        block = int(np.prod([sy[d] for d in outs_nz[1:]]))
        r = np.arange(sx[a])
        return Coupling((x, a), (y, outs_nz[0]), r, r // block)
    raise Barrier("reshape mixes the channel axis with others")


def shuffle_split(node: gs.Node, view: GraphView) -> tuple[int, int, int] | None:
    """(axis a, g, C/g) when ``node`` is the first Reshape of a channel shuffle: x [.., C, ..] -> y [.., g, C/g, ..]
    (axis a split in place), read only by a Transpose swapping axes a and a+1, read only by a Reshape back to
    x's shape."""
    if node.op != "Reshape" or len(node.outputs[0].outputs) != 1:
        return None
    try:
        sx, sy = view.shape(node.inputs[0].name), view.shape(node.outputs[0].name)
    except Barrier:
        return None
    if len(sy) != len(sx) + 1:
        return None
    a = next((i for i in range(len(sx)) if sx[i] != sy[i]), len(sx))
    if a >= len(sx) or sx[:a] != sy[:a] or sx[a + 1:] != sy[a + 2:] or sy[a] * sy[a + 1] != sx[a] or min(sy[a], sy[a + 1]) < 2:
        return None
    t = node.outputs[0].outputs[0]
    perm = list(range(len(sy)))
    perm[a], perm[a + 1] = a + 1, a
    if t.op != "Transpose" or list(t.attrs.get("perm", [])) != perm or len(t.outputs[0].outputs) != 1:
        return None
    back = t.outputs[0].outputs[0]
    if back.op != "Reshape" or view.shapes.get(back.outputs[0].name) != sx:
        return None
    return a, sy[a], sy[a + 1]


class ReshapeHandler(Handler):
    name, ops = "reshape", ("Reshape", "Flatten", "Squeeze", "Unsqueeze")

    def visit(self, node, space, view):
        x, y = node.inputs[0].name, node.outputs[0].name
        if space[0] not in (x, y):
            raise Barrier("channel axis in the shape input")
        if node.op == "Reshape" and _const_input(node, 1, view) is None:
            raise Barrier("shape is not constant")
        if node.op in ("Squeeze", "Unsqueeze") and len(node.inputs) > 1 and _const_input(node, 1, view) is None:
            raise Barrier("axes are not constant")
        sh = shuffle_split(node, view)
        if sh is not None and space in ((x, sh[0]), (y, sh[0]), (y, sh[0] + 1)):
            a, g, m = sh
            if space == (y, a):
                raise Barrier(f"group axis of a channel shuffle (g={g} stays)")
            r = np.arange(g * m)
            return Visit([Coupling((x, a), (y, a + 1), r, r % m)])
        return Visit([reshape_coupling(space, x, y, view.shape(x), view.shape(y))])

    def fix(self, node, removed, new_shape, view):
        if node.op == "Reshape":
            _replace_const(node, 1, np.array(new_shape(node.outputs[0].name), dtype=np.int64))
            node.attrs.pop("allowzero", None)


class ConcatHandler(Handler):
    name, ops = "Concat", ("Concat",)

    def visit(self, node, space, view):
        yn = node.outputs[0].name
        ry = len(view.shape(yn))
        k = _norm(int(node.attrs["axis"]), ry)
        t, ax = space
        v = Visit()
        off = 0
        for i, inp in enumerate(node.inputs):
            n = view.shape(inp.name)[k]
            if ax == k:
                if view.const(inp) is not None:
                    raise Barrier("constant concatenated along the channel axis")
                v.couplings.append(Coupling((yn, k), (inp.name, k), off + np.arange(n), np.arange(n)))
            elif view.const(inp) is not None:
                v.params.append(Param(node.name, i, ax, (yn, ax), "aux"))
            else:
                v.couplings.append(identity((yn, ax), (inp.name, ax), view.shape(yn)[ax]))
            off += n
        return v


class SplitHandler(Handler):
    name, ops, opsets = "Split", ("Split",), (13, 10**6)

    def _sizes(self, node, view) -> list[int]:
        xn = node.inputs[0].name
        r = len(view.shape(xn))
        k = _norm(int(node.attrs.get("axis", 0)), r)
        return [view.shape(o.name)[k] for o in node.outputs]

    def visit(self, node, space, view):
        xn = node.inputs[0].name
        r = len(view.shape(xn))
        k = _norm(int(node.attrs.get("axis", 0)), r)
        if space[0] not in [xn] + [o.name for o in node.outputs]:
            raise Barrier("channel axis in the split input")
        v, off = Visit(), 0
        for o, n in zip(node.outputs, self._sizes(node, view)):
            if space[1] == k:
                v.couplings.append(Coupling((xn, k), (o.name, k), off + np.arange(n), np.arange(n)))
            else:
                v.couplings.append(identity((xn, space[1]), (o.name, space[1]), view.shape(xn)[space[1]]))
            off += n
        return v

    def fix(self, node, removed, new_shape, view):
        r = len(view.shape(node.inputs[0].name))
        k = _norm(int(node.attrs.get("axis", 0)), r)
        sizes = np.array([new_shape(o.name)[k] for o in node.outputs], dtype=np.int64)
        node.attrs.pop("num_outputs", None)
        if len(node.inputs) > 1 and node.inputs[1].name:
            _replace_const(node, 1, sizes)
        else:
            while len(node.inputs) > 1:
                node.inputs.pop()
            node.inputs.append(gs.Constant(f"{node.name}__split_pruned", sizes))
            node.attrs.pop("split", None)


class SliceHandler(Handler):
    name, ops, opsets = "Slice", ("Slice",), (10, 10**6)

    def _params(self, node, view):
        xn = node.inputs[0].name
        sx = view.shape(xn)
        vals = [_const_input(node, i, view) for i in range(1, len(node.inputs))]
        if any(v is None for v in vals[:2]) or any(v is None for i, v in enumerate(vals[2:]) if node.inputs[i + 3].name):
            raise Barrier("non-constant slice bounds")
        starts, ends = vals[0].astype(np.int64), vals[1].astype(np.int64)
        axes = vals[2] if len(vals) > 2 and vals[2] is not None else np.arange(len(starts))
        steps = vals[3] if len(vals) > 3 and vals[3] is not None else np.ones(len(starts), dtype=np.int64)
        axes = np.array([_norm(int(a), len(sx)) for a in axes])
        return sx, starts, ends, axes, steps

    def visit(self, node, space, view):
        xn, yn = node.inputs[0].name, node.outputs[0].name
        if space[0] not in (xn, yn):
            raise Barrier("channel axis in slice bounds")
        sx, starts, ends, axes, steps = self._params(node, view)
        ax = space[1]
        if ax not in axes:
            other = (yn, ax) if space[0] == xn else (xn, ax)
            return Visit([identity(space, other, sx[ax])])
        j = int(np.nonzero(axes == ax)[0][0])
        if int(steps[j]) != 1:
            raise Barrier("strided slice on the channel axis")
        n = sx[ax]
        s = int(starts[j]) + n if int(starts[j]) < 0 else int(starts[j])
        s = min(max(s, 0), n)
        m = view.shape(yn)[ax]
        return Visit([Coupling((xn, ax), (yn, ax), s + np.arange(m), np.arange(m))])

    def fix(self, node, removed, new_shape, view):
        xn, yn = node.inputs[0].name, node.outputs[0].name
        sx, starts, ends, axes, steps = self._params(node, view)
        starts, ends = starts.copy(), ends.copy()
        changed = False
        for j, ax in enumerate(axes):
            r = removed.get((xn, int(ax)))
            if r is None:
                continue
            n = sx[ax]
            s = int(starts[j]) + n if int(starts[j]) < 0 else int(starts[j])
            s = min(max(s, 0), n)
            ns = s - int(np.sum(r < s))
            starts[j], ends[j] = ns, ns + new_shape(yn)[ax]
            changed = True
        if changed:
            _replace_const(node, 1, starts)
            _replace_const(node, 2, ends)


class ReduceHandler(Handler):
    name, ops = "reduce", ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                           "ReduceLogSumExp", "ReduceSumSquare")

    def _axes(self, node, view, r):
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
            c = _const_input(node, 1, view)
            if c is None:
                raise Barrier("non-constant axes")
            axes = c.tolist()
        if not axes:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                return []
            return list(range(r))
        return sorted(_norm(int(a), r) for a in axes)

    def visit(self, node, space, view):
        xn, yn = node.inputs[0].name, node.outputs[0].name
        r = len(view.shape(xn))
        axes = self._axes(node, view, r)
        keep = int(node.attrs.get("keepdims", 1))
        if space[0] == xn:
            a = space[1]
            if a in axes:
                raise Barrier("reduces over the channel axis")
            o = a if keep else a - sum(1 for q in axes if q < a)
        elif space[0] == yn:
            o = space[1]
            rest = [q for q in range(r) if q not in axes]
            a = o if keep else rest[o]
            if a in axes:
                raise Barrier("reduced axis")
        else:
            raise Barrier("channel axis in the axes input")
        return Visit([identity((xn, a), (yn, o), view.shape(xn)[a])])


class ResizeHandler(Handler):
    name, ops = "Resize", ("Resize", "Upsample")

    def visit(self, node, space, view):
        xn, yn = node.inputs[0].name, node.outputs[0].name
        if space[0] not in (xn, yn):
            raise Barrier("channel axis in resize parameters")
        ax = space[1]
        if view.shape(xn)[ax] != view.shape(yn)[ax]:
            raise Barrier("resized along the channel axis")
        if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name and _const_input(node, 3, view) is None:
            raise Barrier("non-constant sizes")
        other = (yn, ax) if space[0] == xn else (xn, ax)
        return Visit([identity(space, other, view.shape(xn)[ax])])

    def fix(self, node, removed, new_shape, view):
        if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:
            _replace_const(node, 3, np.array(new_shape(node.outputs[0].name), dtype=np.int64))


class PadHandler(Handler):
    name, ops, opsets = "Pad", ("Pad",), (11, 10**6)

    def visit(self, node, space, view):
        xn, yn = node.inputs[0].name, node.outputs[0].name
        if space[0] not in (xn, yn):
            raise Barrier("channel axis in pad parameters")
        pads = _const_input(node, 1, view)
        if pads is None or (len(node.inputs) > 3 and node.inputs[3].name):
            raise Barrier("non-constant pads or explicit axes")
        r = len(view.shape(xn))
        ax = space[1]
        if pads[ax] != 0 or pads[ax + r] != 0:
            raise Barrier("padded along the channel axis")
        other = (yn, ax) if space[0] == xn else (xn, ax)
        return Visit([identity(space, other, view.shape(xn)[ax])])


BUILTINS = (ConvHandler, ConvTransposeHandler, GemmHandler, MatMulHandler, GatherHandler, BatchNormHandler,
            InstanceNormHandler, GroupNormHandler, LayerNormHandler, SoftmaxHandler, UnaryHandler, PoolHandler,
            ElementwiseHandler, TransposeHandler, ReshapeHandler, ConcatHandler, SplitHandler, SliceHandler,
            ReduceHandler, ResizeHandler, PadHandler)


def _register_builtins() -> None:
    for cls in BUILTINS:
        HANDLERS.register(cls.name, cls(), builtin(cls.__module__))


_register_builtins()
