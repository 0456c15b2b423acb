"""Channel-dependency graph on an ONNX (onnx-graphsurgeon) graph.

Nodes of the networkx graph are *channel spaces* ``(tensor name, axis)``. An
edge couples two spaces and carries an index map: pairs ``(i, j)`` saying that
index ``i`` of the first space and index ``j`` of the second must be removed
together (identity for elementwise ops and BN, offsets for Concat/Split,
blocks ``c -> c*S .. c*S+S-1`` for a Flatten into a Gemm, ``d -> d // Dh`` for
a Reshape into attention heads, all channels of one group for grouped convs).

The graph is built by breadth-first search from *seeds*: every output-channel
space of an op with a constant weight (Conv, Gemm, MatMul with a constant
right operand, ...). For each space the producer node and every reader node
are visited; the op's handler (``passes.channel_deps.handlers``) returns the
couplings to other spaces and the constant parameters that hold slices of the
space. An op without a handler, or a handler that declines the axis, is a
*barrier*: the space's group is not pruned. Connected components of the space
graph are *pruning groups*. Inside a group, the union of all index pairs
(union-find over ``(space, index)``) gives the *units*: the smallest sets of
indices that can be removed together (one conv channel with its S Gemm
columns, one attention head with its Dh columns of Q, K, V and rows of the
output projection, one group of a grouped conv).

Grouped convs have two exact treatments. By default (*whole groups*) the Cin/g inputs and Cout/g outputs of
one group are one unit, and removing it lowers ``group``. When that collapses a group's units (the blocks of
a grouped conv merged by other couplings: a ShuffleNet channel shuffle ties index j of every block together,
so whole-group removal would take everything), ``build`` revisits such a conv in *balanced* mode
(``GraphView.balanced``): input and output channels are independent, ``group`` stays, and the node declares
a balance constraint ``(space, g)``: the removed indices of the space must fall equally into its g blocks
(else the weight is no longer [Cout, Cin/g, ...] with equal blocks). The selection
(``prune.channels``) honours these constraints; a constraint it cannot meet leaves the group unpruned.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from compressor import ir

log = logging.getLogger(__name__)

Space = tuple[str, int]  # (tensor name, axis)


class Barrier(Exception):
    """A handler cannot propagate channels through this node on this axis."""


@dataclass(frozen=True)
class Coupling:
    """Index ``ia[k]`` of ``a`` is removed together with index ``ib[k]`` of ``b``."""

    a: Space
    b: Space
    ia: np.ndarray
    ib: np.ndarray


@dataclass(frozen=True)
class Param:
    """A constant input of a node holding a slice per channel of ``space``.

    ``index_fn`` maps the removed indices of the space to indices along
    ``axis`` of the constant (identity by default); ``role`` is ``producer``
    (the weight that creates the channels: it is scored), ``consumer`` (the
    weight that reads them) or ``aux`` (bias, BN/affine terms, broadcast
    constants). ``fill`` is what zero-mode writes (1 for denominators, BN var).
    """

    node: str
    input_index: int
    axis: int
    space: Space
    role: str = "aux"
    fill: float = 0.0
    index_fn: Callable[[np.ndarray], np.ndarray] | None = None
    blocks: int = 0  # grouped consumer: index c of the space is column c % (n/blocks) of the rows of block c // (n/blocks)

    def indices(self, removed: np.ndarray) -> np.ndarray:
        idx = removed if self.index_fn is None else self.index_fn(removed)
        return np.unique(np.asarray(idx, dtype=np.int64))


@dataclass
class Visit:
    couplings: list[Coupling] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    inexact: str | None = None  # the op changes numerics when channels are removed (e.g. LayerNorm over them)
    balance: list[tuple[Space, int]] = field(default_factory=list)  # (space, g): remove equally from its g blocks


def identity(a: Space, b: Space, n: int) -> Coupling:
    r = np.arange(n, dtype=np.int64)
    return Coupling(a, b, r, r)


class GraphView:
    """Read-only facts about the graph the handlers need: shapes, constants, readers."""

    def __init__(self, graph: gs.Graph, model: onnx.ModelProto, opset: int, balanced: frozenset[str] = frozenset()):
        self.graph = graph
        self.opset = opset
        self.balanced = balanced  # grouped Conv nodes visited in balanced mode (see the module docstring)
        inferred = ir.inferred_structure(model)
        self.shapes: dict[str, tuple[int, ...]] = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                self.shapes[vi.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
        self.tensors = graph.tensors()
        missing = [n for n, t in self.tensors.items() if isinstance(t, gs.Variable) and n and n not in self.shapes]
        if missing:
            self.shapes.update(_shapes_by_running(model, missing))
        for name, t in self.tensors.items():
            if isinstance(t, gs.Constant):
                self.shapes[name] = tuple(np.asarray(t.values).shape)
        self.nodes = {n.name: n for n in graph.nodes}
        self.graph_inputs = {t.name for t in graph.inputs}
        self.graph_outputs = {t.name for t in graph.outputs}

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise Barrier(f"unknown static shape of {name!r}")
        return self.shapes[name]

    def const(self, t: gs.Tensor) -> np.ndarray | None:
        return np.asarray(t.values) if isinstance(t, gs.Constant) else None

    def readers(self, name: str) -> list[gs.Node]:
        t = self.tensors.get(name)
        return list(t.outputs) if t is not None else []

    def producer(self, name: str) -> gs.Node | None:
        t = self.tensors.get(name)
        return t.inputs[0] if t is not None and t.inputs else None


def _shapes_by_running(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Static shapes ONNX shape inference could not give (e.g. function ops): one onnxruntime run on zeros."""
    from compressor import runtime

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    outs = {o.name for o in m.graph.output}
    for n in names:
        if n not in outs:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    feeds = {}
    inits = {i.name for i in m.graph.initializer}
    for i in m.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        if not all(d.HasField("dim_value") for d in tt.shape.dim):
            return {}
        feeds[i.name] = np.zeros([d.dim_value for d in tt.shape.dim], onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    try:
        vals = runtime.session(m).run(names, feeds)
    except Exception as exc:  # the shapes stay unknown: the spaces become barriers
        log.warning("shape probe failed: %s", exc)
        return {}
    return {n: tuple(int(d) for d in v.shape) for n, v in zip(names, vals)}


@dataclass
class Group:
    gid: int
    spaces: list[Space]
    sizes: dict[Space, int]
    nodes: list[str]
    params: list[Param]
    barriers: list[str]  # "OpType node: reason"
    inexact: list[str]
    io_spaces: list[Space]
    balance: list[tuple[Space, int]] = field(default_factory=list)
    # units: list of dict space -> indices
    units: list[dict[Space, np.ndarray]] = field(default_factory=list)
    locked: np.ndarray | None = None  # bool per unit: cannot be removed

    @property
    def producers(self) -> list[Param]:
        return [p for p in self.params if p.role == "producer"]


@dataclass
class DepGraph:
    graph: nx.Graph
    groups: list[Group]
    view: GraphView


Lookup = Callable[[gs.Node, int], object]  # (node, opset) -> handler or None


def build(graph: gs.Graph, model: onnx.ModelProto, opset: int, lookup: Lookup) -> DepGraph:
    """Build the dependency graph and its pruning groups; grouped convs whose whole-group units collapse are
    revisited in balanced mode (one rebuild: removing couplings only splits units further)."""
    dep = _build(GraphView(graph, model, opset), lookup)
    collapsed = collapsed_grouped_convs(dep)
    if collapsed:
        log.info("grouped convs in balanced mode: %s", ", ".join(sorted(collapsed)))
        view = dep.view
        view.balanced = frozenset(collapsed)
        dep = _build(view, lookup)
    return dep


def collapsed_grouped_convs(dep: DepGraph) -> set[str]:
    """Grouped Convs (Cin/g > 1) whose g output blocks do not fall into g distinct units of their group."""
    out = set()
    where = {s: grp for grp in dep.groups for s in grp.spaces}
    for node in dep.view.graph.nodes:
        g = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
        if g <= 1 or node.name in dep.view.balanced or not isinstance(node.inputs[1], gs.Constant):
            continue
        w = np.asarray(node.inputs[1].values)
        y = (node.outputs[0].name, 1)
        grp = where.get(y)
        if w.shape[1] <= 1 or grp is None:
            continue
        unit_of = np.full(grp.sizes[y], -1)
        for k, u in enumerate(grp.units):
            if y in u:
                unit_of[u[y]] = k
        firsts = unit_of[np.arange(g) * (w.shape[0] // g)]
        if len(set(firsts.tolist())) < g:
            out.add(node.name)
    return out


def _build(view: GraphView, lookup: Lookup) -> DepGraph:
    graph, opset = view.graph, view.opset
    g = nx.Graph()
    params: dict[Space, list[Param]] = {}
    node_of: dict[Space, set[str]] = {}
    barrier_at: dict[Space, list[str]] = {}
    inexact_at: dict[Space, list[str]] = {}
    balance_at: dict[Space, set[int]] = {}
    visited: set[tuple[str, Space]] = set()

    seeds: list[Space] = []
    for node in graph.nodes:
        h = lookup(node, opset)
        if h is None or not hasattr(h, "seeds"):
            continue
        try:
            seeds += list(h.seeds(node, view))
        except Barrier:
            continue

    queue: list[Space] = []

    def add_space(s: Space) -> None:
        if s not in g:
            g.add_node(s, size=view.shape(s[0])[s[1]])
            queue.append(s)

    for s in seeds:
        try:
            add_space(s)
        except Barrier:
            continue
    while queue:
        s = queue.pop()
        name = s[0]
        nodes = [view.producer(name)] + view.readers(name)
        for node in nodes:
            if node is None or (node.name, s) in visited:
                continue
            visited.add((node.name, s))
            node_of.setdefault(s, set()).add(node.name)
            h = lookup(node, opset)
            if h is None:
                barrier_at.setdefault(s, []).append(f"{node.op} {node.name}: no handler")
                continue
            try:
                v: Visit = h.visit(node, s, view)
            except Barrier as exc:
                barrier_at.setdefault(s, []).append(f"{node.op} {node.name}: {exc}")
                continue
            for bs, bg in v.balance:
                balance_at.setdefault(bs, set()).add(bg)
            if v.inexact:
                inexact_at.setdefault(s, []).append(f"{node.op} {node.name}: {v.inexact}")
            for p in v.params:
                lst = params.setdefault(p.space, [])
                if p not in lst:
                    lst.append(p)
            for c in v.couplings:
                try:
                    add_space(c.a)
                    add_space(c.b)
                except Barrier as exc:
                    barrier_at.setdefault(s, []).append(f"{node.op} {node.name}: {exc}")
                    continue
                if g.has_edge(c.a, c.b):
                    g.edges[c.a, c.b]["maps"].append(c)
                else:
                    g.add_edge(c.a, c.b, maps=[c])
                node_of.setdefault(c.a, set()).add(node.name)
                node_of.setdefault(c.b, set()).add(node.name)

    groups = []
    for gid, comp in enumerate(sorted(nx.connected_components(g), key=lambda c: sorted(c)[0])):
        spaces = sorted(comp)
        grp = Group(
            gid=gid, spaces=spaces, sizes={s: g.nodes[s]["size"] for s in spaces},
            nodes=sorted({n for s in spaces for n in node_of.get(s, ())}),
            params=[p for s in spaces for p in params.get(s, [])],
            barriers=sorted({b for s in spaces for b in barrier_at.get(s, [])}),
            inexact=sorted({b for s in spaces for b in inexact_at.get(s, [])}),
            io_spaces=[s for s in spaces if s[0] in view.graph_inputs or s[0] in view.graph_outputs],
            balance=sorted((s, bg) for s in spaces for bg in balance_at.get(s, ())),
        )
        _units(grp, g)
        groups.append(grp)
    return DepGraph(g, groups, view)


def _units(grp: Group, g: nx.Graph) -> None:
    """Union-find over (space, index) inside one group."""
    offset, total = {}, 0
    for s in grp.spaces:
        offset[s] = total
        total += grp.sizes[s]
    parent = np.arange(total, dtype=np.int64)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b, data in g.subgraph(grp.spaces).edges(data=True):
        for c in data["maps"]:
            for i, j in zip((c.ia + offset[c.a]).tolist(), (c.ib + offset[c.b]).tolist()):
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(total)], dtype=np.int64)
    uniq = np.unique(roots)
    units = []
    for r in uniq:
        members = {}
        for s in grp.spaces:
            idx = np.nonzero(roots[offset[s]:offset[s] + grp.sizes[s]] == r)[0]
            if idx.size:
                members[s] = idx
        units.append(members)
    grp.units = units
    io = set(grp.io_spaces)
    producer_spaces = {p.space for p in grp.producers}
    grp.locked = np.array([bool(io & set(u)) or not (producer_spaces & set(u)) for u in units], dtype=bool)
