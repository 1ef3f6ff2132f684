"""Model frontend: load a model from a spec or file (safely), pick its input shape, trace it to torch.fx."""
from __future__ import annotations

import _compat_pickle, ast, builtins, enum, inspect, io, json, math, operator, pickle, sys, types
from importlib import import_module

import torch
import torch.fx as fx
from timm.layers import _fx as timm_fx
from torch.fx.passes.shape_prop import ShapeProp

from vitcc import sources
from vitcc.errors import VitccError

__all__ = ["load_model", "input_shape_for", "trace", "register_leaf_module", "register_leaf_function"]

_leaf_modules: set[type] = set()
_leaf_functions: set = set()


def register_leaf_module(cls: type) -> type:
    """Keep instances of `cls` opaque when tracing (e.g. data-dependent control flow). Usable as a decorator."""
    _leaf_modules.add(cls)
    return cls


def register_leaf_function(fn):
    """Record calls to `fn` as one graph node instead of tracing into it; also lets saved graphs calling it reload."""
    _leaf_functions.add(fn)
    return fn


# ---------------------------------------------------------------- safe unpickling
# Pickles run code while loading, so a `torch.save`d module is only unpickled through an allowlist: the globals torch's
# own weights-only loader allows, harmless containers, and classes (not functions) of torch/torchvision/timm/vitcc.
_ROOTS = ("torch", "torchvision", "timm", "vitcc")
_DENY = ("torch.hub", "torch.jit", "torch.serialization", "torch.utils", "torch.package", "torch.distributed",
         "torch.multiprocessing", "torch._dynamo", "torch._inductor", "torch.compiler", "torch.export", "torch.onnx")
_DENY_NAMES = {"load", "save", "compile", "from_file", "load_library"}
_GLOBALS = {"builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex", "builtins.bytearray",
            "collections.OrderedDict", "collections.Counter", "functools.partial", "_codecs.encode"}
try:  # private API: fall back to the tensor rebuild functions it contains
    from torch._weights_only_unpickler import _get_allowed_globals
    _GLOBALS |= set(_get_allowed_globals())
