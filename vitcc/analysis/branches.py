"""Residual branches: the units depth pruning removes whole (a block's attention, a block's MLP).

A branch is what an add on the residual stream puts onto it: `stream = skip + out`, where `out` is
computed from the stream (its ancestors that are not the skip's). Removing the branch makes the add the
identity on the stream (the compact graph uses `skip` where it used the add) and deletes every op and
parameter only the branch needs; the masked reference zeroes `out`, so the add contributes nothing.
Removing both branches of a block removes the block.

Found from the graph, never from module names: the stream adds are verify's (`verification.stream_adds`:
the adds onto the residual group, or skip connections of one shape), and the branch is the set of nodes
that only that add needs. Names come from the parameters the branch reads (the module under the block
that holds two thirds of them, `blocks.3.attn`), or the block plus the branch's role (`attn`: it has a
heads group, `mlp`: a hidden group) where no module does (HF's MLP lives in `intermediate` and `output`).

A stream add whose branch value is also used outside the branch (an attention map returned as an output,
a value mutated in place outside it) is listed with `frozen`, the reason, and cannot be removed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx

from vitcc.analysis.groups import common_prefix
from vitcc.ir.groups import Group
from vitcc.ir.spaces import axis_size, find, spaces_of
from vitcc.ir.types import is_ttype, shape_of

BRANCH = "branch"  # the --prune kind


_COMPUTED = ("call_function", "call_method", "call_module")


def is_add(node: fx.Node) -> bool:
    """An addition of the captured aten graph (aten.add.Tensor, or its in-place form)."""
    t = node.target
    return node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and \
        t.overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_)


def stream_adds(graph: fx.Graph, types: dict, groups) -> list[fx.Node]:
    """The adds that put something onto a residual stream (see `compared_nodes`), in graph order."""
    roots = {find(g.space).id for g in groups if g.kind == "residual"}
    live = _input_dependent(graph)
    return [n for n in graph.nodes
            if is_add(n) and (_on_residual(types.get(n.name), roots) or _is_skip(n, types, live))]


def _on_residual(t: Any, roots: set[int]) -> bool:
    return is_ttype(t) and bool(t) and any(find(s).id in roots for s in spaces_of([t[-1]]))


def _input_dependent(graph: fx.Graph) -> set[str]:
    """Nodes computed from a graph input (not only from parameters, buffers and constants)."""
    live: set[str] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a.name in live for a in n.all_input_nodes):
            live.add(n.name)
    return live


def _is_skip(add: fx.Node, types: dict, live: set[str]) -> bool:
    """Two operands computed from the input, and the result, all of one shape: a skip connection's merge
    (a bias table added to attention logits has that shape at batch 1, but not the input dependence)."""
    args = [a for a in add.args if isinstance(a, fx.Node)]
    if len(args) != 2 or any(a.op not in _COMPUTED or a.name not in live for a in args):
        return False
    shapes = [_sizes(types.get(n.name)) for n in (*args, add)]
    return shapes[0] is not None and shapes[0] == shapes[1] == shapes[2]


def _sizes(t: Any) -> tuple[int, ...] | None:
    return tuple(axis_size(a) for a in t) if is_ttype(t) else None


@dataclass
class Branch:
    name: str
    role: str  # "attn", "mlp" or "branch": what its groups say it is
    add: str  # the add that puts the branch onto the stream
    output: str  # the add's operand the branch computes: zero in the masked reference when removed
    skip: str  # the add's stream operand: what the add becomes when the branch is removed
    nodes: tuple[str, ...] = ()  # every node only this branch needs (ops and parameter reads): what removal deletes
    params: tuple[str, ...] = ()  # parameters and buffers only it reads
    groups: tuple[str, ...] = ()  # channel groups that lie on its parameters only
    ops: int = 0  # of `nodes`, the ones that compute (not parameter reads)
    frozen: str | None = None
    size: int = field(default=1, repr=False)  # one unit: kept [0], or removed []

    @property
    def prunable(self) -> bool:
        return self.frozen is None

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("size")
        d.pop("nodes")
        return d


def find_branches(gm: fx.GraphModule, types: dict, groups: list[Group]) -> list[Branch]:
    """The residual branches of a captured graph, in graph order, named by the parameters they read."""
    graph = _Ancestry(gm.graph)
    adds = stream_adds(gm.graph, types, groups)
    add_names = {a.name for a in adds}
    found = []
    for add in adds:
        b = _branch_of(add, graph)
        if b is None:
            continue
        if b.prunable and add_names & (set(b.nodes) - {add.name}):
            continue  # a branch holding other branches (a skip over whole blocks): its inner ones are the units
        found.append(b)
    _name_branches(gm, found, groups)
    return found


class _Ancestry:
    """Every node's ancestors (itself included) as a bit set over graph positions, from one pass in graph
    order: a branch is the ancestors of its output less those of its skip, and walking them per add
    made finding branches quadratic in depth."""

    def __init__(self, graph: fx.Graph):
        self.nodes = list(graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.bits: dict[fx.Node, int] = {}
        self.params = self.inputs = 0
        for i, n in enumerate(self.nodes):
            bits = 1 << i
            for a in n.all_input_nodes:
                bits |= self.bits[a]
            self.bits[n] = bits
            self.params |= (n.op == "get_attr") << i
            self.inputs |= (n.op == "placeholder") << i

    def has(self, node: fx.Node, ancestor: fx.Node) -> bool:
        return bool(self.bits[node] >> self.order[ancestor] & 1)

    def members(self, bits: int) -> list[fx.Node]:
        """The nodes of a bit set, in graph order."""
        out = []
        while bits:
            low = bits & -bits
            out.append(self.nodes[low.bit_length() - 1])
            bits ^= low
        return out


def _branch_of(add: fx.Node, graph: _Ancestry) -> Branch | None:
    operands = [a for a in add.args if isinstance(a, fx.Node)]
    if len(operands) != 2 or operands[0] is operands[1] or len(add.args) != 2:
        return None
    u, v = operands
    up, vp = graph.bits[u], graph.bits[v]
    if graph.has(v, u):
        skip, out = u, v
    elif graph.has(u, v):
        skip, out = v, u
    else:  # both read the stream (the skip through a view): the branch is the side that owns parameters
        only_u, only_v = bool(up & ~vp & graph.params), bool(vp & ~up & graph.params)
        if only_u == only_v:
            return None
        skip, out = (v, u) if only_u else (u, v)
    if shape_of(skip) is None or shape_of(skip) != shape_of(add):
        return None  # the add broadcasts the skip: it cannot become the skip
    if out.op != "call_function" or not graph.bits[out] & graph.inputs:
        return None  # a table added to the stream (a position embedding), not something computed from it
    candidate = graph.members(graph.bits[out] & ~graph.bits[skip])[::-1]
    removable: set[fx.Node] = {add}
    outside = None
    for n in candidate:  # users first: a node goes with the branch when everything that reads it does
        if n.op == "placeholder":
            continue
        users = [w for w in n.users if w not in removable]
        if users:
            if n is out or outside is None:
                outside = (n, users[0])
            continue
        removable.add(n)
    removable.discard(add)
    nodes = sorted(removable, key=graph.order.__getitem__)
    b = Branch(name="", role=BRANCH, add=add.name, output=out.name, skip=skip.name,
               nodes=tuple(n.name for n in nodes), params=tuple(n.target for n in nodes if n.op == "get_attr"),
               ops=sum(n.op != "get_attr" for n in nodes))
    if out not in removable:
        n, user = outside
        b.frozen = f"{n.name} is also used by {user.name}, outside the branch"
        return b
    for n in removable:
        written = _written_args(n)
        bad = [a for a in written if a not in removable]
        if bad:
            b.frozen = f"{n.name} ({n.target}) writes {bad[0].name}, outside the branch"
            return b
    return b


def _written_args(n: fx.Node) -> list[fx.Node]:
    """The inputs an in-place op writes (its schema's mutated arguments)."""
    schema = getattr(n.target, "_schema", None)
    if n.op != "call_function" or schema is None or not schema.is_mutable:
        return []
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
            out += [x for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, fx.Node)]
    return out


