"""Dependency analysis: per-op rules turn a traced graph into coupled channel spaces.

Every tensor value gets a *type*: a tuple of axes, each a tuple of factors (see :mod:`vitcc.spaces`).
Parameters introduce spaces; rules tie, split and move them. Ops without a rule freeze every space they
touch and are reported, so an unknown op can make vitcc prune less, never prune wrongly.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .spaces import Axis, Space, axis_size, decompose, find, freeze, fsize, normalize, spaces_of, union

TType = tuple  # tuple[Axis, ...]
Rule = Callable[["Analyzer", fx.Node], Any]

RULES: dict[Any, Rule] = {}  # key: function, method name (str) or nn.Module subclass


def rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Register a coupling rule for functions, method names or module classes (users can add their own)."""
    def deco(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn
    return deco


@dataclass
class Frozen:
    node: str
    reason: str


@dataclass
class Coupling:
    """The result of analysis: a type per node and per parameter, and what had to be frozen."""
    gm: fx.GraphModule
    types: dict[str, Any]
    params: dict[str, TType]
    frozen: list[Frozen] = field(default_factory=list)
    aliases: dict = field(default_factory=dict)
    equal_counts: list = field(default_factory=list)


def is_ttype(t: Any) -> bool:
    return isinstance(t, tuple) and all(isinstance(a, tuple) for a in t) and not any(
        isinstance(a, tuple) and a and isinstance(a[0], tuple) for a in t)


def shape_of(node: Any) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def fixed_type(shape: tuple[int, ...]) -> TType:
    return tuple((s,) if s != 1 else () for s in shape)


class Analyzer:
    """Walks the graph once, applying the rule of each node."""

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple | None = None, depth: int = 0):
        self.gm = gm
        self.depth = depth
        self.values = _record_sizes(gm, example_inputs) if example_inputs is not None else None
        self.types: dict[fx.Node, Any] = {}
        self.params: dict[str, TType] = {}
        self.frozen: list[Frozen] = []
        self.node: fx.Node | None = None
        self.aliases: dict[Space, list[Space]] = {}  # a space split per index by a select -> its copies
        self.equal_counts: list[list[Space]] = []  # spaces whose kept counts must match
        self.modules = dict(gm.named_modules())

    # -- helpers used by rules ------------------------------------------------------------------
    def param(self, qualname: str) -> TType:
        if qualname not in self.params:
            t = self.gm.get_parameter(qualname) if _has_param(self.gm, qualname) else self.gm.get_buffer(qualname)
            # buffers too (a constant k bias carries channels); index buffers become fixed where they index
            self.params[qualname] = tuple((Space(n),) if n != 1 else () for n in t.shape)
        return self.params[qualname]

    def type_of(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.types.get(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self.type_of(x) for x in a)
        return None

    def why(self, what: str = "") -> str:
        n = self.node
        return f"{n.name} ({n.op} {_target_name(n)}){': ' + what if what else ''}"

    def freeze_types(self, t: Any, reason: str) -> None:
        if is_ttype(t):
            spaces = spaces_of(t)
            if any(find(s).frozen is None and find(s).fixed is None for s in spaces):
                self.frozen.append(Frozen(self.node.name, reason))
            for s in spaces:
                freeze(s, reason)
        elif isinstance(t, (list, tuple)):
            for x in t:
                self.freeze_types(x, reason)

    def tie(self, a: Axis, b: Axis, what: str = "tied") -> Axis:
        """Make two axes the same layout: spaces unify, a space meeting a fixed size is not a channel."""
        why = self.why(what)
        na, nb = list(normalize(a)), list(normalize(b))
        out: list = []
        while na and nb:
            x, y = na.pop(0), nb.pop(0)
            sx, sy = fsize(x), fsize(y)
            if sx != sy:  # split the larger factor to match the run of smaller ones
                big, small, rest = (x, [y], nb) if sx > sy else (y, [x], na)
                while rest and _prod(small) < fsize(big):
                    small.append(rest.pop(0))
                if _prod(small) != fsize(big):
                    self._fix_all([big, *small, *na, *nb], why, fixed=False)
                    return a
                pieces = [fsize(f) for f in small]
                parts = pieces if isinstance(big, int) else decompose(big, "product", pieces)
                if parts is None:
                    self._fix_all([big, *small], why, fixed=False)
                    out.extend(small)
                    continue
                for p, q in zip(parts, small):
                    self._tie_factor(p, q, why)
                out.extend(small)
                continue
            self._tie_factor(x, y, why)
            out.append(x)
        return tuple(out)

    def _tie_factor(self, x, y, why: str) -> None:
        if isinstance(x, int) and isinstance(y, int):
            return
        if isinstance(x, int) or isinstance(y, int):
            freeze(y if isinstance(x, int) else x, f"tied to a fixed dimension at {why}", fixed=True)
            return
        union(x, y, why)

    def _fix_all(self, factors, why: str, fixed: bool) -> None:
        for f in factors:
            if not isinstance(f, int):
                freeze(f, f"non-aligned layouts at {why}", fixed=fixed)
        self.frozen.append(Frozen(self.node.name, f"non-aligned layouts: {why}"))

    def out_type(self) -> TType:
        return fixed_type(shape_of(self.node) or ())

    # -- driver -----------------------------------------------------------------------------------
    def run(self) -> Coupling:
        for node in self.gm.graph.nodes:
            self.node = node
            self.types[node] = self.apply(node)
        names = {n.name: t for n, t in self.types.items()}
        return Coupling(self.gm, names, self.params, self.frozen, self.aliases, self.equal_counts)

    def apply(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            shape = shape_of(node)
            return fixed_type(shape) if shape is not None else None
        if node.op == "get_attr":
            obj = _resolve_attr(self.gm, node.target)
            return self.param(node.target) if isinstance(obj, torch.Tensor) else None
        if node.op == "output":
            for t in _flatten(self.type_of(node.args[0])):
                for ax in t:
                    for s in spaces_of([ax]):
                        freeze(s, "model output", fixed=True)
            return None
        key: Any = node.target
        if node.op == "call_module":
            mod = self.modules[node.target]
            key = next((c for c in type(mod).__mro__ if c in RULES), None)
        fn = RULES.get(key)
        if fn is None:
            return self.unknown(node)
        return fn(self, node)

    def unknown(self, node: fx.Node) -> Any:
        ins = [self.type_of(a) for a in node.all_input_nodes]
        if not any(is_ttype(t) or isinstance(t, (list, tuple)) for t in ins) and shape_of(node) is None:
            return None  # pure python arithmetic on sizes, asserts, ...
        inlined = self.inline(node)
        if inlined is not None:
            return inlined
        self.freeze_types(ins, f"no coupling rule for {_target_name(node)}")
        return _out_fixed(node)

    def inline(self, node: fx.Node) -> Any:
        """A Python function kept whole in the graph (timm's notrace helpers such as window_reverse): trace
        its body with the call's concrete sizes and apply the rules of the ops inside."""
        fn = node.target
        if node.op != "call_function" or not inspect.isfunction(fn) or self.values is None or self.depth > 3:
            return None
        try:
            bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
            bound.apply_defaults()
            tensors, concrete = {}, {}
            for name, v in bound.arguments.items():
                if isinstance(v, fx.Node) and shape_of(v) is not None:
                    tensors[name] = v
                else:
                    concrete[name] = fx.node.map_arg(v, lambda n: self.values[n])
            names = list(tensors)
            ns = {"_fn": fn, "_concrete": concrete}  # sizes baked in as constants, tensors as inputs
            exec(f"def _inline({', '.join(names)}):\n    return _fn({', '.join(f'{n}={n}' for n in names)}, **_concrete)", ns)
            sub = fx.GraphModule({}, fx.Tracer(autowrap_functions=()).trace(ns["_inline"]))
            placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
            args = [torch.zeros(shape_of(tensors[p.target]), dtype=tensors[p.target].meta["tensor_meta"].dtype)
                    for p in placeholders]
            ShapeProp(sub).propagate(*args)
        except Exception:  # not traceable on its own: fall back to freezing
            return None
        inner = Analyzer(sub, depth=self.depth + 1)
        inner.frozen, inner.aliases, inner.equal_counts = self.frozen, self.aliases, self.equal_counts
        for p in placeholders:
            inner.types[p] = self.types.get(tensors[p.target])
        result, first = None, len(self.frozen)
        for n in sub.graph.nodes:
            inner.node = n
            if n.op == "output":
                result = inner.type_of(n.args[0])
            elif n.op != "placeholder":
                inner.types[n] = inner.apply(n)
        for f in self.frozen[first:]:  # name what froze inside the call after the call
            f.node = f"{node.name}/{f.node}"
        self.node = node
        return result


def _has_param(m: nn.Module, name: str) -> bool:
    try:
        m.get_parameter(name)
        return True
    except AttributeError:
        return False


def _resolve_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _flatten(t: Any):
    if t is None:
        return
    if is_ttype(t):
        yield t
    elif isinstance(t, (list, tuple, dict)):
        for x in (t.values() if isinstance(t, dict) else t):
            yield from _flatten(x)


def _prod(fs) -> int:
    p = 1
    for f in fs:
        p *= fsize(f)
    return p


def _out_fixed(node: fx.Node) -> Any:
    tm = node.meta.get("tensor_meta")
    if tm is None:
        return None
    if hasattr(tm, "shape"):
        return fixed_type(tuple(tm.shape))
    if isinstance(tm, (list, tuple)):
        return type(tm)(fixed_type(tuple(m.shape)) if hasattr(m, "shape") else None for m in tm)
    return None


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def analyze(gm: fx.GraphModule, example_inputs: tuple | None = None) -> Coupling:
    """Derive coupled channel spaces from a ShapeProp'ed GraphModule (inputs let opaque calls be inlined)."""
    return Analyzer(gm, example_inputs).run()


def _record_sizes(gm: fx.GraphModule, example_inputs: tuple) -> dict:
    """Run the graph once and keep every non-tensor value (sizes and shapes) for inlining."""
    values: dict = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if not isinstance(out, torch.Tensor):
                values[n] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*example_inputs)
    return values


# ====================================================================================================
# The rule table.

_UNARY_FUNCS = [F.gelu, F.relu, F.silu, F.dropout, F.sigmoid, F.tanh, F.hardswish, F.mish, F.elu,
                F.leaky_relu, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg,
                torch.sqrt, torch.rsqrt, torch.erf, operator.neg, torch.clone, torch.nn.functional.hardsigmoid,
                torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.clamp, torch.clip,
                F.normalize]  # an Lp normalisation is unchanged by zeros, so masked == compact
_UNARY_METHODS = ["gelu", "relu", "sigmoid", "tanh", "exp", "abs", "neg", "sqrt", "rsqrt", "float", "half",
                  "double", "to", "type", "type_as", "contiguous", "clone", "detach", "requires_grad_",
                  "zero_", "fill_", "clamp", "clamp_min", "clamp_max", "erf", "sign", "zeros_like", "new_zeros_like",
                  "pow", "square", "reciprocal", "mul_", "add_", "sigmoid_", "relu_", "float32"]
_UNARY_MODULES = [nn.GELU, nn.ReLU, nn.SiLU, nn.Dropout, nn.Identity, nn.Tanh, nn.Sigmoid, nn.Hardswish,
                  nn.Mish, nn.ELU, nn.LeakyReLU, nn.Hardsigmoid, nn.ReLU6]


@rule(*_UNARY_FUNCS, *_UNARY_METHODS, *_UNARY_MODULES)
def _unary(a: Analyzer, node: fx.Node) -> Any:
    t = a.type_of(node.args[0]) if node.args else None
    if node.target in ("pow", "clamp", "clamp_min", "clamp_max", "fill_", "mul_", "add_") and len(node.args) > 1:
        other = a.type_of(node.args[1])
        if is_ttype(other):
            return _broadcast(a, node, [t, other])
    return t if is_ttype(t) else a.out_type()


_BINARY = [operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
           torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
           "add", "sub", "mul", "div", "maximum", "minimum", "masked_fill", "where", "lerp"]


@rule(*_BINARY)
def _binary(a: Analyzer, node: fx.Node) -> Any:
    ts = [a.type_of(x) for x in node.args if isinstance(x, fx.Node)]
    ts += [a.type_of(v) for v in node.kwargs.values() if isinstance(v, fx.Node)]
    return _broadcast(a, node, [t for t in ts if is_ttype(t)])


def _broadcast(a: Analyzer, node: fx.Node, ts: list) -> Any:
    ts = [t for t in ts if is_ttype(t)]
    if not ts:
        return a.out_type() if shape_of(node) else None
    rank = max(len(t) for t in ts)
    padded = [((),) * (rank - len(t)) + tuple(t) for t in ts]
    out = []
    for i in range(rank):
        axes = [p[i] for p in padded if axis_size(p[i]) != 1]
        ax = axes[0] if axes else ()
        for other in axes[1:]:
            ax = a.tie(ax, other, "broadcast")
        out.append(ax)
    return tuple(out)


# -- linear algebra --------------------------------------------------------------------------------

@rule(nn.Linear)
def _linear_module(a: Analyzer, node: fx.Node) -> Any:
    mod = a.modules[node.target]
    bias = f"{node.target}.bias" if mod.bias is not None else None
    return _linear(a, a.type_of(node.args[0]), a.param(f"{node.target}.weight"), a.param(bias) if bias else None)


@rule(F.linear)
def _linear_fn(a: Analyzer, node: fx.Node) -> Any:
    w, b = a.type_of(_arg(node, 1, "weight")), a.type_of(_arg(node, 2, "bias"))
    return _linear(a, a.type_of(node.args[0]), w, b)


def _linear(a: Analyzer, x: TType, w: TType, b: TType | None) -> TType:
    a.tie(x[-1], w[1], "linear input")
    if b is not None:
        a.tie(b[0], w[0], "linear bias")
    return tuple(x[:-1]) + (w[0],)


@rule(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__")
def _matmul(a: Analyzer, node: fx.Node) -> Any:
    x, y = a.type_of(node.args[0]), a.type_of(node.args[1])
    if not (is_ttype(x) and is_ttype(y)) or len(x) < 2 or len(y) < 2:
        return a.unknown(node)
    a.tie(x[-1], y[-2], "matmul contraction")
    both_activations = all(not _is_param_node(n) for n in node.args[:2])
    if both_activations:  # attention: contracted channels are head dims, batch axes carry heads
        _tag(x[-1], "head_dim_qk")
        _tag(y[-1], "head_dim_v")
    batch = _broadcast(a, node, [tuple(x[:-2]), tuple(y[:-2])]) if len(x) > 2 or len(y) > 2 else ()
    if both_activations:
        _tag_axes(batch, "heads")
    return tuple(batch) + (x[-2], y[-1])


@rule(F.scaled_dot_product_attention)
def _sdpa(a: Analyzer, node: fx.Node) -> Any:
    q, k, v = (a.type_of(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    a.tie(q[-1], k[-1], "attention q.k")
    a.tie(k[-2], v[-2], "attention keys/values")
    batch = _broadcast(a, node, [tuple(q[:-2]), tuple(k[:-2]), tuple(v[:-2])])
    mask = a.type_of(_arg(node, 3, "attn_mask"))
    if is_ttype(mask):
        _broadcast(a, node, [tuple(batch) + (q[-2], k[-2]), mask])
    _tag(q[-1], "head_dim_qk")
    _tag(v[-1], "head_dim_v")
    _tag_axes(batch, "heads")
    return tuple(batch) + (q[-2], v[-1])


def _is_param_node(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr"


def _tag(axis: Axis, tag: str) -> None:
    for s in spaces_of([axis]):
        find(s).tags.add(tag)


def _tag_axes(axes, tag: str) -> None:
    for ax in axes:
        _tag(ax, tag)


@rule(nn.Conv2d, nn.Conv1d)
def _conv(a: Analyzer, node: fx.Node) -> Any:
    mod = a.modules[node.target]
    x = a.type_of(node.args[0])
    w = a.param(f"{node.target}.weight")
    out = list(a.out_type())
    if mod.groups == 1:
        a.tie(x[1], w[1], "conv input channels")
        out[1] = w[0]
    elif mod.groups == mod.in_channels == mod.out_channels:
        out[1] = a.tie(x[1], w[0], "depthwise conv channels")
    else:
        a.freeze_types([x, w], "grouped convolution")
        return tuple(out)
    if mod.bias is not None:
        a.tie(a.param(f"{node.target}.bias")[0], w[0], "conv bias")
    return tuple(out)


# -- normalisation ---------------------------------------------------------------------------------

@rule(nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
def _layernorm_module(a: Analyzer, node: fx.Node) -> Any:
    mod = a.modules[node.target]
    ps = [a.param(f"{node.target}.{p}") for p in ("weight", "bias") if getattr(mod, p, None) is not None]
    return _norm(a, a.type_of(node.args[0]), len(mod.normalized_shape), ps)


@rule(F.layer_norm, getattr(F, "rms_norm", F.layer_norm))
def _layernorm_fn(a: Analyzer, node: fx.Node) -> Any:
    shape = _arg(node, 1, "normalized_shape")
    ps = [a.type_of(_arg(node, i, n)) for i, n in ((2, "weight"), (3, "bias"))]
    return _norm(a, a.type_of(node.args[0]), len(shape), [p for p in ps if p is not None])


def _norm(a: Analyzer, x: TType, k: int, params: list[TType]) -> TType:
    x = list(x)
    for i in range(len(x) - k, len(x)):
        for p in params:
            x[i] = a.tie(x[i], p[i - len(x)], "norm affine")
        _tag(x[i], "normalized")
    return tuple(x)


@rule(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(a: Analyzer, node: fx.Node) -> Any:
    mod = a.modules[node.target]
    x = a.type_of(node.args[0])
    for p in ("weight", "bias", "running_mean", "running_var"):
        if getattr(mod, p, None) is not None:
            a.tie(x[1], a.param(f"{node.target}.{p}")[0], "batchnorm channels")
    return x


# -- layout ops ------------------------------------------------------------------------------------

@rule("view", "reshape", torch.reshape, "flatten", torch.flatten, "unflatten", "squeeze", "unsqueeze",
      torch.squeeze, torch.unsqueeze, "view_as", "reshape_as", nn.Flatten, nn.Unflatten)
def _reshape(a: Analyzer, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    out_shape = shape_of(node)
    if not is_ttype(x) or out_shape is None:
        return a.unknown(node)
    flat = [f for ax in x for f in normalize(ax)]
    out = []
    for n in out_shape:
        ax: list = []
        while flat and _prod(ax) < n:
            f = flat.pop(0)
            need = n // _prod(ax)
            if n % _prod(ax) == 0 and fsize(f) > need and fsize(f) % need == 0:
                pieces = [need, fsize(f) // need]
                parts = pieces if isinstance(f, int) else decompose(f, "product", pieces)
                if parts is None:
                    a.freeze_types(((f,),), a.why("reshape splits an already decomposed space"))
                    parts = pieces
                ax.append(parts[0])
                flat.insert(0, parts[1])
            else:
                ax.append(f)
        if _prod(ax) != n:
            a.freeze_types([x], "reshape does not align with channel layout")
            return a.out_type()
        out.append(tuple(ax))
    return tuple(out)


@rule("permute", torch.permute)
def _permute(a: Analyzer, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    dims = node.args[1:] if len(node.args) > 2 or isinstance(node.args[1], int) else node.args[1]
    dims = dims or node.kwargs.get("dims")
    return tuple(x[_dim(d, len(x))] for d in dims)


@rule("transpose", torch.transpose, "swapaxes")
def _transpose(a: Analyzer, node: fx.Node) -> Any:
    x = list(a.type_of(node.args[0]))
    i, j = (_dim(d, len(x)) for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
    x[i], x[j] = x[j], x[i]
    return tuple(x)


@rule("t")
def _t(a: Analyzer, node: fx.Node) -> Any:
    return tuple(reversed(a.type_of(node.args[0])))


@rule("expand", "expand_as", "repeat", "tile")
def _expand(a: Analyzer, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    shape = shape_of(node)
    pad = ((),) * (len(shape) - len(x)) + tuple(x)
    out = []
    for ax, n in zip(pad, shape):
        size = axis_size(ax)
        if size == n:
            out.append(ax)
        elif size == 1:  # a broadcast axis ties nothing: a fresh space that takes whatever it meets
            out.append((Space(n),))
        else:
            out.append((n // size,) + tuple(ax))
    return tuple(out)


@rule(nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
      nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d,
      F.adaptive_max_pool2d, F.avg_pool1d, F.adaptive_avg_pool1d)
def _pool(a: Analyzer, node: fx.Node) -> Any:
    """Pooling works per channel (N, C, *spatial): channels pass, spatial axes take the output's sizes."""
    x, out = a.type_of(node.args[0]), shape_of(node)
    if not is_ttype(x) or out is None or len(out) != len(x) or len(x) < 3:
        return a.unknown(node)
    return (x[0] if axis_size(x[0]) == out[0] else (out[0],), x[1]) + fixed_type(out[2:])


@rule(F.pad, "pad")
def _pad(a: Analyzer, node: fx.Node) -> Any:
    """Padding grows some axes (spatial ones in Swin); an axis whose size is unchanged passes through."""
    x = a.type_of(node.args[0])
    out = []
    for ax, n_in, n_out in zip(x, shape_of(node.args[0]), shape_of(node)):
        if n_in == n_out:
            out.append(ax)
        else:
            if spaces_of([ax]):
                a.freeze_types([(ax,)], "padding of a channel axis")
            out.append((n_out,))
    return tuple(out)


@rule(torch.roll, "roll")
def _roll(a: Analyzer, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    dims = _arg(node, 2, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims or range(len(x)))
    a.freeze_types([tuple(x[_dim(d, len(x))] for d in dims)], "roll along a channel axis")
    return x


@rule(torch.cat, torch.concat, torch.concatenate)
def _cat(a: Analyzer, node: fx.Node) -> Any:
    ts = a.type_of(node.args[0])
    ranks = {len(t) for t in ts}
    d = _dim(_arg(node, 1, "dim", 0), max(ranks))
    out = []
    for i in range(max(ranks)):
        if i == d:
            continue
        ax = ts[0][i]
        for t in ts[1:]:
            ax = a.tie(ax, t[i], "cat")
        out.append(ax)
    along = [t[d] for t in ts]
    n = sum(axis_size(x) for x in along)
    if not spaces_of(along) or any(axis_size(x) > 1 and not spaces_of([x]) for x in along):
        for sp in spaces_of(along):  # joined with fixed data (patch tokens): a token axis, not channels
            freeze(sp, a.why("concatenated with a fixed axis"), fixed=True)
        cat_axis = (n,)
    elif all(ax == along[0] for ax in along):  # k copies of one layout: a fixed k times that layout
        cat_axis = (len(along),) + tuple(along[0])
    else:
        s = Space(n)
        parts = decompose(s, "concat", [axis_size(x) for x in along])
        for p, ax in zip(parts, along):
            a.tie((p,), ax, "cat along channels")
        cat_axis = (s,)
    out.insert(d, cat_axis)
    return tuple(out)


@rule(torch.stack)
def _stack(a: Analyzer, node: fx.Node) -> Any:
    """Stacking k tensors: their axes tie, and a new fixed axis of size k enumerates them."""
    ts = a.type_of(node.args[0])
    if not all(is_ttype(t) for t in ts) or len({len(t) for t in ts}) != 1:
        return a.unknown(node)
    out = list(ts[0])
    for t in ts[1:]:
        out = [a.tie(x, y, "stack") for x, y in zip(out, t)]
    d = _dim(_arg(node, 1, "dim", 0), len(out) + 1)
    out.insert(d, (len(ts),))
    return tuple(out)


@rule("unbind", torch.unbind)
def _unbind(a: Analyzer, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    d = _dim(_arg(node, 1, "dim", 0), len(x))
    return tuple(_select(a, node.args[0], x, d, j) for j in range(axis_size(x[d])))


@rule("chunk", torch.chunk, "split", torch.split, "tensor_split")
def _chunk(a: Analyzer, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    metas = node.meta.get("tensor_meta")
    d = _dim(_arg(node, 2, "dim", 0), len(x))
    sizes = [m.shape[d] for m in metas]
    if len(sizes) == 1:
        return (x,)
    ax = normalize(x[d])
    outs = []
    if not spaces_of([ax]):
        return tuple(tuple(x[:d]) + ((n,),) + tuple(x[d + 1:]) for n in sizes)
    if len(ax) == 1 or (len(ax) > 1 and fsize(ax[0]) == len(sizes) and len(set(sizes)) == 1):
        if len(ax) > 1:  # chunks along the outer factor of a product: each chunk is the inner layout
            return tuple(_select(a, node.args[0], x, d, j, keep_axis=True) for j in range(len(sizes)))
        parts = decompose(ax[0], "concat", sizes)
        if parts is not None:
            return tuple(tuple(x[:d]) + ((p,),) + tuple(x[d + 1:]) for p in parts)
    a.freeze_types([x], "split along a channel axis that is not a whole factor")
    for n in sizes:
        outs.append(tuple(x[:d]) + ((n,),) + tuple(x[d + 1:]))
    return tuple(outs)


def _select(a: Analyzer, src: fx.Node, x: TType, d: int, j: int, keep_axis: bool = False) -> TType:
    """Take index j of the outermost factor of axis d.

    When that factor is the outer child of a product split (the `3` of fused qkv), the inner children
    become per-index spaces (q, k and v each get their own heads and head dims) while nothing else
    shares them yet: the parent turns into a concatenation of independent parts.
    """
    ax = normalize(x[d])
    rest = tuple(x[:d]), tuple(x[d + 1:])
    if not ax:
        return rest[0] + rest[1]
    outer, inner = ax[0], ax[1:]
    if isinstance(outer, int) or find(outer).fixed:
        return rest[0] + ((tuple(inner),) if keep_axis else ()) + rest[1]
    sub = _per_index_spaces(a, src, outer)
    if sub is None:
        freeze(outer, a.why("select along a shared channel factor"))
        a.frozen.append(Frozen(a.node.name, "select along a channel factor"))
        mapping = {}
    else:
        mapping = sub[j]
    conv = lambda axis: tuple(mapping.get(find(f).id, f) if not isinstance(f, int) else f for f in normalize(axis))
    mid = (conv(inner),) if keep_axis else ()
    return tuple(conv(ax_) for ax_ in rest[0]) + mid + tuple(conv(ax_) for ax_ in rest[1])


def _per_index_spaces(a: Analyzer, src: fx.Node, outer: Space):
    cache = a.__dict__.setdefault("_selects", {})
    key = find(outer).id
    if key in cache:
        return cache[key]
    parent = _parent_of(a, outer)
    result = None
    if parent is not None:
        kind, children = find(parent).split
        inner = list(normalize(tuple(children[1:])))
        ok = (kind == "product" and find(children[0]) is find(outer) and _only_selects(src)
              and all(find(c).members == 1 for c in children)
              and all(not isinstance(c, int) and c.members == 1 and not c.frozen and not c.fixed for c in inner))
        if ok:
            per_index = []
            parts = []
            for _ in range(outer.size):
                fresh = {find(c).id: Space(c.size) for c in inner}
                for c in inner:
                    fresh[find(c).id].tags |= find(c).tags
                per_index.append(fresh)
                part = Space(_prod(inner))
                decompose(part, "product", [c.size for c in inner])
                for c, p in zip(inner, find(part).split[1]):
                    union(p, fresh[find(c).id], "select")
                parts.append(part)
            find(parent).split = ("concat", parts)
            for c in inner:  # the fused tensor before the select keeps one size per inner factor
                copies = [fresh[find(c).id] for fresh in per_index]
                a.aliases[find(c)] = copies
                a.equal_counts.append(copies)
            result = per_index
    cache[key] = result
    return result


def _only_selects(src: fx.Node) -> bool:
    """Every use of the stacked tensor takes one slice of it (unbind, or x[0], x[1], ...)."""
    return len(src.users) == 1 or all(u.target is operator.getitem and isinstance(u.args[1], (int, tuple))
                                      for u in src.users)


def _parent_of(a: Analyzer, s: Space) -> Space | None:
    target = find(s)
    for t in a.params.values():
        for ax in t:
            for f in ax:
                hit = _search_parent(f, target)
                if hit is not None:
                    return hit
    return None


def _search_parent(f, target: Space):
    if isinstance(f, int):
        return None
    r = find(f)
    if r.split is None:
        return None
    for c in r.split[1]:
        if find(c) is target:
            return r
        hit = _search_parent(c, target)
        if hit is not None:
            return hit
    return None


@rule(operator.getitem)
def _getitem(a: Analyzer, node: fx.Node) -> Any:
    x, idx = a.type_of(node.args[0]), node.args[1]
    if x is None:
        return None
    if not is_ttype(x):  # tuple of outputs (unbind, chunk, split)
        return x[idx] if isinstance(idx, int) else None
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, fx.Node) for i in idx):
        return _gather(a, node, x, idx)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        fill = len(x) - (len([i for i in idx if i is not None]) - 1)
        idx = idx[:k] + (slice(None),) * fill + idx[k + 1:]
    ints = [k for k, i in enumerate(idx) if isinstance(i, int)]
    if len(ints) == 1 and None not in idx and all(i == slice(None) for i in idx if not isinstance(i, int)) \
            and spaces_of([x[ints[0]]]):  # qkv[0]: select along a stacked factor, as unbind does
        return _select(a, node.args[0], x, ints[0], idx[ints[0]])
    out, d = [], 0
    shape, out_shape = shape_of(node.args[0]), shape_of(node)
    pending: list[tuple[int, int]] = []
    for i in idx:
        if i is None:
            out.append(())
            continue
        if isinstance(i, int):
            pending.append((len(out), d))
            out.append(None)
        elif isinstance(i, slice):
            n_out = out_shape[len(out) - len(pending)] if out_shape is not None else shape[d]
            if n_out == shape[d]:
                out.append(x[d])
            else:
                if spaces_of([x[d]]):
                    a.freeze_types([(x[d],)], "slice of a channel axis")
                out.append((n_out,))
        d += 1
    out.extend(x[d:])
    for pos, dd in reversed(pending):
        out.pop(pos)
        if spaces_of([x[dd]]):
            a.freeze_types([(x[dd],)], "index into a channel axis")
    return tuple(out)


def _gather(a: Analyzer, node: fx.Node, x: TType, idx: tuple) -> Any:
    """Indexing with a tensor along one leading axis (e.g. a relative position table): other axes pass."""
    tensor_pos = [k for k, i in enumerate(idx) if isinstance(i, fx.Node)]
    if tensor_pos != [0] or any(i != slice(None) for i in idx[1:]):
        a.freeze_types([x], "advanced indexing")
        return a.out_type()
    for s in spaces_of([x[0]]) + spaces_of(a.type_of(idx[0]) or ()):
        freeze(s, a.why("gathered axis"), fixed=True)
    ishape = shape_of(idx[0]) or ()
    return fixed_type(ishape) + tuple(x[1:])


@rule(getattr)
def _getattr(a: Analyzer, node: fx.Node) -> Any:
    return None  # x.shape, x.dtype, ...: sizes, not tensors


@rule("size", "dim", "numel", "__len__", len)
def _sizes(a: Analyzer, node: fx.Node) -> Any:
    return None


# -- reductions and softmax ---------------------------------------------------------------------------

@rule("mean", torch.mean, "sum", torch.sum, "amax", "max", "amin", "min", "std", "var", "norm")
def _reduce(a: Analyzer, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    dims = _arg(node, 1, "dim")
    if dims is None:
        a.freeze_types([x], "reduction over all axes")
        return _out_fixed(node)
    keep = _arg(node, 2, "keepdim", False)
    dims = {_dim(d, len(x)) for d in ([dims] if isinstance(dims, int) else dims)}
    a.freeze_types([tuple(x[d] for d in dims)], "reduction over a channel axis") if spaces_of(
        [x[d] for d in dims]) else None
    return tuple(((),) if (i in dims and keep) else ax for i, ax in enumerate(x) if keep or i not in dims)


@rule(F.softmax, torch.softmax, "softmax", nn.Softmax, F.log_softmax, "log_softmax")
def _softmax(a: Analyzer, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    d = a.modules[node.target].dim if node.op == "call_module" else _arg(node, 1, "dim")
    if d is not None and spaces_of([x[_dim(d, len(x))]]):
        a.freeze_types([(x[_dim(d, len(x))],)], "softmax over a channel axis")
    return x


@rule(torch._assert, "_assert")
def _ignore(a: Analyzer, node: fx.Node) -> Any:
    return None


for _op in (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.floordiv,
            operator.mod, operator.pow, int, float, max, min):
    RULES.setdefault(_op, lambda a, node: _binary(a, node) if shape_of(node) else None)


# -- timm's notrace helpers that reach the graph as single calls ---------------------------------------
try:
    from timm.layers import attention as _timm_attention
except ImportError:  # pragma: no cover - timm is a dependency, but rules must not need it
    _timm_attention = None

if _timm_attention is not None:
    @rule(getattr(_timm_attention, "maybe_add_mask", None))
    def _maybe_add_mask(a: Analyzer, node: fx.Node) -> Any:
        return _binary(a, node)

    @rule(getattr(_timm_attention, "resolve_self_attn_mask", None))
    def _resolve_mask(a: Analyzer, node: fx.Node) -> Any:
        mask = a.type_of(_arg(node, 2, "attn_mask"))
        return mask if is_ttype(mask) else None