except Exception:  # pragma: no cover
    _GLOBALS |= {f"torch._utils.{n}" for n in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_tensor")}


def _ok_module(name: str, roots=_ROOTS) -> bool:
    return name.split(".")[0] in roots and (name == "torch.utils._pytree" or
                                            not any(name == d or name.startswith(d + ".") for d in _DENY))


def _ok_class(obj) -> bool:
    """Module classes and the plain data classes they hold (enums, fx tracers), from trusted packages only."""
    return (isinstance(obj, type) and _ok_module(obj.__module__)
            and issubclass(obj, (torch.nn.Module, enum.Enum, fx.Tracer)))


def _unpickler_for(path) -> types.SimpleNamespace:
    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            # protocol-2 pickles (torch.save's default) use Python 2 names, e.g. __builtin__.set
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            if f"{module}.{name}" == "torch.fx.graph_module.reduce_graph_module":
                return _safe_reduce_graph_module
            if f"{module}.{name}" in _GLOBALS or (_ok_module(module) and "." not in name
                                                  and _ok_class(getattr(import_module(module), name, None))):
                return super().find_class(module, name)
            raise VitccError(f"refusing to unpickle {module}.{name} from {path}: it is not a torch/torchvision/timm/"
                             f"vitcc class; rerun with --trust-pickle if you trust this file")

    def load(f, **kw):
        return Unpickler(f, **kw).load()
    return types.SimpleNamespace(Unpickler=Unpickler, load=load, loads=lambda b, **kw: load(io.BytesIO(b), **kw),
                                 __name__="vitcc_safe_pickle")


# A pickled fx.GraphModule carries its forward as Python source which torch would exec: interpret its import block and
# accept only straight-line fx-style code that names trusted op namespaces and functions.
def _safe_getattr(obj, name, *default):
    if name.startswith("__") or isinstance(obj, types.ModuleType):
        raise VitccError(f"refusing getattr(..., {name!r}) in a pickled GraphModule")
    return getattr(obj, name, *default)


_CODE_ROOTS = _ROOTS + ("math", "operator", "_operator")
_SAFE_BUILTINS = {n: getattr(builtins, n) for n in ("Ellipsis", "slice", "range", "len", "int", "float", "bool",
                                                     "tuple", "list", "dict", "set", "frozenset", "min", "max", "abs")}


def _safe_import(name, globals=None, locals=None, fromlist=(), level=0):
    """C code called from the fx forward (torch's op dispatch) imports `torch` through the calling frame's
    builtins; the checked code itself cannot (no import statements, no dunder names). Only trusted modules."""
    if level == 0 and _ok_module(name, _CODE_ROOTS):
        return builtins.__import__(name, globals, locals, fromlist, level)
    raise VitccError(f"refusing to import {name} while loading a pickled GraphModule")


_SAFE_BUILTINS["__import__"] = _safe_import
_OP_NAMESPACES = (torch, torch.nn.functional, torch.special, torch.linalg, torch.fft, torch._C._nn, operator, math)
_OP_MODULES = {"torch", "torch.functional", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions",
               "torch._C._linalg", "torch._C._special", "torch._C._fft", "torch.special", "torch.linalg", "torch.fft",
               "_operator", "operator", "math"}
_WRAP = "torch.fx._symbolic_trace.wrap"
_OPS = (torch._ops.OpOverload, torch._ops.OpOverloadPacket)
_CONSTS = (int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout,
           enum.Enum) + _OPS
_TRUSTED_FNS = (fx._symbolic_trace._assert_is_none, fx._symbolic_trace.wrap, torch._assert, torch.Tensor, torch.Size,
                torch.device, _safe_getattr)
_NAMESPACES = (torch._ops._OpNamespace, type(torch.ops)) + _OPS
_NODES = (ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Assign, ast.Return, ast.Expr, ast.Delete, ast.Pass,
          ast.Call, ast.keyword, ast.Attribute, ast.Name, ast.Constant, ast.Tuple, ast.List, ast.Dict, ast.Subscript,
          ast.Slice, ast.Starred, ast.BinOp, ast.UnaryOp, ast.Compare, ast.expr_context, ast.operator, ast.unaryop,
          ast.cmpop)


def _ok_value(obj) -> bool:
    """May fx code reference `obj`? Constants, op overloads, trusted classes, and public ops of torch/operator/math."""
    fns = (*_TRUSTED_FNS, *_leaf_functions, *timm_fx.get_notrace_functions())
    if isinstance(obj, _CONSTS) or _ok_class(obj) or any(obj is f for f in fns):
        return True
    name, mod = getattr(obj, "__name__", "_"), getattr(obj, "__module__", None) or ""
    return (callable(obj) and not isinstance(obj, type) and not name.startswith("_") and name not in _DENY_NAMES
            and mod in _OP_MODULES and any(getattr(ns, name, None) is obj for ns in _OP_NAMESPACES))


def _import_globals(block: str) -> dict:
    g = {"getattr": _safe_getattr}
    for st in ast.parse(block).body:
        if isinstance(st, ast.Import) and all(_ok_module(a.name, _CODE_ROOTS) for a in st.names):
            for a in st.names:
                g[a.asname or a.name.split(".")[0]] = import_module(a.name if a.asname else a.name.split(".")[0])
        elif isinstance(st, ast.ImportFrom) and st.module == "builtins" and [a.name for a in st.names] == ["getattr"]:
            g[st.names[0].asname or "getattr"] = _safe_getattr
        elif isinstance(st, ast.ImportFrom) and st.level == 0 and (_ok_module(st.module, _CODE_ROOTS)
                                                                   or st.module in sys.modules):
            for a in st.names:  # every imported object is vetted; user modules only if already imported
                obj = getattr(sys.modules.get(st.module) or import_module(st.module), a.name, None)
                if not _ok_value(obj):
                    raise VitccError(f"refusing to import {st.module}.{a.name} in a pickled GraphModule")
                g[a.asname or a.name] = obj
        elif isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name) and (
                ast.unparse(st.value) == "type(None)" or isinstance(getattr(st.value, "value", None), str)):
            g[st.targets[0].id] = type(None) if isinstance(st.value, ast.Call) else st.value.value  # str annotation
        else:
            raise VitccError(f"refusing unexpected statement in a pickled GraphModule: {ast.unparse(st)[:80]}")
    return g


def _chain_problem(node, obj, parents) -> str | None:
    """Resolve a dotted name rooted at a global (e.g. torch.nn.functional.gelu) and vet every step."""
    while isinstance(parents.get(node), ast.Attribute):
        if not (isinstance(obj, _NAMESPACES)
                or isinstance(obj, types.ModuleType) and _ok_module(obj.__name__, _CODE_ROOTS)):
            return f"use of {ast.unparse(node)}"
        node = parents[node]
        obj = getattr(obj, node.attr, None)
    return None if _ok_value(obj) else f"use of {ast.unparse(node)}"


def _is_fx_wrap(stmt) -> bool:
    """fx emits `torch.fx._symbolic_trace.wrap("name")` lines for autowrapped functions."""
    call = getattr(stmt, "value", None)
    return (isinstance(stmt, ast.Expr) and isinstance(call, ast.Call) and ast.unparse(call.func) == _WRAP
            and not call.keywords and len(call.args) == 1 and isinstance(call.args[0], ast.Constant)
            and isinstance(call.args[0].value, str))