def _name_branches(gm: fx.GraphModule, branches: list[Branch], groups: list[Group]) -> None:
    used = {g.name for g in groups}
    for i, b in enumerate(branches):
        params = set(b.params)
        inside = [g for g in groups if g.members and all(m.param in params for m in g.members)]
        b.groups = tuple(g.name for g in inside)
        kinds = {g.kind for g in inside}
        b.role = "attn" if "heads" in kinds or "head_dim" in kinds else "mlp" if "mlp" in kinds else BRANCH
        name = _module_name(gm, b) or f"{b.role}.{i}"
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}#{k}"
        used.add(name)
        b.name = name


def _module_name(gm: fx.GraphModule, b: Branch) -> str | None:
    """The module below the block that holds two thirds of the branch's parameters, else the block plus its role."""
    sizes = {p: numel(gm, p) for p in b.params}
    paths = [p.split(".")[:-1] for p in sizes]
    if not paths:
        return _stack_name(gm, b)
    prefix = common_prefix(paths)
    total = sum(sizes.values()) or 1
    below: dict[str, int] = {}
    for p, n in sizes.items():
        parts = p.split(".")
        if len(parts) > len(prefix) + 1:
            below[parts[len(prefix)]] = below.get(parts[len(prefix)], 0) + n
    child = max(below, key=below.get, default=None)
    if child is not None and below[child] * 3 >= total * 2:
        return ".".join(prefix + [child])
    if child is None or not prefix:  # one module holds all of it (or nothing is shared)
        return ".".join(prefix) or None
    return ".".join(prefix + [b.role])


def _stack_name(gm: fx.GraphModule, b: Branch) -> str | None:
    """A branch without parameters: the innermost module all its ops were called in (nn_module_stack)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    paths = []
    for name in b.nodes:
        stack = nodes[name].meta.get("nn_module_stack")
        if stack:
            paths.append(str(list(stack.values())[-1][0]).split("."))
    return (".".join(common_prefix(paths)) or None) if paths else None


def numel(gm: fx.GraphModule, target: str) -> int:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj.numel() if isinstance(obj, torch.Tensor) else 0