def _safe_reduce_graph_module(body: dict, import_block: str) -> torch.nn.Module:
    """Stand-in for torch.fx.graph_module.reduce_graph_module that validates the code before running it."""
    from torch.fx.graph_module import _deserialize_graph_module
    g, src = _import_globals(import_block), body.get("_code") or body.get("code") or ""
    tree = ast.parse(src)
    *wraps, fn = tree.body or [None]
    if not (isinstance(fn, ast.FunctionDef) and fn.name == "forward" and not fn.decorator_list
            and all(map(_is_fx_wrap, wraps))):
        raise VitccError("refusing to load a pickled GraphModule: its code is not a single fx forward function")
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    for node in ast.walk(tree):
        name = getattr(node, "attr", None) or getattr(node, "id", None) or getattr(node, "arg", None) or ""
        bad = None
        if not isinstance(node, _NODES) or (isinstance(node, ast.FunctionDef) and node is not fn):
            bad = f"a {type(node).__name__} statement"
        elif name.startswith("__"):
            bad = f"dunder access {ast.unparse(node)}"
        elif name in g and (isinstance(node, ast.arg) or isinstance(getattr(node, "ctx", None), (ast.Store, ast.Del))):
            bad = f"rebinding global {name}"
        elif isinstance(node, ast.Name) and name in g:
            bad = _chain_problem(node, g[name], parents)
        if bad:
            raise VitccError(f"refusing to load a pickled GraphModule: its code contains {bad}; "
                             "rerun with --trust-pickle if you trust this file")
    env = {"__builtins__": _SAFE_BUILTINS, **g}
    exec(compile(tree, "<vitcc-graphmodule>", "exec"), env)
    return _deserialize_graph_module(env["forward"], body)


# ---------------------------------------------------------------- loading: vitcc.sources says where a model comes from
load_model, input_shape_for = sources.load_model, sources.input_shape_for


# ---------------------------------------------------------------- tracing
class VitccTracer(fx.Tracer):
    """fx tracer with timm's and the user's leaf modules / functions; remembers which module it failed in."""

    def __init__(self):
        fns = {f for f in timm_fx.get_notrace_functions() if callable(f)} | _leaf_functions
        super().__init__(autowrap_functions=tuple(fns))
        self.failed_in = None

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return (super().is_leaf_module(m, qualname) or timm_fx.is_notrace_module(type(m))
                or isinstance(m, tuple(_leaf_modules)))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or (self.path_of_module(m), type(m).__name__)
            raise


_vitcc_meta = sources.recorded_meta


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def trace(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Trace `model` with its first len(example_inputs) forward parameters as inputs; nodes get tensor_meta."""
    meta = _vitcc_meta(model)
    src = meta.get("source_class") or type(model).__name__
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {}
    for p in params[len(example_inputs):]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise VitccError(f"{src}.forward needs argument {p.name!r}; give one example input per required argument")
        concrete[p.name] = p.default
    tracer = VitccTracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:
        where = f"in module {tracer.failed_in[0]!r}" if tracer.failed_in else "in the top-level forward"
        leaf = tracer.failed_in[1] if tracer.failed_in else "<ClassName>"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VitccError(f"cannot trace {src}: {first}, {where}; mark it as a leaf with vitcc.frontend."
                         f"register_leaf_module({leaf}) or timm.layers.register_notrace_module") from None
    _drop_placeholders(graph, len(example_inputs))
    gm = fx.GraphModule(model, graph)
    cfg = getattr(model, "pretrained_cfg", None) or meta.get("pretrained_cfg")
    meta.update(source_class=src, input_shape=tuple(example_inputs[0].shape) if example_inputs else None)
    if isinstance(cfg, dict):
        meta["pretrained_cfg"] = {k: v for k, v in cfg.items() if _jsonable(v)}
    gm.meta.update(meta)
    gm.vitcc_meta = meta  # GraphModule pickling drops .meta but keeps plain attributes
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
        raise VitccError(f"cannot run {src} on inputs of shape {shapes}: {(str(e).splitlines() or [''])[0]}") from None
    return gm


def _drop_placeholders(graph: fx.Graph, keep: int) -> None:
    """concrete_args still leave placeholders (and asserts on them) behind: remove them when nothing else uses them."""
    for ph in [n for n in graph.nodes if n.op == "placeholder"][keep:]:
        doomed, todo = set(), [ph]
        while todo:
            n = todo.pop()
            doomed.add(n)
            todo += [u for u in n.users if u not in doomed]
        if not any(n.op == "output" for n in doomed):
            for n in reversed(list(graph.nodes)):
                if n in doomed:
                    graph.erase_node(n)
    graph.lint()
